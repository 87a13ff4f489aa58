//! `flotilla dataset build`: training data for a learned policy. Every reference-stream
//! trace of a directory is replayed under the oracle on several cluster shapes and link
//! costs; every decided fault becomes a row (its features, the look-ahead cost of each
//! choice) in one Parquet file per (trace, shape, link), with `manifest.json` saying what
//! went in. Deterministic: the oracle is, and the seeded subsampling of `--max-rows` too.

use crate::ab::{calibrated, read_calibration, reference_traces};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use flotilla_placement::features::{FEATURE_NAMES, FEATURE_VERSION};
use flotilla_sim::Shape;
use flotilla_telemetry::trace::Trace;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

#[derive(Subcommand, Debug)]
pub enum DatasetCmd {
    /// Oracle-labelled faults of a trace directory, as Parquet and a manifest.
    Build(BuildArgs),
}

/// What the labels are made of: the traces, the cluster shapes and links they are
/// replayed on, whose decisions drive the replays, and how each choice is priced.
#[derive(Args, Debug, Clone)]
pub struct LabelArgs {
    /// Directory of reference-stream traces (with its calibration.json).
    #[arg(long, default_value = "datasets/traces")]
    pub traces: PathBuf,
    /// Cluster shapes, NODESxCPUS, comma-separated. The trace's own shape replays the guest
    /// as recorded; the others start its vCPUs round-robin and its RAM interleaved.
    #[arg(long, value_delimiter = ',', default_value = "2x1,4x1,8x1,16x1")]
    pub shapes: Vec<String>,
    /// One-way link latencies to replay, µs, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "3,15,100")]
    pub link_us: Vec<u64>,
    /// Whose decisions drive each labelled replay, comma-separated: `oracle` (the cheaper
    /// choice by look-ahead) or any policy; every decided fault of every such replay is
    /// labelled by the same look-ahead. Replays under other policies cover the states a
    /// learned policy meets when it is not the oracle (vCPUs spread, pages shared, a vCPU
    /// that has just moved), which the oracle's own replays leave out.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "oracle,always-page,heuristic,random,always-vcpu"
    )]
    pub behaviour: Vec<String>,
    /// The stateless policy that decides the later faults of each look-ahead: a label is
    /// then its cost-to-go after each choice, and a model trained on the labels aims at a
    /// one-step improvement on it (`always-page`: the fixed continuation).
    #[arg(long, default_value = "heuristic", value_name = "POLICY")]
    pub continuation: String,
    /// Only these workloads (default: every workload with a trace).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Touches per vCPU of each look-ahead.
    #[arg(long, default_value_t = flotilla_sim::DEFAULT_HORIZON as u64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub horizon: u64,
    /// At most this many rows per file, drawn (seeded) when a replay labels more.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_rows: u64,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    #[command(flatten)]
    pub labels: LabelArgs,
    /// Output directory (created; files of an earlier build are replaced).
    #[arg(long, short, value_name = "DIR")]
    pub out: PathBuf,
    /// Seed of the subsampling.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Replays run at once (default: the CPUs this process may use).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub jobs: Option<u64>,
}

pub fn dataset(c: DatasetCmd) -> Result<i32> {
    match c {
        DatasetCmd::Build(a) => {
            let out = a.out.clone();
            let (files, rows) = build(a)?;
            crate::say(&format!(
                "{files} files, {rows} labelled faults, in {} (manifest.json says what went in)",
                out.display()
            ));
            Ok(0)
        }
    }
}

/// `NxC`, checked.
pub(crate) fn parse_shape(s: &str) -> Result<(u16, u32)> {
    let (n, c) = s
        .split_once('x')
        .ok_or_else(|| anyhow!("shape {s}: write NODESxCPUS, as 4x1"))?;
    let nodes: u16 = n
        .parse()
        .ok()
        .filter(|n| (1..=64).contains(n))
        .ok_or_else(|| anyhow!("shape {s}: nodes must be 1..=64"))?;
    let cpus: u32 = c
        .parse()
        .ok()
        .filter(|c| (1..=1024).contains(c))
        .ok_or_else(|| anyhow!("shape {s}: CPUs per node must be 1..=1024"))?;
    Ok((nodes, cpus))
}

/// The recorded run's shape: its nodes, and the CPUs of its first node's set (1 unpinned).
pub(crate) fn recorded_shape(t: &Trace) -> (u16, u32) {
    let cpus = t
        .meta
        .run
        .as_ref()
        .and_then(|r| r.cpu_sets.first().map(|s| s.len() as u32))
        .filter(|&c| c > 0)
        .unwrap_or(1);
    (t.meta.nodes, cpus)
}

/// `nodes × cpus` for replaying `t`: as recorded on the recorded shape, else with vCPUs
/// round-robin and RAM interleaved, so the guest's data spreads over the whole cluster.
pub(crate) fn lab_shape(t: &Trace, nodes: u16, cpus: u32) -> Shape {
    if (nodes, cpus) == recorded_shape(t) {
        Shape::new(nodes, cpus)
    } else {
        Shape {
            ram: Some(flotilla_sim::Ram::Interleave),
            spread: true,
            ..Shape::new(nodes, cpus)
        }
    }
}

/// The costs of replaying `t` (`file` in a directory with `calibration`) over a link of
/// `link_us` one way.
pub(crate) fn lab_costs(
    t: &Trace,
    file: &str,
    calibration: &serde_json::Map<String, Value>,
    link_us: u64,
) -> Result<flotilla_sim::Costs> {
    Ok(over_link(
        t,
        calibrated(t, calibration.get(file)).map_err(|e| anyhow!("calibrating on {file}: {e}"))?,
        link_us,
    ))
}

/// `costs` of trace `t` on a link of `link_us` one way in place of the recorded run's
/// (its emulated delay, 0 for plain loopback).
pub(crate) fn over_link(
    t: &Trace,
    costs: flotilla_sim::Costs,
    link_us: u64,
) -> flotilla_sim::Costs {
    let recorded = t.meta.run.as_ref().map_or(0, |r| r.link_delay_ns) as i64;
    costs.with_link_delta(link_us as i64 * 1000 - recorded)
}

struct Job {
    trace: usize,
    behaviour: usize,
    nodes: u16,
    cpus: u32,
    link_us: u64,
}

/// Builds the dataset; how many files and rows it wrote.
pub(crate) fn build(b: BuildArgs) -> Result<(usize, u64)> {
    let a = &b.labels;
    let names: Vec<String> = if a.workloads.is_empty() {
        flotilla_workloads::Workload::ALL
            .iter()
            .map(|w| w.name().to_string())
            .collect()
    } else {
        a.workloads.clone()
    };
    let shapes = a
        .shapes
        .iter()
        .map(|s| parse_shape(s))
        .collect::<Result<Vec<_>>>()?;
    if shapes.is_empty() || a.link_us.is_empty() {
        bail!("give at least one --shapes and one --link-us");
    }
    if let Some(us) = a.link_us.iter().find(|&&us| us > 1_000_000) {
        bail!("--link-us {us}: at most 1000000 µs");
    }
    if a.behaviour.is_empty() {
        bail!("--behaviour: give at least one policy, or oracle");
    }
    let behaviours = a
        .behaviour
        .iter()
        .map(|b| {
            if b == "oracle" {
                Ok(None)
            } else {
                crate::policy::Choice::new(b, 1, None)
                    .map(Some)
                    .map_err(|e| anyhow!("--behaviour: {e:#}"))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    // Checked here, made per replay.
    crate::policy::Continuation::new(&a.continuation, 1, None)?;
    let traces = reference_traces(&a.traces, &names)?;
    let calibration = read_calibration(&a.traces)?;
    std::fs::create_dir_all(&b.out)
        .with_context(|| format!("--out {}: cannot create it", b.out.display()))?;
    let mut jobs = Vec::new();
    for (i, _) in traces.iter().enumerate() {
        for behaviour in 0..behaviours.len() {
            for &(nodes, cpus) in &shapes {
                for &link_us in &a.link_us {
                    jobs.push(Job {
                        trace: i,
                        behaviour,
                        nodes,
                        cpus,
                        link_us,
                    });
                }
            }
        }
    }
    let workers = b.jobs.map_or_else(cpus, |j| j as usize);
    let files = on_every_cpu(&jobs, workers, "replays", |job| {
        let (path, trace) = &traces[job.trace];
        one(&b, path, trace, &calibration, job, &behaviours)
    })?;
    let rows: u64 = files.iter().filter_map(|f| f["rows"].as_u64()).sum();
    let manifest = json!({
        "feature_version": FEATURE_VERSION,
        "features": FEATURE_NAMES,
        "traces_dir": a.traces.display().to_string(),
        "traces": traces.iter().map(|(p, t)| json!({
            "file": p.file_name().and_then(|n| n.to_str()),
            "workload": t.meta.workload,
            "nodes": t.meta.nodes,
            "events": t.events.len(),
        })).collect::<Vec<_>>(),
        "behaviour": a.behaviour,
        "continuation": a.continuation,
        "shapes": a.shapes,
        "link_us": a.link_us,
        "horizon": a.horizon,
        "max_rows": a.max_rows,
        "seed": b.seed,
        "rows": rows,
        "files": files,
    });
    let path = b.out.join("manifest.json");
    std::fs::write(&path, serde_json::to_string_pretty(&manifest)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok((files.len(), rows))
}

/// One oracle replay, written as one Parquet file; its manifest entry.
fn one(
    b: &BuildArgs,
    path: &Path,
    trace: &Trace,
    calibration: &serde_json::Map<String, Value>,
    job: &Job,
    behaviours: &[Option<crate::policy::Choice>],
) -> Result<Value> {
    let a = &b.labels;
    let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let stem = file.trim_end_matches(".gz").trim_end_matches(".ftrace");
    let shape = lab_shape(trace, job.nodes, job.cpus);
    let costs = lab_costs(trace, file, calibration, job.link_us)?;
    let behaviour = behaviours[job.behaviour]
        .as_ref()
        .map(|c| c.with_seed(trace.meta.seed));
    let by = a.behaviour[job.behaviour].as_str();
    let mut make = |n| behaviour.as_ref().expect("a policy").make(n);
    let decider = match &behaviour {
        None => flotilla_sim::Decider::Oracle,
        Some(_) => flotilla_sim::Decider::Policy(&mut make),
    };
    let cont = crate::policy::Continuation::new(&a.continuation, trace.meta.seed, None)?;
    let (out, mut labels) = flotilla_sim::replay_labelled(
        trace,
        &shape,
        &costs,
        decider,
        cont.look_ahead(a.horizon as usize),
        true,
    )
    .map_err(|e| {
        anyhow!(
            "replaying {file} on {}x{} under {by}: {e}",
            job.nodes,
            job.cpus
        )
    })?;
    let labelled = labels.len();
    let name = format!(
        "{stem}-{}x{}-l{}-{by}.parquet",
        job.nodes, job.cpus, job.link_us
    );
    if labels.len() as u64 > a.max_rows {
        let mut rng = flotilla_learned::train::Rng(b.seed ^ fnv(&name));
        let keep = sample(labels.len(), a.max_rows as usize, &mut rng);
        labels = keep.into_iter().map(|i| labels[i].clone()).collect();
    }
    let out_path = b.out.join(&name);
    let f = std::fs::File::create(&out_path)
        .with_context(|| format!("creating {}", out_path.display()))?;
    let extra = [
        ("link_us", job.link_us.to_string()),
        ("trace", file.to_string()),
        ("seed", b.seed.to_string()),
        ("continuation", a.continuation.clone()),
    ];
    crate::labels::write(f, &labels, trace, by, &shape, a.horizon, &extra)
        .map_err(|e| anyhow!("{}: {e}", out_path.display()))?;
    Ok(json!({
        "file": name,
        "trace": file,
        "workload": trace.meta.workload,
        "nodes": job.nodes,
        "cpus_per_node": job.cpus,
        "link_us": job.link_us,
        "behaviour": by,
        "labelled": labelled,
        "rows": labels.len(),
        "wall_ms": crate::bench::round3(out.wall_ms),
    }))
}

/// The CPUs this process may use.
pub(crate) fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `f` of every job, on `workers` threads, in the jobs' order; the first error, if any.
/// A bar counts them (`what`) when stderr is a terminal.
pub(crate) fn on_every_cpu<J: Sync, R: Send>(
    jobs: &[J],
    workers: usize,
    what: &str,
    f: impl Fn(&J) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<R>>>> = Mutex::new(jobs.iter().map(|_| None).collect());
    let bar = crate::replay::counting_bar(jobs.len() as u64, what);
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, jobs.len().max(1)) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(job) = jobs.get(k) else { break };
                let r = f(job);
                if let Ok(mut all) = results.lock() {
                    all[k] = Some(r);
                }
                if let Some(p) = &bar {
                    p.inc(1);
                }
            });
        }
    });
    if let Some(p) = bar {
        p.finish_and_clear();
    }
    results
        .into_inner()
        .map_err(|_| anyhow!("a {what} job panicked"))?
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow!("a {what} job did not finish"))))
        .collect()
}

/// `k` of `0..n` without replacement, in order.
fn sample(n: usize, k: usize, rng: &mut flotilla_learned::train::Rng) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k.min(n) {
        let j = i + (rng.next_u64() % (n - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(k.min(n));
    idx.sort_unstable();
    idx
}

/// FNV-1a of a name: a per-file seed that does not depend on which thread ran it.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parse_and_bad_ones_say_why() {
        assert_eq!(parse_shape("4x1").unwrap(), (4, 1));
        assert_eq!(parse_shape("16x4").unwrap(), (16, 4));
        for bad in ["4", "0x1", "65x1", "4x0", "ax1", "4x"] {
            assert!(parse_shape(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_sample_is_sorted_distinct_and_seeded() {
        let a = sample(1000, 50, &mut flotilla_learned::train::Rng(3));
        let b = sample(1000, 50, &mut flotilla_learned::train::Rng(3));
        assert_eq!(a, b);
        assert_eq!(a.len(), 50);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(sample(5, 10, &mut flotilla_learned::train::Rng(1)).len(), 5);
    }
}
