//! `flotilla run`: one guest, a built-in workload (checked against a host-computed
//! reference checksum) or an external image, on one in-process engine or across local
//! node processes.

use crate::config::workload as workload_named;
use crate::launch::{launch, Launch};
use crate::node::ObserveArgs;
use crate::report::{self, Reported, RunInfo};
use crate::sizing::{default_guest_mem, guest_mem_needed, parse_size, MIN_DEFAULT_MEM_BYTES};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use flotilla_engine::cluster::{BootedNode, Observe, RunningNode};
use flotilla_engine::{ConsoleMode, MachineConfig};
use flotilla_workloads::{native, Workload};
use std::path::PathBuf;
use std::time::Duration;

/// The demo `flotilla run` runs with no workload or image: a matrix multiplication
/// (read-shared inputs) of about a second, on 2 nodes against 1.
pub const DEFAULT_WORKLOAD: Workload = Workload::Matmul;
pub const DEFAULT_ARGS: &str = "n=900";
pub const DEFAULT_VCPUS: u32 = 4;
pub const DEFAULT_NODES: u16 = 2;

#[derive(Args, Clone)]
pub struct RunArgs {
    /// Built-in workload to run (see `flotilla workloads`). Default: sort with 4 vCPUs.
    #[arg(long, conflicts_with = "image")]
    pub workload: Option<String>,
    /// External guest ELF image to run (see docs/guest-abi.md).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Number of vCPUs (1 to 64).
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Guest RAM, e.g. 512M, 4G (default: what the workload needs, at least 256M).
    #[arg(long, value_parser = parse_size)]
    pub mem: Option<u64>,
    /// Each vCPU's stack, e.g. 1M (default 256K). Its lowest 4 KiB is a guard page: a
    /// guest that overflows its stack ends with an error naming the vCPU.
    #[arg(long, value_parser = parse_size)]
    pub stack_size: Option<u64>,
    /// Argument string passed to the guest, e.g. "n=1m seed=7" or "-p4 -n1048576".
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub args: String,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// End the run with an error after this many seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Skip computing the host reference checksum (verified is then null).
    #[arg(long)]
    pub no_verify: bool,
    /// Run across this many node processes on this machine (1 to 64). Without it, the
    /// demo runs on 2 nodes and a given workload or image on one in-process engine.
    #[arg(long)]
    pub nodes: Option<u16>,
    /// Node-to-node transport: tcp or shm.
    #[arg(long, default_value = "tcp")]
    pub transport: String,
    /// Placement policy: always-page, always-vcpu, random, heuristic, numa-balancing,
    /// tidalscale, elasticos, or learned (with --model).
    #[arg(long, default_value = "heuristic")]
    pub policy: String,
    /// The ONNX model --policy learned serves (models/*.onnx; `flotilla train` writes them).
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Seed of the random policy.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Initial node of each vCPU, e.g. 0,0,1,1 (default: round-robin).
    #[arg(long, value_delimiter = ',')]
    pub vcpu_nodes: Vec<u16>,
    /// Initial spread of guest RAM: contiguous (equal ranges) or interleave (by page).
    #[arg(long, default_value = "contiguous")]
    pub ram: String,
    /// Confine each node process to its own C CPUs (node K: the K-th C of the CPUs this
    /// process may use), so nodes never share a CPU. Runs the guest as a cluster.
    #[arg(long, value_name = "C")]
    pub cpus_per_node: Option<u32>,
    /// Emulate a link of this one-way latency between the nodes (added to every frame a
    /// node receives, both directions; netem does not work on this host): e.g. 3 for an
    /// RDMA-class link, 15 for 10 GbE, 100 for a slow one. 0 to 1000000.
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub link_delay_us: u64,
    /// Metrics, trace and access sampling (any of them runs the guest as a cluster, of
    /// one node unless --nodes says more).
    #[command(flatten)]
    pub observe: ObserveArgs,
    /// Make node K report a health signal, e.g. 1:thermal_max_celsius=95 (repeatable).
    #[arg(long, value_name = "NODE:SIGNAL=VALUE", value_parser = parse_node_injection)]
    pub inject_health: Vec<(u16, String, f64)>,
}

fn parse_node_injection(s: &str) -> Result<(u16, String, f64), String> {
    let (node, rest) = s.split_once(':').ok_or_else(|| {
        format!("'{s}': expected NODE:SIGNAL=VALUE, e.g. 1:thermal_max_celsius=95")
    })?;
    let node: u16 = node
        .trim()
        .parse()
        .map_err(|_| format!("'{s}': '{node}' is not a node id"))?;
    let (signal, value) = flotilla_telemetry::health::parse_injection(rest)?;
    Ok((node, signal, value))
}

/// What to run.
struct Plan {
    info: RunInfo,
    image: Vec<u8>,
    config: MachineConfig,
}

fn plan(args: &RunArgs, nodes: u16) -> Result<Plan> {
    let vcpus = args.vcpus.unwrap_or(1);
    if vcpus == 0 || vcpus > flotilla_abi::VCPUS_MAX {
        bail!(
            "--vcpus {vcpus}: a guest has 1 to {} vCPUs",
            flotilla_abi::VCPUS_MAX
        );
    }
    if nodes == 0 || nodes as usize > flotilla_transport::MAX_NODES {
        bail!(
            "--nodes {nodes}: a cluster has 1 to {}",
            flotilla_transport::MAX_NODES
        );
    }
    // Every node checks it again; checked here too, so that a bad model fails a run on
    // one node (which never asks a policy) as clearly as on several.
    crate::policy::Choice::new(&args.policy, args.seed, args.model.as_deref())?;
    let timeout = match args.timeout {
        Some(t) if !(t > 0.0 && t.is_finite()) => {
            bail!("--timeout {t}: must be a positive number of seconds")
        }
        Some(t) => Some(Duration::from_secs_f64(t)),
        None => None,
    };
    let console = if args.json {
        ConsoleMode::Capture
    } else {
        ConsoleMode::Forward
    };
    if let Some(s) = args.stack_size {
        if s < 8192 || !s.is_multiple_of(4096) || s > 64 << 20 {
            bail!(
                "--stack-size: {}",
                flotilla_engine::boot::BootError::StackSize(s)
            );
        }
    }
    let mut config = MachineConfig {
        vcpus,
        args: args.args.clone(),
        timeout,
        console,
        stack_bytes: args.stack_size.unwrap_or(flotilla_abi::STACK_BYTES_DEFAULT),
        ..Default::default()
    };
    let (name, workload, image) = if let Some(path) = &args.image {
        let image = std::fs::read(path)
            .with_context(|| format!("cannot read guest image {}", path.display()))?;
        config.mem_bytes = args.mem.unwrap_or(MIN_DEFAULT_MEM_BYTES);
        (path.display().to_string(), None, image)
    } else {
        // The demo fills in its workload before it gets here.
        let name = args.workload.as_deref().unwrap_or(DEFAULT_WORKLOAD.name());
        let workload = workload_named(name)?;
        let prepared = workload
            .prepare(&args.args)
            .map_err(|e| anyhow!("workload {name}: {e}"))?;
        let need = guest_mem_needed(&prepared, vcpus);
        config.mem_bytes = match args.mem {
            Some(mem) if mem < need => {
                bail!("workload {name} with these arguments needs about {need} bytes of guest RAM; --mem gives {mem}")
            }
            Some(mem) => mem,
            None => default_guest_mem(&prepared, vcpus),
        };
        let image = flotilla_guest_images::image(workload).to_vec();
        (name.to_string(), Some(workload), image)
    };
    Ok(Plan {
        info: RunInfo {
            name,
            workload,
            vcpus,
            nodes,
            mem_bytes: config.mem_bytes,
            args: args.args.clone(),
            policy: args.policy.clone(),
            transport: args.transport.clone(),
            link_delay_us: args.link_delay_us,
        },
        image,
        config,
    })
}

/// The host reference checksum of a workload run, unless `--no-verify`.
fn reference(plan: &Plan, args: &RunArgs) -> Result<Option<u64>> {
    match (plan.info.workload, args.no_verify) {
        (Some(w), false) => {
            let prepared = w.prepare(&args.args).map_err(|e| anyhow!("{e}"))?;
            let native = native::run(&prepared, plan.config.vcpus as usize)
                .map_err(|e| anyhow!("computing the reference checksum on the host: {e}"))?;
            Ok(Some(native.checksum))
        }
        _ => Ok(None),
    }
}

pub fn run(args: RunArgs) -> Result<i32> {
    if args.workload.is_none() && args.image.is_none() {
        return demo(args);
    }
    let (plan, reported, reference) = execute(&args)?;
    show(&args, &plan.info, &reported, reference, None);
    Ok(report::exit_status(&plan.info, &reported, reference))
}

/// Runs the guest `args` describe; returns the host reference too (for a workload that
/// exited 0, unless `--no-verify`).
fn execute(args: &RunArgs) -> Result<(Plan, Reported, Option<u64>)> {
    if args.link_delay_us > 0 && args.nodes.unwrap_or(1) < 2 {
        bail!("--link-delay-us: a node alone has no links to delay; give --nodes 2 or more");
    }
    let observed =
        (args.observe.any() || !args.inject_health.is_empty() || args.cpus_per_node.is_some())
            .then_some(1);
    let cluster = args.nodes.or(observed);
    let plan = plan(args, cluster.unwrap_or(1))?;
    let reported = match cluster {
        Some(_) => launch(&launch_of(args, &plan))?,
        None => run_here(&plan),
    };
    let reference = match reported.exit_code() {
        Some(0) => reference(&plan, args)?,
        _ => None,
    };
    Ok((plan, reported, reference))
}

/// Prints a run's result: one JSON object, or the console output and a summary.
/// `demo` is what the demo adds: a JSON field and a line of text.
fn show(
    args: &RunArgs,
    info: &RunInfo,
    reported: &Reported,
    reference: Option<u64>,
    demo: Option<(serde_json::Value, String)>,
) {
    if args.json {
        let mut obj = report::summary(info, reported, reference);
        if let Some((v, _)) = &demo {
            obj["demo"] = v.clone();
        }
        crate::say(&obj.to_string());
        return;
    }
    crate::say_out(&reported.console);
    crate::say_out(&report::text(info, reported, reference));
    if let (Some(n), Some(path)) = (reported.trace_events, &args.observe.trace) {
        let of = if reported.result.is_err() {
            " (marked as a failed run)"
        } else {
            ""
        };
        crate::say(&format!(
            "  trace: {n} events written to {}{of}",
            path.display()
        ));
    }
    if let Some(e) = &reported.trace_error {
        crate::say(&format!("  trace: not written: {e}"));
    }
    if let Some((_, line)) = &demo {
        crate::say(line);
    }
    if let Err(e) = &reported.result {
        crate::say_err(&format!("flotilla: guest failed: {e}"));
    }
}

/// `flotilla run` with no workload or image: the demo guest on 2 nodes, each pinned to
/// its own CPU where the host has enough, against the same guest on 1 node.
fn demo(mut args: RunArgs) -> Result<i32> {
    args.workload = Some(DEFAULT_WORKLOAD.name().to_string());
    if args.args.is_empty() {
        args.args = DEFAULT_ARGS.to_string();
    }
    args.vcpus.get_or_insert(DEFAULT_VCPUS);
    let nodes = *args.nodes.get_or_insert(DEFAULT_NODES);
    let cpus = crate::cpus::allowed()?.len();
    if args.cpus_per_node.is_none() && cpus >= nodes as usize {
        args.cpus_per_node = Some(1);
    }
    let mut alone = args.clone();
    alone.nodes = Some(1);
    alone.json = true;
    let (_, one, _) = execute(&alone)?;
    let (plan, reported, reference) = execute(&args)?;
    let extra = match (one.result.is_ok(), reported.result.is_ok()) {
        (true, true) => {
            let speedup = one.wall_ms / reported.wall_ms;
            let per = args.cpus_per_node.map_or("unpinned".to_string(), |c| {
                format!("{c} CPU{}", if c == 1 { "" } else { "s" })
            });
            let mut line = format!(
                "  the same guest on 1 node ({per}): {:.1} ms; on {nodes} nodes ({per} each): {:.1} ms, {speedup:.2}x",
                one.wall_ms, reported.wall_ms
            );
            if args.cpus_per_node.is_none() {
                line += &format!(
                    "\n  (unpinned: this host has {cpus} CPU{} for {nodes} nodes, so they share CPUs and the comparison says nothing about placement)",
                    if cpus == 1 { "" } else { "s" }
                );
            }
            let v = serde_json::json!({
                "one_node_ms": (one.wall_ms * 1000.0).round() / 1000.0,
                "speedup": (speedup * 1000.0).round() / 1000.0,
                "pinned": args.cpus_per_node.is_some(),
            });
            Some((v, line))
        }
        _ => None,
    };
    show(&args, &plan.info, &reported, reference, extra);
    Ok(report::exit_status(&plan.info, &reported, reference))
}

/// The guest on a node alone in this process (what `Machine` runs), keeping the console
/// and the counters of a run that fails.
fn run_here(plan: &Plan) -> Reported {
    let c = &plan.config;
    let observe = Observe {
        forward_console: c.console == ConsoleMode::Forward,
        ..Default::default()
    };
    let forwarded = observe.forward_console;
    let run = BootedNode::boot(0, c.spec(), &plan.image, observe, None, None)
        .and_then(|node| node.start(c.timeout))
        .and_then(RunningNode::wait);
    match run {
        Ok(Some(outcome)) => {
            let mut reported = Reported::from_outcome(outcome);
            if forwarded {
                // Already on stdout, as the guest wrote it.
                reported.console.clear();
            }
            reported
        }
        Ok(None) => Reported::failed(1, "a node alone is node 0".into()),
        Err(e) => Reported::failed(1, e.to_string()),
    }
}

fn launch_of(args: &RunArgs, plan: &Plan) -> Launch {
    Launch {
        nodes: plan.info.nodes,
        transport: args.transport.clone(),
        policy: args.policy.clone(),
        model: args.model.clone(),
        seed: args.seed,
        vcpus: plan.config.vcpus,
        mem: plan.config.mem_bytes,
        stack_bytes: plan.config.stack_bytes,
        args: args.args.clone(),
        workload: plan.info.workload.map(|w| w.name().to_string()),
        image: args.image.clone(),
        vcpu_nodes: (!args.vcpu_nodes.is_empty()).then(|| args.vcpu_nodes.clone()),
        ram: args.ram.clone(),
        timeout: plan.config.timeout,
        // A trace carries the bare round trip, so a simulator can be calibrated from it.
        echo_rounds: if args.observe.trace.is_some() { 32 } else { 0 },
        cpus_per_node: args.cpus_per_node,
        link_delay_us: args.link_delay_us,
        observe: args.observe.clone(),
        inject_health: args.inject_health.clone(),
    }
}
