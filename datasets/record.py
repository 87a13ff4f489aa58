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
    # The shapes of `flotilla bench sim-fidelity` (FIDELITY_ARGS in cli/src/bench.rs) at
    # sizes whose reference streams fit the 50 MiB budget together.
    "stream": "n=200000 reps=20",
    "matmul": "n=300",
    "bfs": "vertices=20000 degree=8",
    "kvstore": "ops=100k keys=20000",
    "sort": "n=500000",
    "queue": "items=100000 capacity=64",
    "chase": "nodes=100000 steps=100000",
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
        # One node pinned to one CPU: what `flotilla_sim::calibrate_compute` matches.
        ones = sorted(run(base + ["--nodes", "1", "--cpus-per-node", "1"],
                          f"{w} on 1 node")["wall_ms"]
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
    total = sum(r[7] for r in rows)
    host = f"{platform.node()} (Linux {platform.release()}, {os.cpu_count()} CPUs)"
    engine = subprocess.run([BIN, "--version"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# Datasets: recorded reference streams",
        "",
        "A reference-stream trace (format version 2, `docs/trace-format.md`) of every built-in",
        "workload on 2 and 4 nodes, for `flotilla replay`, `flotilla ab` and training placement",
        "policies (`flotilla replay --policy oracle --labels FILE`). gzip-compressed;",
        "`flotilla trace stats|export` and `telemetry/python/flotilla_trace.py` read them as they",
        "are. The 56 sampled traces of the first recording (format version 1) are in git",
        "history (commit 2834c23).",
        "",
        "## Re-recording",
        "",
        "One command re-records all of them, `traces/calibration.json`, and this file:",
        "",
        "```sh",
        "python3 datasets/record.py",
        "```",
        "",
        "It builds the release binary, then for each workload measures the plain run time on",
        f"one node pinned to one CPU ({ONE_NODE_RUNS} runs, the median), and for each trace runs",
        "",
        "```sh",
        f"flotilla run --workload W --args ARGS --vcpus {VCPUS} --nodes N --policy {POLICY} --seed {SEED} \\",
        "    --transport tcp [--cpus-per-node 1] --trace datasets/traces/W-Nn-always-page.ftrace.gz \\",
        f"    --touch-epoch-ms {EPOCH_MS} --timeout 600 --json",
        "```",
        "",
        "then the same run without recording, whose cost medians (fault service, vCPU move,",
        "round trip, install, capture, restore) go to `calibration.json` with the 1-node time:",
        "a recording runs many times slower than the guest does, and so does its engine.",
        "`flotilla ab` reads `calibration.json`; for `flotilla replay`, pass the 1-node time",
        "as `--one-node-ms`. Every run is checked against the host reference. vCPUs start",
        "round-robin over the nodes; guest RAM is split in contiguous ranges. 2-node runs are",
        "pinned (a CPU per node); this host has 2 CPUs, so the 4 nodes share them.",
        "",
        f"Recorded on {host}, {engine}"
        f" on {time.strftime('%Y-%m-%d')}. Total size: {total/2**20:.1f} MiB.",
        "",
        "## What each trace holds",
        "",
        f"Each page's first touch by each node's vCPUs in each {EPOCH_MS} ms epoch (as",
        "`access_sample` events), every remote fault with the decision taken and its service",
        "time, every page and vCPU move and invalidation; the run metadata of format",
        "version 2 (RAM layout, starting nodes, CPU sets, link delay, measured costs).",
        "`docs/telemetry.md` says what a reference stream still misses.",
        "",
        "| file | workload | args | nodes | pinned | events | recorded ms | plain ms | 1-node ms | KiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    with open(os.path.join(OUT, "calibration.json")) as f:
        cal = json.load(f)
    for name, w, args, nodes, pinned, v, plain, size in rows:
        lines.append(
            f"| `{name}` | {w} | `{args}` | {nodes} | {'yes' if pinned else 'no'} | "
            f"{v['trace_events']} | {v['wall_ms']:.1f} | {plain['wall_ms']:.1f} | "
            f"{cal[name]['one_node_ms']:.1f} | {size/1024:.0f} |"
        )
    with open(os.path.join(ROOT, "datasets", "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
