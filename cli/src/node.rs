//! `flotilla node --config FILE [--id N]`: one node of a cluster whose nodes are listed in
//! FILE (README.md, "Cluster configuration"). Node 0 prints the run's result as one JSON
//! line on stdout, the same object as `flotilla run --json`.
//!
//! `flotilla run` starts its nodes with the hidden `--launched`: the secret and the
//! configuration then arrive on standard input (so neither is ever on disk), and node 0
//! answers with the internal line of [`crate::report`] instead.

use crate::config::{self, ClusterFile, SecretSource};
use crate::report::{self, Reported, RunInfo};
use anyhow::{Context, Result};
use clap::Args;
use flotilla_engine::cluster::{self, Observe, TraceSetup};
use flotilla_workloads::native;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct NodeArgs {
    /// Cluster configuration file (see README.md).
    #[arg(long)]
    pub config: PathBuf,
    /// This node's id (default: the file's `id`).
    #[arg(long)]
    pub id: Option<u16>,
    #[command(flatten)]
    pub observe: ObserveArgs,
    /// Report a health signal with this value whatever /sys says, e.g.
    /// edac_uncorrectable_errors=3 (repeatable; for tests and drills).
    #[arg(long, value_parser = flotilla_telemetry::health::parse_injection)]
    pub inject_health: Vec<(String, f64)>,
    /// Read health signals from this directory instead of /sys.
    #[arg(long)]
    pub sysfs_root: Option<PathBuf>,
    /// Started by `flotilla run`: standard input carries the secret (one line) and then
    /// the configuration (`--config -`); node 0 answers with the internal result line.
    #[arg(long, hide = true)]
    pub launched: bool,
}

/// Telemetry options shared by `flotilla node` and `flotilla run`.
#[derive(Args, Clone, Debug, Default)]
pub struct ObserveArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics. For `flotilla run`, the base
    /// address: node K listens on port + K.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Keep serving metrics this many seconds after the run (for scrape intervals
    /// longer than the run).
    #[arg(long, value_name = "SECONDS", requires = "metrics", value_parser = parse_linger)]
    pub metrics_linger: Option<f64>,
    /// Record a fault trace into FILE (docs/trace-format.md).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Sampled access tracking: pages armed per second per node (0 = off).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub sample_rate: u32,
    /// Reference-stream recording (slow): every MS milliseconds each node arms every page
    /// it holds, so the trace has each page's first touch in each epoch by a vCPU of
    /// that node, whatever the policy moved (docs/telemetry.md). Needs --trace.
    #[arg(
        long,
        value_name = "MS",
        conflicts_with = "sample_rate",
        requires = "trace",
        value_parser = clap::value_parser!(u32).range(1..=10_000)
    )]
    pub touch_epoch_ms: Option<u32>,
}

fn parse_linger(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}': give 0 to 3600 seconds")),
    }
}

impl ObserveArgs {
    pub fn any(&self) -> bool {
        self.metrics.is_some()
            || self.trace.is_some()
            || self.sample_rate > 0
            || self.touch_epoch_ms.is_some()
    }
}

/// Reads the configuration (and, when launched, the secret first) as `flotilla node` got it.
fn read_config(args: &NodeArgs) -> Result<(ClusterFile, Option<String>)> {
    if args.launched {
        let mut stdin = std::io::stdin().lock();
        let mut secret = String::new();
        stdin
            .read_line(&mut secret)
            .context("reading the cluster secret from standard input")?;
        let mut text = String::new();
        stdin
            .read_line(&mut text)
            .context("reading the cluster configuration from standard input")?;
        let file =
            serde_json::from_str(&text).context("cluster configuration on standard input")?;
        return Ok((file, Some(secret)));
    }
    let text = std::fs::read_to_string(&args.config).with_context(|| {
        format!(
            "cannot read cluster configuration {}",
            args.config.display()
        )
    })?;
    let file = serde_json::from_str(&text)
        .with_context(|| format!("cluster configuration {}", args.config.display()))?;
    Ok((file, None))
}

/// `flotilla node`.
pub fn node(args: NodeArgs) -> Result<i32> {
    let (file, secret) = read_config(&args)?;
    let source = match &secret {
        Some(s) => SecretSource::Given(s.as_bytes()),
        None => SecretSource::File,
    };
    let mut setup = config::setup(&file, args.id, source)?;
    drop(secret);
    let me = setup.me;
    if let Some(per_node) = file.cpus_per_node {
        // Before the engine starts any thread: they all inherit the mask.
        let sets = crate::cpus::layout(&crate::cpus::allowed()?, setup.spec.nodes, per_node)?;
        crate::cpus::confine(&sets[me as usize])?;
    }
    setup.observe = Observe {
        metrics_addr: args.observe.metrics,
        metrics_linger: args.observe.metrics_linger.map(Duration::from_secs_f64),
        trace: args.observe.trace.as_ref().map(|path| TraceSetup {
            path: path.clone(),
            meta: config::trace_meta(&file, &setup.spec, &args.observe),
        }),
        sample_rate: args.observe.sample_rate,
        touch_epoch: args
            .observe
            .touch_epoch_ms
            .map(|ms| Duration::from_millis(ms.into())),
        sysfs_root: args.sysfs_root.clone(),
        health_inject: args.inject_health.clone(),
        forward_console: false,
        vcpu_cpus: Vec::new(),
    };
    let info = RunInfo {
        name: file
            .workload
            .clone()
            .or_else(|| file.image.as_ref().map(|p| p.display().to_string()))
            .unwrap_or_default(),
        workload: file
            .workload
            .as_deref()
            .and_then(flotilla_workloads::Workload::from_name),
        vcpus: setup.spec.vcpus,
        nodes: setup.spec.nodes,
        mem_bytes: setup.spec.mem_bytes,
        args: setup.spec.args.clone(),
        policy: setup.spec.policy.clone(),
        transport: file.transport.clone(),
        link_delay_us: file.link_delay_us.unwrap_or(0),
    };
    let reported = match cluster::run_node(setup) {
        Ok(Some(outcome)) => Reported::from_outcome(outcome),
        Ok(None) => return Ok(0),
        Err(e) if me == 0 => Reported::failed(info.nodes, e.to_string()),
        // Node 0 has it and the launcher prints node 0's result: once is enough.
        Err(flotilla_engine::Error::Reported(_)) if args.launched => return Ok(2),
        Err(e) => {
            crate::say_err(&format!("flotilla node {me}: {e}"));
            return Ok(2);
        }
    };
    if args.launched {
        crate::say(&reported.to_line());
        return Ok(if reported.result.is_ok() { 0 } else { 2 });
    }
    let reference = match (info.workload, reported.exit_code()) {
        (Some(w), Some(0)) => {
            let prepared = w.prepare(&info.args).map_err(|e| anyhow::anyhow!("{e}"))?;
            Some(
                native::run(&prepared, info.vcpus as usize)
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .checksum,
            )
        }
        _ => None,
    };
    crate::say(&report::summary(&info, &reported, reference).to_string());
    if let Err(e) = &reported.result {
        crate::say_err(&format!("flotilla node 0: {e}"));
    }
    Ok(report::exit_status(&info, &reported, reference))
}
