//! `flotilla`: run guests on the Flotilla engine and benchmark it.
//!
//! - `flotilla workloads`: the built-in workload names, one a line.
//! - `flotilla run …`: run a built-in workload (checked against a host-computed
//!   reference checksum) or an external guest image.
//! - `flotilla node …`: one node of a cluster.
//! - `flotilla bench …`: benchmarks.
//! - `flotilla trace stats|export …`: recorded fault traces.
//! - `flotilla replay TRACE …`: the trace-driven simulator; `--policy oracle`, `--labels`.
//! - `flotilla ab --a P --b Q`: two policies compared, live and by replay.
//! - `flotilla dataset build`, `flotilla train`: a learned policy from traces.

mod ab;
mod bench;
mod config;
mod cpus;
mod dataset;
mod labels;
mod launch;
mod learn;
mod node;
mod policy;
mod replay;
mod report;
mod run;
mod sizing;
mod trace;
mod train;

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
    Node(node::NodeArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Look into recorded fault traces (stats, export).
    #[command(subcommand)]
    Trace(trace::TraceCmd),
    /// Replay a trace under a policy and cluster shape in the simulator.
    Replay(replay::ReplayArgs),
    /// Compare two placement policies: live on the pinned testbed (A B A B …) and by
    /// replay over a trace directory; a table, --json, or a report with plots.
    Ab(ab::AbArgs),
    /// Training data for a learned policy: oracle-labelled faults of a trace directory.
    #[command(subcommand)]
    Dataset(dataset::DatasetCmd),
    /// Train a placement model (logistic or tree ensemble) on `dataset build`'s output
    /// and write it as ONNX for `--policy learned --model`.
    Train(train::TrainArgs),
    /// The loop in one command: dataset, leave-one-workload-out training and held-out
    /// A/B by replay, and a final model with its card.
    Learn(learn::LearnArgs),
}

fn main() {
    // tract's tree ensembles make (and drop) an error per tree at every inference; with
    // RUST_BACKTRACE=1 each would capture a backtrace, which made a learned decision take
    // 47 µs instead of 10. Library backtraces stay off unless asked for by
    // RUST_LIB_BACKTRACE; panics still print theirs under RUST_BACKTRACE. No thread runs
    // yet, so setting the variable races with nothing.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    init_logging();
    let cli = Cli::parse();
    let code = match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            say_err(&format!("flotilla: error: {e:#}"));
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
                    say(&format!("{:<8} {}", w.name(), w.summary()));
                    for k in w.keys() {
                        say(&format!(
                            "         {}={} ({}; {}..={})",
                            k.name, k.default, k.help, k.min, k.max
                        ));
                    }
                } else {
                    say(w.name());
                }
            }
            Ok(0)
        }
        Command::Run(args) => run::run(args),
        Command::Node(a) => node::node(a),
        Command::Bench(b) => bench::bench(b),
        Command::Trace(t) => trace::trace(t),
        Command::Replay(r) => replay::replay(r),
        Command::Ab(a) => ab::ab(a),
        Command::Dataset(d) => dataset::dataset(d),
        Command::Train(t) => train::train(t),
        Command::Learn(l) => learn::learn(l),
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

/// Writes a line to stdout. A closed pipe (`flotilla run | head -1`, a launcher that
/// went away) is not an error worth a panic: the reader is gone, so is the need.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// Writes text to stdout as it is (no newline added); a closed pipe is ignored.
pub fn say_out(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Writes a line to stderr; a closed pipe is ignored.
pub fn say_err(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
