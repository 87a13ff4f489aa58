//! `flotilla trace`: look into recorded fault traces.
//!
//! - `flotilla trace stats FILE [--json]`: per node and vCPU, hottest pages, sharing
//!   degrees, ping-pong pages (flotilla_telemetry::analyze).
//! - `flotilla trace export FILE --format csv|parquet [--output OUT]`: one row per event.

use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use flotilla_telemetry::{analyze, export, trace};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum TraceCmd {
    /// Summarize a trace: per node and vCPU, hottest pages, sharing, ping-pong pages.
    Stats {
        file: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Export a trace as a table (one row per event) for notebooks.
    Export {
        file: PathBuf,
        #[arg(long, value_enum)]
        format: Format,
        /// Output file (default: FILE with the format's extension; "-" for stdout, CSV only).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Csv,
    Parquet,
}

fn read(file: &Path) -> Result<trace::Trace> {
    trace::read_file(file).map_err(|e| anyhow::anyhow!("trace {}: {e}", file.display()))
}

pub fn trace(cmd: TraceCmd) -> Result<i32> {
    match cmd {
        TraceCmd::Stats { file, json } => {
            let s = analyze::summarize(&read(&file)?);
            if json {
                crate::say(&serde_json::to_string(&s)?);
            } else {
                print!("{}", analyze::render(&s));
            }
        }
        TraceCmd::Export {
            file,
            format,
            output,
        } => {
            let ext = match format {
                Format::Csv => "csv",
                Format::Parquet => "parquet",
            };
            let out = output.unwrap_or_else(|| {
                let name = file
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default();
                let stem = name.trim_end_matches(".gz").trim_end_matches(".ftrace");
                file.with_file_name(format!("{stem}.{ext}"))
            });
            if out == file {
                bail!(
                    "the output {} is the trace itself; give --output",
                    out.display()
                );
            }
            let t = read(&file)?;
            match format {
                Format::Csv if out.as_os_str() == "-" => {
                    export::write_csv(&t, &mut std::io::stdout().lock())?;
                    return Ok(0);
                }
                Format::Csv => {
                    let f = std::fs::File::create(&out)
                        .with_context(|| format!("creating {}", out.display()))?;
                    export::write_csv(&t, &mut std::io::BufWriter::new(f))
                        .with_context(|| format!("writing {}", out.display()))?;
                }
                Format::Parquet => {
                    if out.as_os_str() == "-" {
                        bail!("parquet cannot go to stdout; give --output FILE");
                    }
                    let f = std::fs::File::create(&out)
                        .with_context(|| format!("creating {}", out.display()))?;
                    export::write_parquet(&t, f).map_err(anyhow::Error::msg)?;
                }
            }
            crate::say_err(&format!(
                "flotilla: {} events written to {}",
                t.events.len(),
                out.display()
            ));
        }
    }
    Ok(0)
}
