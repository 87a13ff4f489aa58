//! `flotilla bench …`: measured numbers, never asserted in tests.

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use flotilla_engine::{ConsoleMode, Machine, MachineConfig};
use flotilla_workloads::{native, Workload};
use serde_json::json;

#[derive(Subcommand)]
pub enum Bench {
    /// Each workload natively (same code, host threads) and as a guest on one node.
    Overhead(OverheadArgs),
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
}

pub fn bench(b: Bench) -> Result<i32> {
    match b {
        Bench::Overhead(a) => overhead(a),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
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
    let mut rows = Vec::new();
    for w in workloads {
        let prepared = w
            .prepare(&a.args)
            .map_err(|e| anyhow!("workload {}: {e}", w.name()))?;
        let mem = crate::run::default_guest_mem(&prepared, a.vcpus);
        let config = MachineConfig {
            vcpus: a.vcpus,
            mem_bytes: mem,
            args: a.args.clone(),
            console: ConsoleMode::Capture,
            ..Default::default()
        };
        let (mut native_ms, mut guest_ms) = (Vec::new(), Vec::new());
        // Alternate the two sides so drift on the host hits both alike.
        for _ in 0..a.runs {
            let n = native::run(&prepared, a.vcpus as usize)
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
            eprintln!(
                "{:<8} native {native:>9.1} ms  guest {guest:>9.1} ms  ratio {ratio:.3}",
                w.name()
            );
        }
        rows.push(json!({
            "name": w.name(),
            "native_ms": round3(native),
            "guest_ms": round3(guest),
            "ratio": round3(ratio),
        }));
    }
    let out = json!({ "vcpus": a.vcpus, "runs": a.runs, "workloads": rows });
    if a.json {
        println!("{out}");
    }
    Ok(0)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
