//! `flotilla run`: one guest on this node.

use crate::cluster::{launch as launch_cluster, percentiles, Launch, ObserveArgs};
use crate::parse_size;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use flotilla_engine::{ConsoleMode, Machine, MachineConfig, Outcome};
use flotilla_workloads::{native, Workload};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

/// The demo `flotilla run` runs with no workload or image.
pub const DEFAULT_WORKLOAD: Workload = Workload::Sort;
pub const DEFAULT_VCPUS: u32 = 4;
/// Guest RAM the engine keeps for itself, the image and the stacks, on top of what a
/// workload needs (rounded).
const ENGINE_HEADROOM_BYTES: u64 = 16 << 20;
const MIN_DEFAULT_MEM_BYTES: u64 = 256 << 20;

#[derive(Args)]
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
    /// Argument string passed to the guest, e.g. "n=1m seed=7".
    #[arg(long, default_value = "")]
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
    /// Placement policy: always-page, always-vcpu, random or heuristic.
    #[arg(long, default_value = "heuristic")]
    pub policy: String,
    /// Seed of the random policy.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Initial node of each vCPU, e.g. 0,0,1,1 (default: round-robin).
    #[arg(long, value_delimiter = ',')]
    pub vcpu_nodes: Vec<u16>,
    /// Initial spread of guest RAM: contiguous (equal ranges) or interleave (by page).
    #[arg(long, default_value = "contiguous")]
    pub ram: String,
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

/// Nodes of the demo cluster `flotilla run` starts with no options.
pub const DEFAULT_NODES: u16 = 2;

/// What was run, for the summary.
struct Plan {
    name: String,
    workload: Option<Workload>,
    image: Vec<u8>,
    config: MachineConfig,
}

fn plan(args: &RunArgs) -> Result<Plan> {
    let vcpus = args
        .vcpus
        .unwrap_or(if args.image.is_some() || args.workload.is_some() {
            1
        } else {
            DEFAULT_VCPUS
        });
    if vcpus == 0 || vcpus > flotilla_abi::VCPUS_MAX {
        bail!(
            "--vcpus {vcpus}: a guest has 1 to {} vCPUs",
            flotilla_abi::VCPUS_MAX
        );
    }
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
    let mut config = MachineConfig {
        vcpus,
        args: args.args.clone(),
        timeout,
        console,
        ..Default::default()
    };
    if let Some(path) = &args.image {
        let image = std::fs::read(path)
            .with_context(|| format!("cannot read guest image {}", path.display()))?;
        config.mem_bytes = args.mem.unwrap_or(MIN_DEFAULT_MEM_BYTES);
        return Ok(Plan {
            name: path.display().to_string(),
            workload: None,
            image,
            config,
        });
    }
    let name = args.workload.as_deref().unwrap_or(DEFAULT_WORKLOAD.name());
    let workload = Workload::from_name(name).ok_or_else(|| {
        let known: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
        anyhow!("unknown workload '{name}' (known: {})", known.join(", "))
    })?;
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
    Ok(Plan {
        name: name.to_string(),
        workload: Some(workload),
        image,
        config,
    })
}

/// Guest RAM a workload needs on `vcpus` vCPUs: its shared region plus the engine's
/// headroom, rounded to the 2 MiB granularity of guest RAM.
pub fn guest_mem_needed(prepared: &flotilla_workloads::Prepared, vcpus: u32) -> u64 {
    (prepared.mem_bytes(vcpus as usize) as u64 + ENGINE_HEADROOM_BYTES).next_multiple_of(2 << 20)
}

/// Guest RAM a workload gets when no `--mem` is given.
pub fn default_guest_mem(prepared: &flotilla_workloads::Prepared, vcpus: u32) -> u64 {
    guest_mem_needed(prepared, vcpus).max(MIN_DEFAULT_MEM_BYTES)
}

/// Runs a plan's guest; returns the outcome and the wall time of building the VM.
fn execute(plan: &Plan) -> Result<(Outcome, Duration), flotilla_engine::Error> {
    let t = std::time::Instant::now();
    let machine = Machine::boot(plan.config.clone(), &plan.image)?;
    let setup = t.elapsed();
    Ok((machine.run()?, setup))
}

pub fn run(args: RunArgs) -> Result<i32> {
    let plan = plan(&args)?;
    let demo = args.workload.is_none() && args.image.is_none();
    let observed = (args.observe.any() || !args.inject_health.is_empty()).then_some(1);
    if let Some(nodes) = args.nodes.or(demo.then_some(DEFAULT_NODES)).or(observed) {
        return run_cluster(&args, &plan, nodes);
    }
    let result = execute(&plan);
    let (outcome, _setup) = match result {
        Ok(r) => r,
        Err(e) => {
            if args.json {
                let obj = json!({
                    "workload": plan.name, "vcpus": plan.config.vcpus, "nodes": 1,
                    "exit_code": null, "checksum": null, "verified": false, "wall_ms": null,
                    "error": e.to_string(),
                });
                println!("{obj}");
            } else {
                eprintln!("flotilla: guest failed: {e}");
            }
            return Ok(2);
        }
    };
    let reference = match (plan.workload, args.no_verify) {
        (Some(w), false) => {
            let prepared = w.prepare(&args.args).map_err(|e| anyhow!("{e}"))?;
            let native = native::run(&prepared, plan.config.vcpus as usize)
                .map_err(|e| anyhow!("computing the reference checksum on the host: {e}"))?;
            Some(native.checksum)
        }
        _ => None,
    };
    let verified = reference.map(|r| outcome.exit_code == 0 && outcome.report == Some(r));
    let wall_ms = outcome.wall.as_secs_f64() * 1e3;
    let hex = |v: Option<u64>| v.map(|v| format!("{v:#018x}"));
    if args.json {
        let obj = json!({
            "workload": plan.name,
            "vcpus": plan.config.vcpus,
            "nodes": 1,
            "mem_bytes": plan.config.mem_bytes,
            "args": plan.config.args,
            "exit_code": outcome.exit_code,
            "checksum": hex(outcome.report),
            "reference_checksum": hex(reference),
            "verified": verified,
            "wall_ms": (wall_ms * 1000.0).round() / 1000.0,
            "exits": outcome.exits,
            "console": String::from_utf8_lossy(&outcome.console),
        });
        println!("{obj}");
    } else {
        let check = match verified {
            Some(true) => "verified against the host reference".to_string(),
            Some(false) => format!(
                "MISMATCH: host reference is {}",
                hex(reference).unwrap_or_default()
            ),
            None => "not verified (external image)".to_string(),
        };
        println!(
            "{}: {} vCPUs, 1 node, exit code {}, checksum {} ({check}), {wall_ms:.1} ms",
            plan.name,
            plan.config.vcpus,
            outcome.exit_code,
            hex(outcome.report).unwrap_or_else(|| "none".into()),
        );
    }
    Ok(if outcome.exit_code == 0 && verified != Some(false) {
        0
    } else {
        1
    })
}

fn reference(plan: &Plan, args: &RunArgs) -> Result<Option<u64>> {
    match (plan.workload, args.no_verify) {
        (Some(w), false) => {
            let prepared = w.prepare(&args.args).map_err(|e| anyhow!("{e}"))?;
            let native = native::run(&prepared, plan.config.vcpus as usize)
                .map_err(|e| anyhow!("computing the reference checksum on the host: {e}"))?;
            Ok(Some(native.checksum))
        }
        _ => Ok(None),
    }
}

/// `flotilla run --nodes N`: the guest across N node processes.
fn run_cluster(args: &RunArgs, plan: &Plan, nodes: u16) -> Result<i32> {
    if nodes == 0 || nodes as usize > flotilla_transport::MAX_NODES {
        bail!(
            "--nodes {nodes}: a cluster has 1 to {}",
            flotilla_transport::MAX_NODES
        );
    }
    let launch = Launch {
        nodes,
        transport: args.transport.clone(),
        policy: args.policy.clone(),
        seed: args.seed,
        vcpus: plan.config.vcpus,
        mem: plan.config.mem_bytes,
        args: args.args.clone(),
        workload: plan.workload.map(|w| w.name().to_string()),
        image: args.image.clone(),
        vcpu_nodes: (!args.vcpu_nodes.is_empty()).then(|| args.vcpu_nodes.clone()),
        ram: args.ram.clone(),
        timeout: plan.config.timeout,
        echo_rounds: 0,
        observe: args.observe.clone(),
        inject_health: args.inject_health.clone(),
    };
    let hex = |v: Option<u64>| v.map(|v| format!("{v:#018x}"));
    let base = json!({
        "workload": plan.name, "vcpus": plan.config.vcpus, "nodes": nodes,
        "policy": args.policy, "transport": args.transport,
        "mem_bytes": plan.config.mem_bytes, "args": plan.config.args,
    });
    let reported = match launch_cluster(&launch)? {
        Ok(r) => r,
        Err(e) => {
            if args.json {
                let mut obj = base;
                obj["exit_code"] = Value::Null;
                obj["checksum"] = Value::Null;
                obj["verified"] = json!(false);
                obj["error"] = json!(e);
                println!("{obj}");
            } else {
                eprintln!("flotilla: guest failed: {e}");
            }
            return Ok(2);
        }
    };
    let reference = reference(plan, args)?;
    let verified = reference.map(|r| reported.exit_code == 0 && reported.report == Some(r));
    let t = &reported.totals;
    if args.json {
        let mut obj = base;
        for (k, v) in [
            ("exit_code", json!(reported.exit_code)),
            ("checksum", json!(hex(reported.report))),
            ("reference_checksum", json!(hex(reference))),
            ("verified", json!(verified)),
            (
                "wall_ms",
                json!((reported.wall_ms * 1000.0).round() / 1000.0),
            ),
            ("exits", t["exits"].clone()),
            ("remote_faults", t["remote_faults"].clone()),
            ("page_moves", t["page_moves"].clone()),
            ("replicas_made", t["replicas_made"].clone()),
            ("invalidations", t["invalidations"].clone()),
            ("vcpu_moves", t["vcpu_moves"].clone()),
            ("bytes_sent", t["bytes_sent"].clone()),
            (
                "fault_service_us",
                percentiles(&reported.samples, "fault_service_us"),
            ),
            (
                "vcpu_move_us",
                percentiles(&reported.samples, "vcpu_move_us"),
            ),
            ("console", json!(reported.console)),
            ("trace_events", json!(reported.trace_events)),
        ] {
            obj[k] = v;
        }
        println!("{obj}");
    } else {
        print!("{}", reported.console);
        let check = match verified {
            Some(true) => "verified against the host reference".to_string(),
            Some(false) => format!(
                "MISMATCH: host reference is {}",
                hex(reference).unwrap_or_default()
            ),
            None => "not verified".to_string(),
        };
        println!(
            "{}: {} vCPUs on {nodes} node{} ({}, {}), exit code {}, checksum {} ({check}), {:.1} ms",
            plan.name,
            plan.config.vcpus,
            if nodes == 1 { "" } else { "s" },
            args.transport,
            args.policy,
            reported.exit_code,
            hex(reported.report).unwrap_or_else(|| "none".into()),
            reported.wall_ms,
        );
        println!(
            "  remote faults {}, page moves {} ({} replicas), invalidations {}, vCPU moves {}, {} bytes sent",
            t["remote_faults"], t["page_moves"], t["replicas_made"], t["invalidations"], t["vcpu_moves"], t["bytes_sent"]
        );
        if let (Some(n), Some(path)) = (reported.trace_events, &args.observe.trace) {
            println!("  trace: {n} events written to {}", path.display());
        }
    }
    Ok(if reported.exit_code == 0 && verified != Some(false) {
        0
    } else {
        1
    })
}
