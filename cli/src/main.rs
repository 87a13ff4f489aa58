//! `flotilla`: run guests on the Flotilla engine and benchmark it.
//!
//! - `flotilla workloads`: the built-in workload names, one a line.
//! - `flotilla run …`: run a built-in workload (checked against a host-computed
//!   reference checksum) or an external guest image.
//! - `flotilla node …`: one node of a cluster.
//! - `flotilla bench …`: benchmarks.
//! - `flotilla trace stats|export …`: recorded fault traces.

mod bench;
mod cluster;
mod run;
mod trace;

use anyhow::Result;
use clap::{Parser, Subcommand};
use flotilla_workloads::Workload;

#[derive(Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Flotilla: several machines as one virtual machine"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the built-in workloads, one name a line.
    Workloads {
        /// Also print each workload's sharing pattern and arguments.
        #[arg(long)]
        verbose: bool,
    },
    /// Run a guest: a built-in workload, or an external ELF image.
    Run(run::RunArgs),
    /// Run one node of a multi-machine cluster (see README.md, "Cluster configuration").
    Node(cluster::NodeArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Look into recorded fault traces (stats, export).
    #[command(subcommand)]
    Trace(trace::TraceCmd),
}

fn main() {
    init_logging();
    let cli = Cli::parse();
    let code = match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flotilla: error: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

fn dispatch(cli: Cli) -> Result<i32> {
    match cli.command {
        Command::Workloads { verbose } => {
            for w in Workload::ALL {
                if verbose {
                    println!("{:<8} {}", w.name(), w.summary());
                    for k in w.keys() {
                        println!(
                            "         {}={} ({}; {}..={})",
                            k.name, k.default, k.help, k.min, k.max
                        );
                    }
                } else {
                    println!("{}", w.name());
                }
            }
            Ok(0)
        }
        Command::Run(args) => run::run(args),
        Command::Node(a) => cluster::node(a),
        Command::Bench(b) => bench::bench(b),
        Command::Trace(t) => trace::trace(t),
    }
}

/// Logs go to stderr; `FLOTILLA_LOG=debug` (or info, trace, …) sets the level.
fn init_logging() {
    let level = std::env::var("FLOTILLA_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not into files and pipes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// Parses a memory size: bytes, or a number with K, M, G (binary units, optional "iB").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 10),
        Some('m') => (&stripped[..stripped.len() - 1], 20),
        Some('g') => (&stripped[..stripped.len() - 1], 30),
        _ => (stripped, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 512M, 2G, 1073741824)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("16g"), Ok(16 << 30));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }
}
