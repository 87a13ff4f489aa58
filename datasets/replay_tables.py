#!/usr/bin/env python3
"""Every policy and the oracle, replayed over the 2-node reference streams of
datasets/traces on other cluster shapes: one markdown table of predicted run time (ms) per
shape, and the gap between the best published heuristic and the oracle. On the recorded
shape (2 nodes x 1 CPU) the guest starts as recorded; on the others its vCPUs start
round-robin over all nodes and its RAM interleaved (`--spread --ram interleave`), so the
4-vCPU guest's data is spread over the whole cluster.

    python3 datasets/replay_tables.py [--shapes 2x1,4x1,4x4,8x1,8x4,16x1,16x4]

Uses the release binary and datasets/traces/calibration.json.
"""

import argparse
import json
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACES = os.path.join(ROOT, "datasets", "traces")
BIN = os.path.join(ROOT, "target", "release", "flotilla")
POLICIES = ["always-page", "always-vcpu", "random", "heuristic", "numa-balancing",
            "tidalscale", "elasticos", "oracle"]
# The published heuristics and the hand-written one; always-vcpu gathers (not allowed).
HEURISTICS = ["heuristic", "numa-balancing", "tidalscale", "elasticos"]


def replay(trace, policy, nodes, cpus):
    cmd = [BIN, "replay", trace, "--policy", policy, "--nodes", str(nodes),
           "--cpus-per-node", str(cpus), "--calibration",
           os.path.join(TRACES, "calibration.json"), "--json"]
    if (nodes, cpus) != (2, 1):
        cmd += ["--spread", "--ram", "interleave"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return None, p.stderr.strip()
    return json.loads(p.stdout), None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="2x1,4x1,4x4,8x1,8x4,16x1,16x4")
    a = ap.parse_args()
    traces = sorted(f for f in os.listdir(TRACES) if "-2n-" in f and f.endswith(".ftrace.gz"))
    for shape in a.shapes.split(","):
        nodes, cpus = (int(x) for x in shape.split("x"))
        print(f"\n### {nodes} nodes x {cpus} CPU{'s' if cpus > 1 else ''} (predicted ms)\n")
        print("| workload | " + " | ".join(POLICIES) + " | best heuristic / oracle |")
        print("|---" * (len(POLICIES) + 2) + "|")
        for f in traces:
            ms = {}
            for p in POLICIES:
                v, err = replay(os.path.join(TRACES, f), p, nodes, cpus)
                ms[p] = v["wall_ms"] if v else None
            best = min((ms[p] for p in HEURISTICS if ms[p]), default=None)
            gap = f"{best / ms['oracle']:.2f}" if best and ms["oracle"] else "-"
            cells = " | ".join(f"{ms[p]:.1f}" if ms[p] is not None else "err" for p in POLICIES)
            print(f"| {f.split('-')[0]} | {cells} | {gap} |", flush=True)


if __name__ == "__main__":
    main()
