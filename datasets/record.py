#!/usr/bin/env python3
"""Re-records every trace in datasets/traces/ and rewrites datasets/README.md.

    python3 datasets/record.py            # all 14 traces (about 10 minutes here)
    python3 datasets/record.py --only bfs # one workload

Each trace is a reference stream: one `flotilla run` of a built-in workload on a local
cluster (TCP, 4 vCPUs, round-robin vCPUs, contiguous RAM, always-page) with
`--trace FILE.ftrace.gz --touch-epoch-ms 5`. Beside it, `calibration.json` holds what a
replay needs that a slowed-down recording cannot measure: the plain 1-node run time of
the same guest and the cost medians of a plain run of the same cluster. Runs are
checked against the host reference; a run that does not verify is an error.
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
    # `flotilla bench sim-fidelity`'s sizes (FIDELITY_ARGS in cli/src/bench.rs), smaller
    # where a reference stream would not fit the 50 MiB budget.
    "stream": "n=1m reps=100",
    "matmul": "n=600",
    "bfs": "vertices=30000 degree=8",
    "kvstore": "ops=150k keys=20000",
    "sort": "n=2m",
    "queue": "items=200000 capacity=64",
    "chase": "nodes=250000 steps=250000",
}
NODES = [2, 4]
POLICY = "always-page"
VCPUS = 4
EPOCH_MS = 5
SEED = 1
ONE_NODE_RUNS = 3


def run(cmd, name):
    p = subprocess.run(cmd, capture_output=True, text=True)
    try:
        v = json.loads(p.stdout)
    except json.JSONDecodeError:
        sys.exit(f"{name}: no JSON result\n{p.stderr}")
    if v.get("verified") is not True:
        sys.exit(f"{name}: did not verify: {v.get('error')}\n{p.stderr}")
    return v


def costs(v):
    """A run's cost medians, in the field names of a trace's run costs."""
    p50 = lambda k: (v.get(k) or {}).get("p50")
    ns = lambda us: None if us is None else int(us) * 1000
    return {
        "fault_service_ns": ns(p50("fault_service_us")),
        "vcpu_move_ns": ns(p50("vcpu_move_us")),
        "rtt_4k_ns": ns(p50("rtt_4k_us")),
        "install_ns": ns(p50("install_us")),
        "capture_ns": ns(p50("capture_us")),
        "restore_ns": ns(p50("restore_us")),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="record only this workload")
    ap.add_argument("--no-build", action="store_true", help="use the existing release build")
    a = ap.parse_args()
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    os.makedirs(OUT, exist_ok=True)
    cal_path = os.path.join(OUT, "calibration.json")
    calibration = {}
    if os.path.exists(cal_path):
        with open(cal_path) as f:
            calibration = json.load(f)
    rows = []
    for w, args in WORKLOADS.items():
        if a.only and w != a.only:
            continue
        base = [BIN, "run", "--workload", w, "--args", args, "--vcpus", str(VCPUS),
                "--seed", str(SEED), "--timeout", "600", "--json"]
        ones = sorted(run(base + ["--nodes", "1"], f"{w} on 1 node")["wall_ms"]
                      for _ in range(ONE_NODE_RUNS))
        for nodes in NODES:
            name = f"{w}-{nodes}n-{POLICY}.ftrace.gz"
            path = os.path.join(OUT, name)
            # Pinned where this host has a CPU per node; 4 nodes share the 2 CPUs here.
            pin = ["--cpus-per-node", "1"] if nodes <= (os.cpu_count() or 1) else []
            cluster = base + ["--nodes", str(nodes), "--policy", POLICY,
                              "--transport", "tcp"] + pin
            t = time.time()
            v = run(cluster + ["--trace", path, "--touch-epoch-ms", str(EPOCH_MS)], name)
            plain = run(cluster, f"{name} (plain run)")
            calibration[name] = {
                "one_node_ms": ones[len(ones) // 2],
                "plain_ms": plain["wall_ms"],
                "costs": costs(plain),
            }
            size = os.path.getsize(path)
            print(f"{name:40} {v['trace_events']:>8} events {size/1024:>8.0f} KiB "
                  f"{v['wall_ms']:>8.1f} ms recorded, {plain['wall_ms']:>8.1f} ms plain "
                  f"({time.time()-t:.1f} s)", flush=True)
            rows.append((name, w, args, nodes, bool(pin), v, plain, size))
    with open(cal_path, "w") as f:
        json.dump(calibration, f, indent=1, sort_keys=True)
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
