//! `flotilla bench …`: measured numbers, never asserted in tests.

use crate::launch::Launch;
use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use flotilla_engine::{ConsoleMode, Machine, MachineConfig};
use flotilla_workloads::{native, Workload};
use serde_json::json;

#[derive(Subcommand)]
pub enum Bench {
    /// Each workload natively (same code, host threads) and as a guest on one node.
    Overhead(OverheadArgs),
    /// A remote page fault against a bare 4 KiB round trip plus a local install.
    FaultLatency(ClusterBenchArgs),
    /// Moving a vCPU against a bare round trip plus capture and restore.
    VcpuMove(ClusterBenchArgs),
    /// Run time with and without trace recording (and with access sampling on top).
    TraceOverhead(TraceBenchArgs),
    /// Does distribution pay off: each workload on 1 node × 1 CPU against 2 pinned nodes
    /// × 1 CPU each, under every policy.
    Scaling(ScalingArgs),
    /// Simulator throughput: touches replayed per second on one core.
    Replay(ReplayBenchArgs),
    /// Simulator fidelity: every workload live on the pinned 2-node testbed under every
    /// policy, against replays of one reference stream per workload.
    SimFidelity(FidelityArgs),
    /// Decision latency of every policy (p50/p99 ns of `decide`), on the faults of a
    /// trace replayed in the simulator.
    Policy(PolicyBenchArgs),
}

#[derive(Args)]
pub struct PolicyBenchArgs {
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// The trace whose faults are decided (replayed on its recorded shape).
    #[arg(long, default_value = "datasets/traces/bfs-4n-always-page.ftrace.gz")]
    trace: std::path::PathBuf,
    /// Comma-separated policies (`learned` needs --model).
    #[arg(long, value_delimiter = ',', default_values_t = ["always-page", "always-vcpu", "random", "heuristic", "numa-balancing", "tidalscale", "elasticos", "learned"].map(String::from))]
    policies: Vec<String>,
    /// The model of `learned` (without it, `learned` is left out and says so).
    #[arg(long, value_name = "FILE")]
    model: Option<std::path::PathBuf>,
    /// The policy whose decisions the replays follow; every measured policy decides the
    /// same faults beside it.
    #[arg(long, default_value = "heuristic")]
    driver: String,
    /// Replays of the trace per policy; every decision of every replay is timed.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    runs: u64,
}

#[derive(Args)]
pub struct FidelityArgs {
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Live runs of each (workload, policy); medians are compared.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Comma-separated workloads (default: all, at the sizes of `FIDELITY_ARGS`).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Comma-separated policies.
    #[arg(long, value_delimiter = ',', default_values_t = ["always-page", "always-vcpu", "random", "heuristic", "numa-balancing", "tidalscale", "elasticos"].map(String::from))]
    policies: Vec<String>,
    /// The policy the reference streams are recorded under.
    #[arg(long, default_value = "always-page")]
    record_policy: String,
    /// Reference-stream epoch in ms.
    #[arg(long, default_value_t = 5)]
    touch_epoch_ms: u32,
}

/// Smaller than `SCALING_ARGS`: reference-stream recording is 30 to 1000 times slower
/// (recording bfs at these sizes took 17 s and 25 MB, kvstore 30 s and 36 MB).
pub const FIDELITY_ARGS: [(&str, &str); 7] = [
    ("stream", "n=1m reps=100"),
    ("matmul", "n=600"),
    ("bfs", "vertices=60000 degree=8"),
    ("kvstore", "ops=300k keys=20000"),
    ("sort", "n=2m"),
    ("queue", "items=200000 capacity=64"),
    ("chase", "nodes=250000 steps=250000"),
];

#[derive(Args)]
pub struct ReplayBenchArgs {
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Replays; the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Replay this trace (default: a synthetic one of `--events` touches).
    #[arg(long)]
    trace: Option<std::path::PathBuf>,
    /// Touches in the synthetic trace.
    #[arg(long, default_value_t = 5_000_000, value_parser = clap::value_parser!(u64).range(1..=50_000_000))]
    events: u64,
    #[arg(long, default_value = "heuristic")]
    policy: String,
}

#[derive(Args)]
pub struct ScalingArgs {
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Runs of each configuration (interleaved); medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Comma-separated workloads (default: all, at the sizes of `SCALING_ARGS`).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Comma-separated policies for the 2-node side.
    #[arg(long, value_delimiter = ',', default_values_t = ["always-page", "always-vcpu", "random", "heuristic", "numa-balancing", "tidalscale", "elasticos"].map(String::from))]
    policies: Vec<String>,
    #[arg(long, default_value = "tcp")]
    transport: String,
}

/// Arguments that make each workload take roughly a second on one pinned node with one
/// CPU and 4 vCPUs (measured on the 2-core development host, a node alone running
/// without userfaultfd).
pub const SCALING_ARGS: [(&str, &str); 7] = [
    ("stream", "n=2m reps=600"),
    ("matmul", "n=1250"),
    ("bfs", "vertices=2m degree=8"),
    ("kvstore", "ops=26m keys=200000"),
    ("sort", "n=14m"),
    ("queue", "items=1m capacity=64"),
    ("chase", "nodes=1m steps=1m"),
];

#[derive(Args)]
pub struct TraceBenchArgs {
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Runs of each variant (interleaved); medians are reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Comma-separated workloads (default: all, with medium-sized arguments).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    #[arg(long, default_value_t = 2)]
    nodes: u16,
    /// Sampling rate of the third variant (pages per second per node).
    #[arg(long, default_value_t = 1000)]
    sample_rate: u32,
    /// Placement policy of every run.
    #[arg(long, default_value = "heuristic")]
    policy: String,
}

/// Arguments that make each workload run for tens to hundreds of milliseconds on a
/// 2-node cluster (the datasets use the same).
pub const MEDIUM_ARGS: [(&str, &str); 7] = [
    ("stream", "n=200000 reps=5"),
    ("matmul", "n=96"),
    ("bfs", "vertices=50000 degree=8"),
    ("kvstore", "ops=200000 keys=20000"),
    ("sort", "n=200000"),
    ("queue", "items=50000 capacity=64"),
    ("chase", "nodes=20000 steps=50000"),
];

#[derive(Args)]
pub struct ClusterBenchArgs {
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Runs per transport; each reported number is the median of the runs' values.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Comma-separated transports.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["tcp".to_string(), "shm".to_string()])]
    transports: Vec<String>,
}

#[derive(Args)]
pub struct OverheadArgs {
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Runs of each side; the median is reported (at least 5 for the target).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Threads natively, vCPUs in the guest.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Comma-separated workloads (default: all).
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Argument string for every workload (default: each workload's defaults).
    #[arg(long, default_value = "")]
    args: String,
    /// Leave threads and vCPUs where the host scheduler puts them. By default thread `i`
    /// of the native run and vCPU `i` of the guest are both pinned to the `i`-th CPU this
    /// process may use (modulo their number), so both sides get the same placement.
    #[arg(long)]
    unpinned: bool,
}

pub fn bench(b: Bench) -> Result<i32> {
    match b {
        Bench::Overhead(a) => overhead(a),
        Bench::FaultLatency(a) => cluster_bench(a, Kind::Fault),
        Bench::VcpuMove(a) => cluster_bench(a, Kind::Move),
        Bench::TraceOverhead(a) => trace_overhead(a),
        Bench::Scaling(a) => scaling(a),
        Bench::Replay(a) => replay_bench(a),
        Bench::SimFidelity(a) => sim_fidelity(a),
        Bench::Policy(a) => policy_bench(a),
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn overhead(a: OverheadArgs) -> Result<i32> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if a.vcpus == 0 || a.vcpus > flotilla_abi::VCPUS_MAX {
        bail!("--vcpus {}: 1 to {}", a.vcpus, flotilla_abi::VCPUS_MAX);
    }
    let workloads: Vec<Workload> = if a.workloads.is_empty() {
        Workload::ALL.to_vec()
    } else {
        a.workloads
            .iter()
            .map(|n| Workload::from_name(n).ok_or_else(|| anyhow!("unknown workload '{n}'")))
            .collect::<Result<_>>()?
    };
    let cpus = if a.unpinned {
        Vec::new()
    } else {
        crate::cpus::allowed()?
    };
    let mut rows = Vec::new();
    for w in workloads {
        let prepared = w
            .prepare(&a.args)
            .map_err(|e| anyhow!("workload {}: {e}", w.name()))?;
        let mem = crate::sizing::default_guest_mem(&prepared, a.vcpus);
        let config = MachineConfig {
            vcpus: a.vcpus,
            mem_bytes: mem,
            args: a.args.clone(),
            console: ConsoleMode::Capture,
            vcpu_cpus: cpus.clone(),
            ..Default::default()
        };
        let (mut native_ms, mut guest_ms) = (Vec::new(), Vec::new());
        // Alternate the two sides so drift on the host hits both alike.
        for _ in 0..a.runs {
            let n = native::run_pinned(&prepared, a.vcpus as usize, &cpus)
                .map_err(|e| anyhow!("{} natively: {e}", w.name()))?;
            native_ms.push(n.wall.as_secs_f64() * 1e3);
            let machine = Machine::boot(config.clone(), flotilla_guest_images::image(w))?;
            let outcome = machine.run()?;
            if outcome.exit_code != 0 || outcome.report != Some(n.checksum) {
                bail!(
                    "{} as a guest did not reproduce the native checksum (exit {})",
                    w.name(),
                    outcome.exit_code
                );
            }
            guest_ms.push(outcome.wall.as_secs_f64() * 1e3);
        }
        let (native, guest) = (median(native_ms), median(guest_ms));
        let ratio = guest / native;
        if !a.json {
            crate::say_err(&format!(
                "{:<8} native {native:>9.1} ms  guest {guest:>9.1} ms  ratio {ratio:.3}",
                w.name()
            ));
        }
        rows.push(json!({
            "name": w.name(),
            "native_ms": round3(native),
            "guest_ms": round3(guest),
            "ratio": round3(ratio),
        }));
    }
    let out = json!({ "vcpus": a.vcpus, "runs": a.runs, "cpus": cpus, "workloads": rows });
    if a.json {
        crate::say(&out.to_string());
    }
    Ok(0)
}

pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Fault,
    Move,
}

/// Bare 4 KiB round trips measured in each run.
const ECHO_ROUNDS: u32 = 300;

fn pct(mut v: Vec<u32>, q: f64) -> Option<f64> {
    (!v.is_empty()).then(|| flotilla_engine::cluster::quantile(&mut v, q) as f64)
}

/// One guest run for a benchmark: 1 vCPU, 2 nodes.
/// What a benchmark run runs.
#[derive(Clone, Copy)]
enum Guest<'a> {
    /// A built-in workload, checked against the host reference.
    Workload(Workload),
    /// A probe image (written to `path`) that must exit 0 and report `expect`.
    Probe {
        path: &'a std::path::Path,
        expect: u64,
    },
}

/// One 2-node run of the fault and move benchmarks, checked.
#[derive(Clone, Copy)]
struct BenchRun<'a> {
    transport: &'a str,
    policy: &'a str,
    guest: Guest<'a>,
    args: &'a str,
    /// Each vCPU's node.
    vcpu_nodes: &'a [u16],
    ram: &'a str,
    echo: u32,
    sample_rate: u32,
}

fn bench_run(b: &BenchRun) -> Result<crate::report::Reported> {
    let vcpus = b.vcpu_nodes.len() as u32;
    let (mut launch, expect) = match b.guest {
        Guest::Workload(w) => {
            let prepared = w.prepare(b.args).map_err(|e| anyhow!("{e}"))?;
            let mem = crate::sizing::default_guest_mem(&prepared, vcpus);
            let native = native::run(&prepared, vcpus as usize).map_err(|e| anyhow!("{e}"))?;
            (
                Launch::workload(w.name(), b.args, 2, vcpus, mem),
                native.checksum,
            )
        }
        Guest::Probe { path, expect } => {
            let mut l = Launch::workload("", b.args, 2, vcpus, 64 << 20);
            l.workload = None;
            l.image = Some(path.to_path_buf());
            (l, expect)
        }
    };
    launch.transport = b.transport.to_string();
    launch.policy = b.policy.to_string();
    launch.vcpu_nodes = Some(b.vcpu_nodes.to_vec());
    launch.ram = b.ram.to_string();
    launch.echo_rounds = b.echo;
    launch.observe.sample_rate = b.sample_rate;
    let reported = crate::launch::launch(&launch)?;
    if let Err(e) = &reported.result {
        bail!("benchmark run failed: {e}");
    }
    if reported.exit_code() != Some(0) || reported.report != Some(expect) {
        bail!(
            "the benchmark guest ended with {:?} and reported {:?}, not 0 and {expect:#x}",
            reported.exit_code(),
            reported.report
        );
    }
    Ok(reported)
}

/// A private directory (0700) for the benchmarks' files, removed by the caller.
fn private_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "flotilla-bench-{}-{}",
        std::process::id(),
        flotilla_engine::cluster::monotonic_ns()
    ));
    std::fs::create_dir(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    Ok(dir)
}

/// Pages the fault probe pulls (1 MiB), and what it then reports after `passes`.
const PULL_PAGES: u64 = 256;
fn pull_sum(passes: u64) -> u64 {
    passes * PULL_PAGES * (PULL_PAGES + 1) / 2
}

fn cluster_bench(a: ClusterBenchArgs, kind: Kind) -> Result<i32> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let dir = private_dir()?;
    let result = cluster_bench_in(&a, kind, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn cluster_bench_in(a: &ClusterBenchArgs, kind: Kind, dir: &std::path::Path) -> Result<i32> {
    let probe = dir.join("pull.elf");
    std::fs::write(&probe, flotilla_guest_images::PULL_PROBE)?;
    let mut rows = Vec::new();
    for t in &a.transports {
        if flotilla_transport::Kind::from_name(t).is_none() {
            bail!("transport '{t}': use tcp or shm");
        }
        // Per run: p50 and p99 of each measure; the medians across runs are reported.
        let mut m: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
        for _ in 0..a.runs {
            let mut put = |k: &'static str, v: Option<f64>| {
                if let Some(v) = v {
                    m.entry(k).or_default().push(v);
                }
            };
            match kind {
                Kind::Fault => {
                    // vCPU 0 (node 0) writes 256 pages and idles in a futex; vCPU 1
                    // (node 1) then reads them: each is a remote read fault that brings
                    // 4 KiB of data from node 0. (Fresh memory would be claimed, with no
                    // data; and a computing vCPU on node 0 would take the CPU its node
                    // needs to answer.)
                    let pull = BenchRun {
                        transport: t,
                        policy: "always-page",
                        guest: Guest::Probe {
                            path: &probe,
                            expect: pull_sum(1),
                        },
                        args: "256 1",
                        vcpu_nodes: &[0, 1],
                        ram: "contiguous",
                        echo: ECHO_ROUNDS,
                        sample_rate: 0,
                    };
                    let r = bench_run(&pull)?;
                    let f = r.samples.fault_service_us.clone();
                    put("fault_p50", pct(f.clone(), 0.5));
                    put("faults", Some(f.len() as f64));
                    put("fault_p99", pct(f, 0.99));
                    put("claims", Some(r.samples.claim_us.len() as f64));
                    let e = r.samples.rtt_4k_us.clone();
                    put("rtt_p50", pct(e.clone(), 0.5));
                    put("rtt_p99", pct(e, 0.99));
                    // Both vCPUs on node 0, the sampler arming its pages: each hit is a
                    // local trap that installs one 4 KiB page of data.
                    let l = bench_run(&BenchRun {
                        vcpu_nodes: &[0, 0],
                        echo: 0,
                        sample_rate: 50_000,
                        guest: Guest::Probe {
                            path: &probe,
                            expect: pull_sum(20_000),
                        },
                        args: "256 20000",
                        ..pull
                    })?;
                    put("install_p50", pct(l.samples.install_us.clone(), 0.5));
                    put("installs", Some(l.samples.install_us.len() as f64));
                }
                Kind::Move => {
                    // Pages interleaved between the nodes: every touch sends the vCPU over.
                    let r = bench_run(&BenchRun {
                        transport: t,
                        policy: "always-vcpu",
                        guest: Guest::Workload(Workload::Stream),
                        args: "n=3000 reps=1",
                        vcpu_nodes: &[0],
                        ram: "interleave",
                        echo: ECHO_ROUNDS,
                        sample_rate: 0,
                    })?;
                    let mv = r.samples.vcpu_move_us.clone();
                    put("move_p50", pct(mv.clone(), 0.5));
                    put("move_p99", pct(mv, 0.99));
                    let e = r.samples.rtt_4k_us.clone();
                    put("rtt_p50", pct(e.clone(), 0.5));
                    put("rtt_p99", pct(e, 0.99));
                    put("capture_p50", pct(r.samples.capture_us.clone(), 0.5));
                    put("restore_p50", pct(r.samples.restore_us.clone(), 0.5));
                }
            }
        }
        let med = |k: &str| m.get(k).cloned().map(median).unwrap_or(f64::NAN);
        let row = match kind {
            Kind::Fault => {
                let ratio = med("fault_p50") / (med("rtt_p50") + med("install_p50"));
                if !a.json {
                    crate::say_err(&format!(
                        "{t:<4} fault p50 {:>6.1} us p99 {:>6.1} ({:.0} faults with data) | rtt 4k p50 {:>6.1} p99 {:>6.1} | install p50 {:>5.1} ({:.0}) | ratio {ratio:.2}",
                        med("fault_p50"), med("fault_p99"), med("faults"), med("rtt_p50"), med("rtt_p99"), med("install_p50"), med("installs")
                    ));
                }
                json!({
                    "name": t,
                    "fault_us": {"p50": med("fault_p50"), "p99": med("fault_p99"), "count": med("faults")},
                    "claims": med("claims"),
                    "rtt_4k_us": {"p50": med("rtt_p50"), "p99": med("rtt_p99")},
                    "install_us": {"p50": med("install_p50"), "count": med("installs")},
                    "ratio": round3(ratio),
                })
            }
            Kind::Move => {
                let ratio =
                    med("move_p50") / (med("rtt_p50") + med("capture_p50") + med("restore_p50"));
                if !a.json {
                    crate::say_err(&format!(
                        "{t:<4} move p50 {:>6.1} us p99 {:>6.1} | rtt 4k p50 {:>6.1} | capture p50 {:>5.1} | restore p50 {:>5.1} | ratio {ratio:.2}",
                        med("move_p50"), med("move_p99"), med("rtt_p50"), med("capture_p50"), med("restore_p50")
                    ));
                }
                json!({
                    "name": t,
                    "move_us": {"p50": med("move_p50"), "p99": med("move_p99")},
                    "rtt_4k_us": {"p50": med("rtt_p50"), "p99": med("rtt_p99")},
                    "capture_us": {"p50": med("capture_p50")},
                    "restore_us": {"p50": med("restore_p50")},
                    "ratio": round3(ratio),
                })
            }
        };
        rows.push(row);
    }
    let out = json!({ "runs": a.runs, "transports": rows });
    if a.json {
        crate::say(&out.to_string());
    }
    Ok(0)
}

fn trace_overhead(a: TraceBenchArgs) -> Result<i32> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    // A private directory (created fresh, 0700), so no other user can plant the file.
    let dir = std::env::temp_dir().join(format!(
        "flotilla-bench-{}-{}",
        std::process::id(),
        flotilla_engine::cluster::monotonic_ns()
    ));
    std::fs::create_dir(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let file = dir.join("trace.ftrace");
    let result = trace_overhead_in(&a, &file);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn trace_overhead_in(a: &TraceBenchArgs, file: &std::path::Path) -> Result<i32> {
    let names: Vec<String> = if a.workloads.is_empty() {
        MEDIUM_ARGS.iter().map(|(w, _)| w.to_string()).collect()
    } else {
        a.workloads.clone()
    };
    let mut rows = Vec::new();
    for name in &names {
        let w = BenchWorkload::find(&MEDIUM_ARGS, name, 4)?;
        let (args, reference) = (w.args, w.reference);
        let variants = [
            ("plain", None, 0),
            ("trace", Some(file.to_path_buf()), 0),
            ("trace_sampled", Some(file.to_path_buf()), a.sample_rate),
        ];
        let mut wall: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
        let mut events: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
        let mut bytes: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
        for _ in 0..a.runs {
            for (i, (_, trace, rate)) in variants.iter().enumerate() {
                let launch = Launch {
                    policy: a.policy.clone(),
                    observe: crate::node::ObserveArgs {
                        trace: trace.clone(),
                        sample_rate: *rate,
                        ..Default::default()
                    },
                    ..Launch::workload(name, args, a.nodes, 4, w.mem)
                };
                let r = crate::launch::launch(&launch)?;
                if let Err(e) = &r.result {
                    bail!("{name}: benchmark run failed: {e}");
                }
                if r.exit_code() != Some(0) || r.report != Some(reference) {
                    bail!("{name}: the guest did not reproduce the host checksum");
                }
                wall[i].push(r.wall_ms);
                events[i].push(r.trace_events.unwrap_or(0) as f64);
                bytes[i].push(
                    std::fs::metadata(file).map_or(0, |m| m.len()) as f64
                        * trace.is_some() as u8 as f64,
                );
            }
        }
        let _ = std::fs::remove_file(file);
        let med: Vec<f64> = wall.into_iter().map(median).collect();
        let ev: Vec<f64> = events.into_iter().map(median).collect();
        let by: Vec<f64> = bytes.into_iter().map(median).collect();
        let pct = |x: f64| round3((x / med[0] - 1.0) * 100.0);
        if !a.json {
            crate::say_err(&format!(
                "{name:<8} plain {:>8.1} ms | trace {:>8.1} ms ({:+.1}%, {} events, {} KiB) | trace+sampling {:>8.1} ms ({:+.1}%, {} events)",
                med[0], med[1], pct(med[1]), ev[1], by[1] as u64 / 1024, med[2], pct(med[2]), ev[2]
            ));
        }
        rows.push(json!({
            "workload": name, "args": args,
            "plain_ms": round3(med[0]), "trace_ms": round3(med[1]),
            "trace_sampled_ms": round3(med[2]),
            "trace_overhead_pct": pct(med[1]), "trace_sampled_overhead_pct": pct(med[2]),
            "trace_events": ev[1], "trace_sampled_events": ev[2], "trace_bytes": by[1],
        }));
    }
    let total = |k: &str| {
        rows.iter()
            .map(|r| r[k].as_f64().unwrap_or(0.0))
            .sum::<f64>()
    };
    // What one recorded event costs a recording thread, measured directly: the
    // end-to-end medians above move by more than that from run to run.
    let ns_per_event = record_cost(file)?;
    let _ = std::fs::remove_file(file);
    let estimated = total("trace_events") * ns_per_event / 1e6 / total("plain_ms") * 100.0;
    let col = |k: &str| -> Vec<f64> { rows.iter().filter_map(|r| r[k].as_f64()).collect() };
    let summary = json!({
        "median_trace_overhead_pct": round3(median(col("trace_overhead_pct"))),
        "median_trace_sampled_overhead_pct": round3(median(col("trace_sampled_overhead_pct"))),
        "record_ns_per_event": round3(ns_per_event),
        "estimated_trace_overhead_pct": round3(estimated),
        "total_plain_ms": round3(total("plain_ms")),
        "total_trace_ms": round3(total("trace_ms")),
        "total_trace_sampled_ms": round3(total("trace_sampled_ms")),
        "trace_overhead_pct": round3((total("trace_ms") / total("plain_ms") - 1.0) * 100.0),
        "trace_sampled_overhead_pct": round3((total("trace_sampled_ms") / total("plain_ms") - 1.0) * 100.0),
    });
    if a.json {
        crate::say(&format!(
            "{}",
            json!({"runs": a.runs, "nodes": a.nodes, "policy": a.policy, "sample_rate": a.sample_rate, "workloads": rows, "summary": summary})
        ));
    } else {
        crate::say_err(&format!("all      {summary}"));
    }
    Ok(0)
}

/// Nanoseconds one `Recorder::record` takes (two threads, 2 M events, file writes
/// included), median of 5 rounds.
fn record_cost(file: &std::path::Path) -> Result<f64> {
    use flotilla_telemetry::record::Recorder;
    use flotilla_telemetry::trace::{Event, EventKind, TraceMeta, NONE16};
    const PER_THREAD: u64 = 1_000_000;
    let meta = TraceMeta {
        nodes: 1,
        vcpus: 2,
        ..Default::default()
    };
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let r = std::sync::Arc::new(Recorder::create(file, &meta)?);
        let t = std::time::Instant::now();
        let threads: Vec<_> = (0..2u16)
            .map(|v| {
                let r = std::sync::Arc::clone(&r);
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        r.record(Event {
                            t_ns: i,
                            page: i,
                            vcpu: v,
                            peer: NONE16,
                            replicas: NONE16,
                            kind: EventKind::RemoteFault as u8,
                            ..Default::default()
                        });
                    }
                })
            })
            .collect();
        for th in threads {
            th.join()
                .map_err(|_| anyhow!("recording thread panicked"))?;
        }
        r.finish().map_err(|e| anyhow!(e))?;
        // Per event, per recording thread (the two threads run in parallel).
        rounds.push(t.elapsed().as_nanos() as f64 / PER_THREAD as f64);
    }
    Ok(median(rounds))
}

/// A built-in workload at a benchmark size: its arguments, guest RAM, and the host
/// reference checksum on `vcpus` threads.
pub(crate) struct BenchWorkload {
    pub(crate) name: String,
    pub(crate) args: &'static str,
    mem: u64,
    reference: u64,
}

impl BenchWorkload {
    pub(crate) fn find(table: &[(&str, &'static str)], name: &str, vcpus: u32) -> Result<Self> {
        let (_, args) = table
            .iter()
            .find(|(w, _)| *w == name)
            .ok_or_else(|| anyhow!("unknown workload '{name}'"))?;
        let w = Workload::from_name(name).ok_or_else(|| anyhow!("unknown workload '{name}'"))?;
        let prepared = w.prepare(args).map_err(|e| anyhow!("{e}"))?;
        let reference = native::run(&prepared, vcpus as usize)
            .map_err(|e| anyhow!("{e}"))?
            .checksum;
        Ok(BenchWorkload {
            name: name.to_string(),
            args,
            mem: crate::sizing::default_guest_mem(&prepared, vcpus),
            reference,
        })
    }
}

/// A workload as `bench scaling` runs it: 4 vCPUs, every node pinned to one CPU.
pub(crate) struct Pinned<'a> {
    pub(crate) workload: &'a BenchWorkload,
    pub(crate) transport: &'a str,
    /// The model a `learned` run serves.
    pub(crate) model: Option<&'a std::path::Path>,
}

impl Pinned<'_> {
    /// One run's wall time, after checking the checksum.
    fn run(&self, nodes: u16, policy: &str, timeout: std::time::Duration) -> Result<f64> {
        self.run_observed(nodes, policy, timeout, Default::default())
    }

    fn run_observed(
        &self,
        nodes: u16,
        policy: &str,
        timeout: std::time::Duration,
        observe: crate::node::ObserveArgs,
    ) -> Result<f64> {
        self.run_measured(nodes, policy, timeout, observe)
            .map(|(ms, _)| ms)
    }

    /// One run's wall time and the medians of its cost samples.
    fn run_measured(
        &self,
        nodes: u16,
        policy: &str,
        timeout: std::time::Duration,
        observe: crate::node::ObserveArgs,
    ) -> Result<(f64, flotilla_telemetry::trace::Costs)> {
        let r = self.run_reported(nodes, policy, timeout, observe)?;
        Ok((r.wall_ms, crate::launch::measured_costs(&r.samples)))
    }

    /// One run, checked: the guest exited 0 with the host's checksum.
    pub(crate) fn run_reported(
        &self,
        nodes: u16,
        policy: &str,
        timeout: std::time::Duration,
        observe: crate::node::ObserveArgs,
    ) -> Result<crate::report::Reported> {
        let w = self.workload;
        let name = &w.name;
        let launch = Launch {
            transport: self.transport.to_string(),
            policy: policy.to_string(),
            model: (policy == flotilla_placement::LEARNED)
                .then(|| self.model.map(|m| m.to_path_buf()))
                .flatten(),
            timeout: Some(timeout),
            cpus_per_node: Some(1),
            observe,
            ..Launch::workload(name, w.args, nodes, 4, w.mem)
        };
        let r = crate::launch::launch(&launch)?;
        if let Err(e) = &r.result {
            bail!("{name} on {nodes} node(s), {policy}: the run failed: {e}");
        }
        if r.exit_code() != Some(0) || r.report != Some(w.reference) {
            bail!("{name} on {nodes} node(s), {policy}: the guest did not reproduce the host checksum");
        }
        Ok(r)
    }
}

fn scaling(a: ScalingArgs) -> Result<i32> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let names: Vec<String> = if a.workloads.is_empty() {
        SCALING_ARGS.iter().map(|(w, _)| w.to_string()).collect()
    } else {
        a.workloads.clone()
    };
    for p in &a.policies {
        flotilla_placement::by_name(p, 1, 0).map_err(|e| anyhow!("{e}"))?;
    }
    // Refuses, naming what the host gives, where 2 nodes × 1 CPU do not fit.
    crate::cpus::layout(&crate::cpus::allowed()?, 2, 1)?;
    let mut rows = Vec::new();
    for name in &names {
        let found = BenchWorkload::find(&SCALING_ARGS, name, 4)?;
        let args = found.args;
        let w = Pinned {
            workload: &found,
            transport: &a.transport,
            model: None,
        };
        // Interleaved: one node, then each policy on two, `runs` times over. A policy
        // whose run fails (or takes 20 times the 1-node time) is reported as failed and
        // not run again.
        let mut one = Vec::new();
        let mut two: Vec<Result<Vec<f64>, String>> = vec![Ok(Vec::new()); a.policies.len()];
        for _ in 0..a.runs {
            one.push(w.run(1, "heuristic", std::time::Duration::from_secs(300))?);
            let limit =
                std::time::Duration::from_secs_f64((median(one.clone()) * 20.0 / 1e3).max(10.0));
            for (i, p) in a.policies.iter().enumerate() {
                if let Ok(times) = &mut two[i] {
                    match w.run(2, p, limit) {
                        Ok(ms) => times.push(ms),
                        Err(e) => two[i] = Err(format!("{e:#}")),
                    }
                }
            }
        }
        let one = median(one);
        let mut per_policy = serde_json::Map::new();
        let mut best: Option<(String, f64)> = None;
        let mut line = format!("{name:<8} 1 node {one:>8.1} ms |");
        for (p, times) in a.policies.iter().zip(two) {
            let times = match times {
                Ok(t) => t,
                Err(e) => {
                    line += &format!(" {p} FAILED");
                    per_policy.insert(p.clone(), json!({"ms": null, "speedup": null, "error": e}));
                    continue;
                }
            };
            let ms = median(times);
            let speedup = one / ms;
            line += &format!(" {p} {ms:.1} ms ({speedup:.2}x)");
            if best.as_ref().is_none_or(|(_, s)| speedup > *s) {
                best = Some((p.clone(), speedup));
            }
            per_policy.insert(
                p.clone(),
                json!({"ms": round3(ms), "speedup": round3(speedup)}),
            );
        }
        if !a.json {
            crate::say_err(&line);
        }
        let (best_policy, best_speedup) = best.unwrap_or_default();
        rows.push(json!({
            "workload": name, "args": args,
            "one_node_ms": round3(one),
            "two_nodes": per_policy,
            "best_policy": best_policy,
            "best_speedup": round3(best_speedup),
        }));
    }
    let best: Vec<f64> = rows
        .iter()
        .filter_map(|r| r["best_speedup"].as_f64())
        .collect();
    let geomean = (best.iter().map(|s| s.ln()).sum::<f64>() / best.len().max(1) as f64).exp();
    let out = json!({
        "runs": a.runs, "vcpus": 4, "transport": a.transport, "cpus_per_node": 1,
        "workloads": rows,
        "geomean_best_speedup": round3(geomean),
    });
    if a.json {
        crate::say(&out.to_string());
    } else {
        crate::say_err(&format!(
            "geometric mean of the best speedups: {geomean:.2}"
        ));
    }
    Ok(0)
}

/// A synthetic trace of `events` touches: 4 vCPUs on 2 nodes over 256 MiB, each touching
/// mostly its own quarter of RAM (80 %), else anywhere; one touch in ten a write.
fn synthetic_trace(events: u64) -> flotilla_telemetry::trace::Trace {
    use flotilla_telemetry::trace::{Event, EventKind, RunMeta, Trace, TraceMeta, NONE16};
    let (vcpus, mem) = (4u32, 256u64 << 20);
    let pages = mem / 4096 - 512;
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let events = (0..events)
        .map(|i| {
            let vcpu = (i % vcpus as u64) as u16;
            let r = next();
            let page = 512
                + if r % 10 < 8 {
                    vcpu as u64 * pages / 4 + (r >> 8) % (pages / 4)
                } else {
                    (r >> 8) % pages
                };
            Event {
                t_ns: i * 250,
                page,
                vcpu,
                node: vcpu % 2,
                peer: NONE16,
                replicas: NONE16,
                kind: EventKind::AccessSample as u8,
                access: u8::from(r % 100 < 10),
                ..Default::default()
            }
        })
        .collect();
    Trace {
        meta: TraceMeta {
            workload: "synthetic".into(),
            nodes: 2,
            vcpus,
            mem_bytes: mem,
            run: Some(RunMeta {
                ram: "contiguous".into(),
                vcpu_nodes: vec![0, 1, 0, 1],
                ..Default::default()
            }),
            ..Default::default()
        },
        events,
    }
}

fn replay_bench(a: ReplayBenchArgs) -> Result<i32> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    flotilla_placement::by_name(&a.policy, 1, 0).map_err(|e| anyhow!("--policy: {e}"))?;
    let trace = match &a.trace {
        Some(p) => flotilla_telemetry::trace::read_file(p)
            .map_err(|e| anyhow!("trace {}: {e}", p.display()))?,
        None => synthetic_trace(a.events),
    };
    let shape = flotilla_sim::Shape::new(trace.meta.nodes, 1);
    let costs = flotilla_sim::Costs::from_trace(&trace);
    let mut rates = Vec::new();
    let mut touches = 0;
    for _ in 0..a.runs {
        let t = std::time::Instant::now();
        let out = flotilla_sim::replay(&trace, &shape, &costs, |n| {
            flotilla_placement::by_name(&a.policy, 1, n).expect("checked above")
        })
        .map_err(|e| anyhow!("replay: {e}"))?;
        touches = out.events;
        rates.push(out.events as f64 / t.elapsed().as_secs_f64());
    }
    let rate = median(rates.clone());
    if a.json {
        crate::say(
            &json!({
                "trace": a.trace.as_ref().map(|p| p.display().to_string()),
                "policy": a.policy,
                "touches": touches,
                "runs": a.runs,
                "events_per_s": rate.round(),
                "runs_events_per_s": rates.iter().map(|r| r.round()).collect::<Vec<_>>(),
            })
            .to_string(),
        );
    } else {
        crate::say_err(&format!(
            "replay: {touches} touches under {}, {:.2} M touches/s (median of {} runs on one core)",
            a.policy,
            rate / 1e6,
            a.runs
        ));
    }
    Ok(0)
}

/// Ranks (1-based, ties averaged) of `v`.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman's rank correlation of two samples (Pearson's on their ranks).
fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() < 2 || x.len() != y.len() {
        return None;
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let n = rx.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let cov: f64 = rx.iter().zip(&ry).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = rx.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = ry.iter().map(|b| (b - my).powi(2)).sum();
    (vx > 0.0 && vy > 0.0).then(|| cov / (vx * vy).sqrt())
}

fn sim_fidelity(a: FidelityArgs) -> Result<i32> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if !(1..=10_000).contains(&a.touch_epoch_ms) {
        bail!("--touch-epoch-ms: 1 to 10000");
    }
    for p in a.policies.iter().chain(std::iter::once(&a.record_policy)) {
        flotilla_placement::by_name(p, 1, 0).map_err(|e| anyhow!("{e}"))?;
    }
    crate::cpus::layout(&crate::cpus::allowed()?, 2, 1)?;
    let names: Vec<String> = if a.workloads.is_empty() {
        FIDELITY_ARGS.iter().map(|(w, _)| w.to_string()).collect()
    } else {
        a.workloads.clone()
    };
    let dir = private_dir()?;
    let result = sim_fidelity_in(&a, &names, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn sim_fidelity_in(a: &FidelityArgs, names: &[String], dir: &std::path::Path) -> Result<i32> {
    let (mut live_all, mut sim_all) = (Vec::new(), Vec::new());
    let (mut agree, mut judged) = (0usize, 0usize);
    let mut rows = Vec::new();
    for name in names {
        let found = BenchWorkload::find(&FIDELITY_ARGS, name, 4)?;
        let w = Pinned {
            workload: &found,
            transport: "tcp",
            model: None,
        };
        // The reference stream, recorded once under one policy.
        let file = dir.join(format!("{name}.ftrace"));
        let observe = crate::node::ObserveArgs {
            trace: Some(file.clone()),
            touch_epoch_ms: Some(a.touch_epoch_ms),
            ..Default::default()
        };
        w.run_observed(
            2,
            &a.record_policy,
            std::time::Duration::from_secs(600),
            observe,
        )?;
        let trace = flotilla_telemetry::trace::read_file(&file)
            .map_err(|e| anyhow!("trace {}: {e}", file.display()))?;
        let shape = flotilla_sim::Shape::new(2, 1);
        let one = w.run(1, "heuristic", std::time::Duration::from_secs(300))?;
        // The recording ran slow, and so did its engine: costs come from a plain run
        // under the recording policy, and compute is scaled to the measured 1-node run.
        let (_, measured) = w.run_measured(
            2,
            &a.record_policy,
            std::time::Duration::from_secs(600),
            Default::default(),
        )?;
        let mut costs = flotilla_sim::Costs::measured(&measured);
        costs.compute_scale = flotilla_sim::calibrate_compute(&trace, 1, &costs, one)
            .map_err(|e| anyhow!("calibrating on {name}: {e}"))?;
        let limit = std::time::Duration::from_secs_f64((one * 20.0 / 1e3).max(10.0));
        let mut per_policy = serde_json::Map::new();
        // The fastest policy, live and simulated: (ms, name).
        let mut best_live: Option<(f64, &str)> = None;
        let mut best_sim: Option<(f64, &str)> = None;
        for p in &a.policies {
            let mut times = Vec::new();
            let mut failed = None;
            for _ in 0..a.runs {
                match w.run(2, p, limit) {
                    Ok(ms) => times.push(ms),
                    Err(e) => {
                        failed = Some(format!("{e:#}"));
                        break;
                    }
                }
            }
            let predicted = flotilla_sim::replay(&trace, &shape, &costs, |n| {
                flotilla_placement::by_name(p, 1, n).expect("checked above")
            })
            .map_err(|e| anyhow!("replaying {name} under {p}: {e}"))?;
            let sim_ms = predicted.wall_ms;
            if best_sim.is_none_or(|(b, _)| sim_ms < b) {
                best_sim = Some((sim_ms, p));
            }
            match failed {
                Some(e) => {
                    per_policy.insert(
                        p.clone(),
                        json!({"live_ms": null, "sim_ms": round3(sim_ms), "error": e}),
                    );
                }
                None => {
                    let live = median(times);
                    live_all.push(live);
                    sim_all.push(sim_ms);
                    if best_live.is_none_or(|(b, _)| live < b) {
                        best_live = Some((live, p));
                    }
                    per_policy.insert(
                        p.clone(),
                        json!({"live_ms": round3(live), "sim_ms": round3(sim_ms),
                               "error_pct": round3((sim_ms - live) / live * 100.0)}),
                    );
                }
            }
        }
        // What looking ahead would cost: the gap to the best policy is what a learned
        // policy can win.
        let (oracle, _) = flotilla_sim::replay_labelled(
            &trace,
            &shape,
            &costs,
            flotilla_sim::Decider::Oracle,
            flotilla_sim::LookAhead::fixed(flotilla_sim::DEFAULT_HORIZON),
            false,
        )
        .map_err(|e| anyhow!("replaying {name} under the oracle: {e}"))?;
        let winners = (best_live.map(|b| b.1), best_sim.map(|b| b.1));
        if let (Some(l), Some(s)) = winners {
            judged += 1;
            agree += usize::from(l == s);
        }
        if !a.json {
            crate::say_err(&format!(
                "{name:<8} live winner {:?}, simulated winner {:?}",
                winners.0, winners.1
            ));
        }
        rows.push(json!({
            "workload": name, "args": found.args, "touches": trace.events.len(),
            "one_node_ms": round3(one), "compute_scale": round3(costs.compute_scale),
            "oracle_sim_ms": round3(oracle.wall_ms),
            "policies": per_policy,
            "live_winner": winners.0, "sim_winner": winners.1,
        }));
    }
    let rho = spearman(&live_all, &sim_all);
    let mape = (!live_all.is_empty()).then(|| {
        live_all
            .iter()
            .zip(&sim_all)
            .map(|(l, s)| ((s - l) / l).abs())
            .sum::<f64>()
            / live_all.len() as f64
            * 100.0
    });
    let agreement = (judged > 0).then(|| agree as f64 / judged as f64);
    let out = json!({
        "spearman_rho": rho.map(round3), "mape": mape.map(round3),
        "winner_agreement": agreement.map(round3),
        "pairs": live_all.len(), "runs": a.runs, "record_policy": a.record_policy,
        "touch_epoch_ms": a.touch_epoch_ms, "workloads": rows,
    });
    if a.json {
        crate::say(&out.to_string());
    } else {
        crate::say_err(&format!(
            "Spearman rho {}, MAPE {} %, winner agreement {} ({} pairs)",
            rho.map_or("-".into(), |r| format!("{r:.2}")),
            mape.map_or("-".into(), |m| format!("{m:.0}")),
            agreement.map_or("-".into(), |g| format!("{g:.2}")),
            live_all.len()
        ));
    }
    Ok(0)
}

/// Times every `decide` of the policy it measures into a shared list (ns), and returns
/// the driver's decision: every policy is timed on the same faults, the driver's
/// trajectory (a policy that gathers the vCPUs at once would otherwise decide a handful).
struct Timed {
    measured: Box<dyn flotilla_placement::Policy>,
    driver: Box<dyn flotilla_placement::Policy>,
    ns: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
    local: Vec<u32>,
}

impl flotilla_placement::Policy for Timed {
    fn name(&self) -> &'static str {
        self.driver.name()
    }
    fn decide(&mut self, f: &flotilla_placement::FaultContext<'_>) -> flotilla_placement::Decision {
        let t = std::time::Instant::now();
        let d = self.measured.decide(f);
        self.local
            .push(t.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        std::hint::black_box(d);
        self.driver.decide(f)
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        if let Ok(mut all) = self.ns.lock() {
            all.append(&mut self.local);
        }
    }
}

/// The `q` quantile of sorted `v`.
fn quantile(v: &[u32], q: f64) -> u32 {
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn policy_bench(a: PolicyBenchArgs) -> Result<i32> {
    let trace = flotilla_telemetry::trace::read_file(&a.trace)
        .map_err(|e| anyhow!("trace {}: {e}", a.trace.display()))?;
    let (nodes, cpus) = crate::dataset::recorded_shape(&trace);
    let shape = flotilla_sim::Shape::new(nodes, cpus);
    let costs = flotilla_sim::Costs::from_trace(&trace);
    // What the clock itself costs: two reads back to back.
    let mut clock: Vec<u32> = (0..100_000)
        .map(|_| {
            let t = std::time::Instant::now();
            t.elapsed().as_nanos() as u32
        })
        .collect();
    clock.sort_unstable();
    let mut rows = Vec::new();
    for name in &a.policies {
        if name == flotilla_placement::LEARNED && a.model.is_none() {
            crate::say_err("bench policy: learned left out (give --model FILE)");
            continue;
        }
        let model = (name == flotilla_placement::LEARNED)
            .then_some(a.model.as_deref())
            .flatten();
        let choice = crate::policy::Choice::new(name, trace.meta.seed, model)?;
        let driver = crate::policy::Choice::new(&a.driver, trace.meta.seed, None)
            .map_err(|e| anyhow!("--driver: {e:#}"))?;
        let ns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for _ in 0..a.runs {
            flotilla_sim::replay(&trace, &shape, &costs, |n| {
                Box::new(Timed {
                    measured: choice.make(n),
                    driver: driver.make(n),
                    ns: ns.clone(),
                    local: Vec::new(),
                })
            })
            .map_err(|e| anyhow!("replaying {} under {name}: {e}", a.trace.display()))?;
        }
        let mut v = std::mem::take(&mut *ns.lock().map_err(|_| anyhow!("poisoned"))?);
        if v.is_empty() {
            bail!("{}: no fault was decided under {name}", a.trace.display());
        }
        v.sort_unstable();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        rows.push(json!({
            "policy": name,
            "decisions": v.len(),
            "p50_ns": quantile(&v, 0.5),
            "p99_ns": quantile(&v, 0.99),
            "max_ns": v[v.len() - 1],
            "mean_ns": mean.round(),
        }));
    }
    let out = json!({
        "trace": a.trace.display().to_string(),
        "nodes": nodes,
        "cpus_per_node": cpus,
        "driver": a.driver,
        "clock_p50_ns": quantile(&clock, 0.5),
        "policies": rows,
    });
    if a.json {
        crate::say(&out.to_string());
    } else {
        crate::say(&format!(
            "decision latency on {} ({nodes} nodes; timing includes the clock, p50 {} ns):",
            a.trace.display(),
            quantile(&clock, 0.5)
        ));
        crate::say("policy           decisions    p50 ns   p99 ns   max ns");
        for r in &rows {
            crate::say(&format!(
                "{:<16} {:>9} {:>9} {:>8} {:>8}",
                r["policy"].as_str().unwrap_or(""),
                r["decisions"],
                r["p50_ns"],
                r["p99_ns"],
                r["max_ns"]
            ));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod fidelity_tests {
    use super::*;

    #[test]
    fn spearman_of_ranks() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), Some(1.0));
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]), Some(-1.0));
        assert_eq!(ranks(&[5.0, 1.0, 5.0]), vec![2.5, 1.0, 2.5]);
        assert_eq!(spearman(&[1.0], &[1.0]), None);
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
    }
}
