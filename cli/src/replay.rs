//! `flotilla replay TRACE`: what would the recorded run have cost under another policy, on
//! another cluster? The trace-driven simulator (`flotilla_sim`) replays the trace's
//! touches (a reference stream when it was recorded with `--touch-epoch-ms`).

use anyhow::{anyhow, bail, Result};
use clap::Args;
use flotilla_sim::{Costs, Shape};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The trace (*.ftrace or *.ftrace.gz).
    pub trace: PathBuf,
    /// Placement policy (default: the one the trace was recorded under), or `oracle`:
    /// at each fault, the cheaper choice by looking ahead (docs/simulator.md).
    #[arg(long)]
    pub policy: Option<String>,
    /// The ONNX model of `--policy learned`.
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Nodes of the simulated cluster (default: the trace's).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub nodes: Option<u16>,
    /// CPUs per node (default: the trace's CPU sets, or 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub cpus_per_node: Option<u32>,
    /// Initial spread of guest RAM in the simulated cluster: contiguous or interleave
    /// (default: the recorded run's).
    #[arg(long, value_name = "LAYOUT")]
    pub ram: Option<String>,
    /// Start the vCPUs round-robin over the simulated cluster's nodes, not where the
    /// recorded run started them.
    #[arg(long)]
    pub spread: bool,
    /// One-way link latency to simulate, in µs, in place of the recorded run's link
    /// (its emulated delay, 0 for plain loopback): every round trip changes by twice the
    /// difference.
    #[arg(long, value_name = "US", value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub link_us: Option<u64>,
    /// The measured run time of the same guest on one node pinned to one CPU (`--nodes 1
    /// --cpus-per-node 1`): calibrates the compute time between touches, which a
    /// reference-stream recording inflates.
    #[arg(long, value_name = "MS")]
    pub one_node_ms: Option<f64>,
    /// A `calibration.json` (as `datasets/record.py` writes beside its traces): the costs
    /// of a plain run and the 1-node time for this trace's file name, in place of the
    /// trace's own (a recording's engine runs slow). `--one-node-ms` still wins.
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
    /// Write a label for every fault a policy decides to FILE (Parquet): its features
    /// (`flotilla_placement::features`) and the cost of each choice by look-ahead.
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
    /// Touches per vCPU each look-ahead plays (the oracle and --labels).
    #[arg(long, default_value_t = flotilla_sim::DEFAULT_HORIZON as u64, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub horizon: u64,
    /// The policy that decides the later faults of each look-ahead (a stateless one:
    /// always-page, always-vcpu, heuristic, learned): with it, a label is that policy's
    /// cost-to-go after each choice (docs/simulator.md).
    #[arg(long, default_value = "always-page", value_name = "POLICY")]
    pub continuation: String,
    /// Print exactly one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn replay(a: ReplayArgs) -> Result<i32> {
    let trace = flotilla_telemetry::trace::read_file(&a.trace)
        .map_err(|e| anyhow!("trace {}: {e}", a.trace.display()))?;
    let meta = &trace.meta;
    let policy = a.policy.clone().unwrap_or_else(|| meta.policy.clone());
    let oracle = policy == "oracle";
    let choice = if oracle {
        if a.model.is_some() {
            bail!("--model is only for --policy learned (the policy is oracle)");
        }
        None
    } else {
        Some(
            crate::policy::Choice::new(&policy, meta.seed, a.model.as_deref())
                .map_err(|e| anyhow!("{e:#} (or oracle, in replay)"))?,
        )
    };
    // Fail on an unwritable labels file before a long replay, not after.
    let labels_file = a
        .labels
        .as_ref()
        .map(|p| std::fs::File::create(p).map_err(|e| anyhow!("--labels {}: {e}", p.display())))
        .transpose()?;
    let run = meta.run.as_ref();
    let shape = Shape {
        ram: match a.ram.as_deref() {
            None => None,
            Some("contiguous") => Some(flotilla_sim::Ram::Contiguous),
            Some("interleave") => Some(flotilla_sim::Ram::Interleave),
            Some(other) => bail!("--ram {other}: contiguous or interleave"),
        },
        spread: a.spread,
        ..Shape::new(
            a.nodes.unwrap_or(meta.nodes),
            a.cpus_per_node
                .unwrap_or_else(|| crate::dataset::recorded_shape(&trace).1),
        )
    };
    let mut costs = match &a.calibration {
        None => Costs::from_trace(&trace),
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| anyhow!("--calibration {}: {e}", file.display()))?;
            let all: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow!("--calibration {}: {e}", file.display()))?;
            let name = a.trace.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let entry = all
                .get(name)
                .ok_or_else(|| anyhow!("--calibration {}: no entry for {name}", file.display()))?;
            crate::ab::calibrated(&trace, Some(entry))
                .map_err(|e| anyhow!("--calibration {}: {name}: {e}", file.display()))?
        }
    };
    if let Some(us) = a.link_us {
        costs = crate::dataset::over_link(&trace, costs, us);
    }
    if let Some(ms) = a.one_node_ms {
        if !(ms > 0.0 && ms.is_finite()) {
            bail!("--one-node-ms {ms}: give a positive time in milliseconds");
        }
        costs.compute_scale = flotilla_sim::calibrate_compute(&trace, 1, &costs, ms)
            .map_err(|e| anyhow!("calibrating on {}: {e}", a.trace.display()))?;
    }
    if trace.events.is_empty() {
        bail!("trace {}: no events to replay", a.trace.display());
    }
    let started = Instant::now();
    let mut make = |n| choice.as_ref().expect("not the oracle").make(n);
    let decider = if oracle {
        flotilla_sim::Decider::Oracle
    } else {
        flotilla_sim::Decider::Policy(&mut make)
    };
    let cont = crate::policy::Continuation::new(&a.continuation, meta.seed, a.model.as_deref())?;
    let mut bar = Bar::new(started);
    let mut progress = |done, total| bar.update(done, total);
    let (out, labels) = if oracle || labels_file.is_some() {
        flotilla_sim::replay_labelled_with(
            &trace,
            &shape,
            &costs,
            decider,
            cont.look_ahead(a.horizon as usize),
            labels_file.is_some(),
            &mut progress,
        )
    } else {
        flotilla_sim::replay_with(&trace, &shape, &costs, &mut make, &mut progress)
            .map(|o| (o, Vec::new()))
    }
    .map_err(|e| anyhow!("replaying {}: {e}", a.trace.display()))?;
    bar.finish();
    if let (Some(file), Some(path)) = (labels_file, &a.labels) {
        crate::labels::write(file, &labels, &trace, &policy, &shape, a.horizon, &[])
            .map_err(|e| anyhow!("--labels {}: {e}", path.display()))?;
    }
    let took = started.elapsed().as_secs_f64();
    let rate = out.events as f64 / took.max(1e-9);
    let reference = run.is_some_and(|r| r.touch_epoch_ns > 0);
    if a.json {
        let v = json!({
            "trace": a.trace.display().to_string(),
            "workload": meta.workload,
            "policy": policy,
            "recorded_policy": meta.policy,
            "nodes": shape.nodes,
            "cpus_per_node": shape.cpus,
            "link_us": a.link_us,
            "reference_stream": reference,
            "compute_scale": costs.compute_scale,
            "wall_ms": out.wall_ms,
            "stall_ms": out.stall_ms,
            "remote_faults": out.remote_faults,
            "page_moves": out.page_moves,
            "replicas_made": out.replicas_made,
            "invalidations": out.invalidations,
            "vcpu_moves": out.vcpu_moves,
            "pages_claimed": out.pages_claimed,
            "bytes_sent": out.bytes_sent,
            "events": out.events,
            "labels": a.labels.as_ref().map(|_| labels.len()),
            "horizon": (oracle || a.labels.is_some()).then_some(a.horizon),
            "replay_events_per_s": rate.round(),
            "costs_ns": {
                "fetch": costs.fetch_ns, "upgrade": costs.upgrade_ns,
                "invalidate": costs.invalidate_ns, "move": costs.move_ns,
            },
        });
        crate::say(&v.to_string());
    } else {
        crate::say(&format!(
            "{} replayed under {policy} on {} nodes × {} CPU{}: predicted {:.1} ms ({:.1} ms stalled)",
            if meta.workload.is_empty() { &meta.image } else { &meta.workload },
            shape.nodes,
            shape.cpus,
            if shape.cpus == 1 { "" } else { "s" },
            out.wall_ms,
            out.stall_ms
        ));
        crate::say(&format!(
            "  remote faults {}, page moves {} ({} replicas), invalidations {}, vCPU moves {}, {} bytes sent",
            out.remote_faults, out.page_moves, out.replicas_made, out.invalidations, out.vcpu_moves, out.bytes_sent
        ));
        crate::say(&format!(
            "  {} touches{} in {:.3} s ({:.1} M events/s)",
            out.events,
            if reference {
                " (reference stream)"
            } else {
                " (faults and samples only: not a reference stream)"
            },
            took,
            rate / 1e6
        ));
    }
    Ok(0)
}

/// A progress bar on stderr, for a replay that has run longer than a second, when stderr
/// is a terminal.
struct Bar {
    started: Instant,
    shown: Option<indicatif::ProgressBar>,
    terminal: bool,
}

impl Bar {
    fn new(started: Instant) -> Bar {
        use std::io::IsTerminal;
        Bar {
            started,
            shown: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        if !self.terminal {
            return;
        }
        if self.shown.is_none() && self.started.elapsed().as_secs_f64() >= 1.0 {
            let b = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} touches, {per_sec}, {eta} left",
            ) {
                b.set_style(style);
            }
            self.shown = Some(b);
        }
        if let Some(b) = &self.shown {
            b.set_position(done);
        }
    }

    fn finish(self) {
        if let Some(b) = self.shown {
            b.finish_and_clear();
        }
    }
}

/// A bar counting `len` `what` on stderr when it is a terminal (else none).
pub(crate) fn counting_bar(len: u64, what: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(len);
    let template = format!("{{elapsed_precise}} [{{bar:40}}] {{pos}}/{{len}} {what}, {{eta}} left");
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        b.set_style(style);
    }
    Some(b)
}
