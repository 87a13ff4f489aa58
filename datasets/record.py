#!/usr/bin/env python3
"""Re-records every trace in datasets/traces/ and rewrites datasets/README.md.

    python3 datasets/record.py            # all 56 traces (a few minutes here)
    python3 datasets/record.py --only bfs # one workload

Each trace is one `flotilla run` of a built-in workload on a local cluster (TCP, 4 vCPUs,
round-robin vCPUs, contiguous RAM) with `--trace FILE.ftrace.gz --sample-rate RATE`.
Runs are checked against the host reference; a run that does not verify is an error.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "datasets", "traces")
BIN = os.path.join(ROOT, "target", "release", "flotilla")

WORKLOADS = {
    # The medium sizes of `flotilla bench trace-overhead` (and of the 1-4 node table in
    # the issue-3 notes): tens to hundreds of milliseconds on one node.
    "stream": "n=200000 reps=5",
    "matmul": "n=96",
    "bfs": "vertices=50000 degree=8",
    "kvstore": "ops=200000 keys=20000",
    "sort": "n=200000",
    "queue": "items=50000 capacity=64",
    "chase": "nodes=20000 steps=50000",
}
# always-vcpu ping-pongs a vCPU between its stack and its data (about 120 us a move);
# it gets smaller inputs of the same shape.
ALWAYS_VCPU = {
    "stream": "n=5000 reps=1",
    "matmul": "n=24",
    "bfs": "vertices=2000 degree=4",
    "kvstore": "ops=2000 keys=1000",
    "sort": "n=5000",
    "queue": "items=20000 capacity=64",
    "chase": "nodes=10000 steps=20000",
}
NODES = [2, 4]
POLICIES = ["always-page", "always-vcpu", "random", "heuristic"]
VCPUS = 4
SAMPLE_RATE = 20000
SEED = 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="record only this workload")
    ap.add_argument("--no-build", action="store_true", help="use the existing release build")
    a = ap.parse_args()
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    os.makedirs(OUT, exist_ok=True)
    rows = []
    for w, default_args in WORKLOADS.items():
        if a.only and w != a.only:
            continue
        for nodes in NODES:
            for policy in POLICIES:
                args = ALWAYS_VCPU[w] if policy == "always-vcpu" else default_args
                name = f"{w}-{nodes}n-{policy}.ftrace.gz"
                path = os.path.join(OUT, name)
                cmd = [
                    BIN, "run", "--workload", w, "--args", args, "--vcpus", str(VCPUS),
                    "--nodes", str(nodes), "--policy", policy, "--seed", str(SEED),
                    "--transport", "tcp", "--trace", path,
                    "--sample-rate", str(SAMPLE_RATE), "--timeout", "120", "--json",
                ]
                t = time.time()
                p = subprocess.run(cmd, capture_output=True, text=True)
                try:
                    v = json.loads(p.stdout)
                except json.JSONDecodeError:
                    sys.exit(f"{name}: no JSON result\n{p.stderr}")
                if v.get("verified") is not True:
                    sys.exit(f"{name}: did not verify: {v.get('error')}\n{p.stderr}")
                size = os.path.getsize(path)
                print(f"{name:40} {v['trace_events']:>8} events {size/1024:>8.0f} KiB "
                      f"{v['wall_ms']:>8.1f} ms  ({time.time()-t:.1f} s)", flush=True)
                rows.append((name, w, args, nodes, policy, v, size))
    if not a.only:
        write_manifest(rows)


def write_manifest(rows):
    total = sum(r[6] for r in rows)
    host = f"{platform.node()} (Linux {platform.release()}, {os.cpu_count()} CPUs)"
    engine = subprocess.run([BIN, "--version"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Datasets: recorded fault traces",
        "",
        "Fault traces of every built-in workload on 2 and 4 nodes under each placement policy,",
        "for replay and for training placement policies. Format: `docs/trace-format.md`",
        "(gzip-compressed; `flotilla trace stats|export` and `telemetry/python/flotilla_trace.py`",
        "read them as they are).",
        "",
        "## Re-recording",
        "",
        "One command re-records all of them and rewrites this file:",
        "",
        "```sh",
        "python3 datasets/record.py",
        "```",
        "",
        "It builds the release binary, then runs, for each trace:",
        "",
        "```sh",
        "flotilla run --workload W --args ARGS --vcpus 4 --nodes N --policy P --seed 1 \\",
        f"    --transport tcp --trace datasets/traces/W-Nn-P.ftrace.gz --sample-rate {SAMPLE_RATE} \\",
        "    --timeout 120 --json",
        "```",
        "",
        "and checks that the run verified against the host reference. vCPUs start round-robin",
        "over the nodes; guest RAM is split in contiguous ranges. `always-vcpu` runs get",
        "smaller inputs of the same shape (it moves a vCPU at every remote fault, about",
        "120 us each). Runs on a shared multi-core host are not deterministic: timing decides",
        "which node faults first, so a re-recording matches in shape, not event for event.",
        "",
        f"Recorded on {host}, {engine}"
        f" on {time.strftime('%Y-%m-%d')}. Total size: {total/2**20:.1f} MiB.",
        "",
        "## What each trace holds",
        "",
        "Every remote fault (with the decision taken and its service time), every page and",
        "vCPU move, every invalidation, and sampled local accesses at "
        f"{SAMPLE_RATE} pages/s per node",
        "(see `docs/telemetry.md`, \"Sampled access tracking\", for what sampling catches).",
        "",
        "| file | workload | args | nodes | policy | events | remote faults | vCPU moves | wall ms | KiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, w, args, nodes, policy, v, size in rows:
        lines.append(
            f"| `{name}` | {w} | `{args}` | {nodes} | {policy} | {v['trace_events']} | "
            f"{v['remote_faults']} | {v['vcpu_moves']} | {v['wall_ms']:.1f} | {size/1024:.0f} |"
        )
    with open(os.path.join(ROOT, "datasets", "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
