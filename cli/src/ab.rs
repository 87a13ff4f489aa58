//! `flotilla ab --a P --b Q`: is policy Q faster than policy P, and how sure are we?
//!
//! Two arms, each optional:
//! - **live**, on the pinned testbed (2 nodes × 1 CPU, 4 vCPUs, TCP): for each workload,
//!   A and B runs interleaved (A B A B …), so drift on the host hits both alike. The
//!   ratio is median(B) / median(A), with a 95 % bootstrap interval (resampling each
//!   arm's runs, 2000 times, seeded);
//! - **replay**, over the reference-stream traces of a dataset directory: each trace
//!   replayed under A and under B (deterministic: one ratio, no interval).
//!
//! Below 1.0, B is faster. The geometric mean summarises each arm. `--report DIR` writes
//! `report.md` with the tables, `ratio.svg` (each workload's ratio with its interval) and
//! `stall.svg` (where the time went: fault stall and vCPU-move stall, A beside B).

use crate::bench::{median, round3, BenchWorkload, Pinned, FIDELITY_ARGS};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args, Debug)]
pub struct AbArgs {
    /// The baseline policy.
    #[arg(long)]
    pub a: String,
    /// The policy compared with it.
    #[arg(long)]
    pub b: String,
    /// The ONNX model of whichever side is `learned`.
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Comma-separated workloads (default: all, at `bench sim-fidelity`'s sizes).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// A-B pairs per workload in the live arm (at least 5).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(5..=1000))]
    pub pairs: u32,
    /// Skip the live arm (replay only).
    #[arg(long)]
    pub no_live: bool,
    /// Directory of traces for the replay arm: every `*.ftrace` / `*.ftrace.gz` in it
    /// that holds a reference stream and one of the workloads.
    #[arg(long, default_value = "datasets/traces")]
    pub traces: PathBuf,
    /// Skip the replay arm.
    #[arg(long)]
    pub no_replay: bool,
    /// Cluster shapes of the replay arm, NODESxCPUS, comma-separated (default: each
    /// trace's own). Other than the recorded shape, the guest starts with its vCPUs
    /// round-robin and its RAM interleaved, as `dataset build` replays it.
    #[arg(long, value_delimiter = ',')]
    pub shapes: Vec<String>,
    /// One-way link latency of the replay arm, µs (default: the recorded run's).
    #[arg(long, value_name = "US", value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub link_us: Option<u64>,
    /// Write report.md, ratio.svg and stall.svg here (created if missing).
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Seed of the bootstrap.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// One workload's comparison in one arm.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    arm: &'static str,
    /// The workload, and for replay the trace's nodes (`bfs 4n`).
    name: String,
    pub(crate) a_ms: Vec<f64>,
    pub(crate) b_ms: Vec<f64>,
    /// Summed fault stall and vCPU-move stall, ms, per arm (A, B); live: estimated as
    /// counts × the run's medians.
    stall: [(f64, f64); 2],
    pub(crate) ratio: Option<f64>,
    pub(crate) interval: Option<(f64, f64)>,
    pub(crate) error: Option<String>,
}

/// The live arm's configuration: A and B, the model of a learned side, pairs, the
/// bootstrap's seed.
pub(crate) struct LiveArm<'a> {
    pub a: &'a str,
    pub b: &'a str,
    pub model: Option<&'a Path>,
    pub pairs: u32,
    pub seed: u64,
}

impl Row {
    fn new(arm: &'static str, name: String) -> Row {
        Row {
            arm,
            name,
            a_ms: Vec::new(),
            b_ms: Vec::new(),
            stall: [(0.0, 0.0); 2],
            ratio: None,
            interval: None,
            error: None,
        }
    }
}

/// A small seeded generator (SplitMix64) for the bootstrap.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n as u64) as usize
    }
}

/// The 95 % percentile-bootstrap interval of median(b) / median(a).
fn bootstrap(a: &[f64], b: &[f64], seed: u64) -> (f64, f64) {
    let mut rng = Rng(seed);
    let mut draw = |x: &[f64]| median((0..x.len()).map(|_| x[rng.below(x.len())]).collect());
    let mut ratios: Vec<f64> = (0..2000).map(|_| draw(b) / draw(a)).collect();
    ratios.sort_by(f64::total_cmp);
    (ratios[49], ratios[1949])
}

fn geomean(xs: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x.ln(), n + 1));
    (n > 0).then(|| (sum / n as f64).exp())
}

/// Side `policy` of the comparison, its model loaded when it is learned.
fn choice(a: &AbArgs, policy: &str, seed: u64) -> Result<crate::policy::Choice> {
    let model = (policy == flotilla_placement::LEARNED)
        .then_some(a.model.as_deref())
        .flatten();
    crate::policy::Choice::new(policy, seed, model)
}

pub fn ab(a: AbArgs) -> Result<i32> {
    let learned = a.a == flotilla_placement::LEARNED || a.b == flotilla_placement::LEARNED;
    if a.model.is_some() && !learned {
        bail!(
            "--model is only for a side that is learned (--a {} --b {})",
            a.a,
            a.b
        );
    }
    // Checked (and a model loaded) once; the replay arm reseeds them per trace.
    let sides = [choice(&a, &a.a, 1)?, choice(&a, &a.b, 1)?];
    if a.no_live && a.no_replay {
        bail!("--no-live and --no-replay leave nothing to compare");
    }
    for s in &a.shapes {
        crate::dataset::parse_shape(s).map_err(|e| anyhow!("--shapes: {e}"))?;
    }
    let names: Vec<String> = if a.workloads.is_empty() {
        FIDELITY_ARGS.iter().map(|(w, _)| w.to_string()).collect()
    } else {
        a.workloads.clone()
    };
    for n in &names {
        if !FIDELITY_ARGS.iter().any(|(w, _)| w == n) {
            bail!("unknown workload '{n}' (see `flotilla workloads`)");
        }
    }
    if let Some(dir) = &a.report {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--report {}: cannot create it", dir.display()))?;
    }
    let mut rows = Vec::new();
    if !a.no_live {
        crate::cpus::layout(&crate::cpus::allowed()?, 2, 1)?;
        for name in &names {
            let arm = LiveArm {
                a: &a.a,
                b: &a.b,
                model: a.model.as_deref(),
                pairs: a.pairs,
                seed: a.seed,
            };
            let row = live(&arm, name)?;
            progress(&a, &row);
            rows.push(row);
        }
    }
    if !a.no_replay {
        for row in replayed(&a, &sides, &names)? {
            progress(&a, &row);
            rows.push(row);
        }
    }
    let summary = |arm: &str| geomean(rows.iter().filter(|r| r.arm == arm).filter_map(|r| r.ratio));
    let out = json!({
        "a": a.a, "b": a.b, "pairs": a.pairs,
        "geomean_ratio": {"live": summary("live").map(round3), "replay": summary("replay").map(round3)},
        "rows": rows.iter().map(row_json).collect::<Vec<_>>(),
    });
    if let Some(dir) = &a.report {
        write_report(dir, &a, &rows, &out)?;
    }
    if a.json {
        crate::say(&out.to_string());
    } else {
        crate::say(&table(&a, &rows, &out));
    }
    Ok(0)
}

fn progress(a: &AbArgs, r: &Row) {
    if !a.json {
        crate::say_err(&format!(
            "{} {}: {}",
            r.arm,
            r.name,
            match (&r.error, r.ratio) {
                (Some(e), _) => format!("failed: {e}"),
                (None, Some(x)) => format!("B/A {x:.3}"),
                (None, None) => "-".into(),
            }
        ));
    }
}

/// Workload `name` live on the pinned testbed, A and B interleaved.
pub(crate) fn live(a: &LiveArm, name: &str) -> Result<Row> {
    let found = BenchWorkload::find(&FIDELITY_ARGS, name, 4)?;
    let w = Pinned {
        workload: &found,
        transport: "tcp",
        model: a.model,
    };
    let mut row = Row::new("live", name.to_string());
    let mut stalls: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    'pairs: for _ in 0..a.pairs {
        for (k, policy) in [a.a, a.b].into_iter().enumerate() {
            match w.run_reported(2, policy, Duration::from_secs(300), Default::default()) {
                Ok(r) => {
                    let costs = crate::launch::measured_costs(&r.samples);
                    let t = &r.totals;
                    stalls[k].push((
                        t.remote_faults as f64 * costs.fault_service_ns as f64 / 1e6,
                        t.vcpu_moves as f64 * costs.vcpu_move_ns as f64 / 1e6,
                    ));
                    if k == 0 {
                        row.a_ms.push(r.wall_ms)
                    } else {
                        row.b_ms.push(r.wall_ms)
                    }
                }
                Err(e) => {
                    row.error = Some(format!("{policy}: {e:#}"));
                    break 'pairs;
                }
            }
        }
    }
    if row.error.is_none() {
        let (ma, mb) = (median(row.a_ms.clone()), median(row.b_ms.clone()));
        row.ratio = Some(mb / ma);
        row.interval = Some(bootstrap(&row.a_ms, &row.b_ms, a.seed));
        for (out, runs) in row.stall.iter_mut().zip(&stalls) {
            *out = (
                median(runs.iter().map(|s| s.0).collect()),
                median(runs.iter().map(|s| s.1).collect()),
            );
        }
    }
    Ok(row)
}

/// The traces of `dir` that hold a reference stream of one of `names`, sorted; none is an
/// error.
pub(crate) fn reference_traces(
    dir: &Path,
    names: &[String],
) -> Result<Vec<(PathBuf, flotilla_telemetry::trace::Trace)>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("--traces {}: cannot read the directory", dir.display()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.ends_with(".ftrace") || n.ends_with(".ftrace.gz")
        })
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for p in paths {
        let t = flotilla_telemetry::trace::read_file(&p)
            .map_err(|e| anyhow!("trace {}: {e}", p.display()))?;
        let reference = t.meta.run.as_ref().is_some_and(|r| r.touch_epoch_ns > 0);
        if reference && names.contains(&t.meta.workload) {
            out.push((p, t));
        }
    }
    if out.is_empty() {
        bail!(
            "--traces {}: no reference-stream trace of {} (record one with --touch-epoch-ms, or re-record datasets/)",
            dir.display(),
            names.join(",")
        );
    }
    Ok(out)
}

fn replayed(a: &AbArgs, sides: &[crate::policy::Choice; 2], names: &[String]) -> Result<Vec<Row>> {
    let traces = reference_traces(&a.traces, names)?;
    let calibration = read_calibration(&a.traces)?;
    let shapes = a
        .shapes
        .iter()
        .map(|s| crate::dataset::parse_shape(s))
        .collect::<Result<Vec<_>>>()?;
    let mut rows = Vec::new();
    for (path, t) in traces {
        let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let costs = match a.link_us {
            Some(us) => crate::dataset::lab_costs(&t, file, &calibration, us)?,
            None => calibrated(&t, calibration.get(file))
                .map_err(|e| anyhow!("calibrating on {}: {e}", path.display()))?,
        };
        let recorded = crate::dataset::recorded_shape(&t);
        let mine = if shapes.is_empty() {
            vec![recorded]
        } else {
            shapes.clone()
        };
        for (nodes, cpus) in mine {
            let shape = crate::dataset::lab_shape(&t, nodes, cpus);
            let name = if shapes.is_empty() {
                format!("{} {}n", t.meta.workload, t.meta.nodes)
            } else {
                format!("{} {}n@{nodes}x{cpus}", t.meta.workload, t.meta.nodes)
            };
            rows.push(replay_row(&t, &shape, &costs, sides, name));
        }
    }
    Ok(rows)
}

/// Trace `t` replayed under both sides on `shape`.
fn replay_row(
    t: &flotilla_telemetry::trace::Trace,
    shape: &flotilla_sim::Shape,
    costs: &flotilla_sim::Costs,
    sides: &[crate::policy::Choice; 2],
    name: String,
) -> Row {
    let mut row = Row::new("replay", name);
    for (k, side) in sides.iter().enumerate() {
        let side = side.with_seed(t.meta.seed);
        match flotilla_sim::replay(t, shape, costs, |n| side.make(n)) {
            Ok(o) => {
                let moves = o.vcpu_moves as f64 * costs.move_ns as f64 / 1e6;
                row.stall[k] = ((o.stall_ms - moves).max(0.0), moves);
                if k == 0 {
                    row.a_ms.push(o.wall_ms)
                } else {
                    row.b_ms.push(o.wall_ms)
                }
            }
            Err(e) => row.error = Some(format!("{}: {e}", side.name)),
        }
    }
    if row.error.is_none() {
        let r = row.b_ms[0] / row.a_ms[0];
        row.ratio = Some(r);
        row.interval = Some((r, r));
    }
    row
}

/// `calibration.json` of a trace directory, if it has one: per trace file, the measured
/// run time on one node pinned to one CPU (`one_node_ms`) and the medians of a plain (unrecorded) run of the same
/// configuration (`costs`, the field names of a trace's run costs). `datasets/record.py`
/// writes it.
pub(crate) fn read_calibration(dir: &Path) -> Result<serde_json::Map<String, Value>> {
    let p = dir.join("calibration.json");
    match std::fs::read_to_string(&p) {
        Ok(text) => match serde_json::from_str(&text) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(_) => bail!("{}: not a JSON object of trace files", p.display()),
            Err(e) => bail!("{}: {e}", p.display()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => bail!("{}: {e}", p.display()),
    }
}

/// A trace's costs, from its calibration entry where it has one (what it measured),
/// else from the trace.
pub(crate) fn calibrated(
    t: &flotilla_telemetry::trace::Trace,
    entry: Option<&Value>,
) -> Result<flotilla_sim::Costs> {
    let Some(e) = entry else {
        return Ok(flotilla_sim::Costs::from_trace(t));
    };
    // The plain run's medians where it measured them, the trace's elsewhere (a plain run
    // makes no echo probes, and an always-page run no vCPU moves).
    let mut c = t.meta.run.as_ref().map(|r| r.costs).unwrap_or_default();
    for (k, field) in [
        ("rtt_4k_ns", &mut c.rtt_4k_ns),
        ("install_ns", &mut c.install_ns),
        ("capture_ns", &mut c.capture_ns),
        ("restore_ns", &mut c.restore_ns),
        ("fault_service_ns", &mut c.fault_service_ns),
        ("vcpu_move_ns", &mut c.vcpu_move_ns),
    ] {
        match &e["costs"][k] {
            Value::Null => {}
            v => {
                *field = v
                    .as_u64()
                    .ok_or_else(|| anyhow!("costs.{k} is not a whole number of ns"))?
            }
        }
    }
    let mut costs = flotilla_sim::Costs::measured(&c);
    if let Some(ms) = e["one_node_ms"].as_f64() {
        if !(ms > 0.0 && ms.is_finite()) {
            bail!("one_node_ms {ms} is not a positive time");
        }
        // Measured on one node pinned to one CPU.
        costs.compute_scale = flotilla_sim::calibrate_compute(t, 1, &costs, ms)?;
    }
    Ok(costs)
}

fn row_json(r: &Row) -> Value {
    let med = |v: &[f64]| (!v.is_empty()).then(|| round3(median(v.to_vec())));
    json!({
        "arm": r.arm, "workload": r.name,
        "a_ms": r.a_ms.iter().copied().map(round3).collect::<Vec<_>>(),
        "b_ms": r.b_ms.iter().copied().map(round3).collect::<Vec<_>>(),
        "a_median_ms": med(&r.a_ms), "b_median_ms": med(&r.b_ms),
        "ratio": r.ratio.map(round3),
        "ci95": r.interval.map(|(l, h)| [round3(l), round3(h)]),
        "stall_ms": {
            "a": {"faults": round3(r.stall[0].0), "vcpu_moves": round3(r.stall[0].1)},
            "b": {"faults": round3(r.stall[1].0), "vcpu_moves": round3(r.stall[1].1)},
        },
        "error": r.error,
    })
}

fn table(a: &AbArgs, rows: &[Row], out: &Value) -> String {
    let mut s = format!(
        "| arm | workload | A = {} ms | B = {} ms | B/A | 95 % CI |\n|---|---|---|---|---|---|\n",
        a.a, a.b
    );
    for r in rows {
        let med = |v: &[f64]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                format!("{:.1}", median(v.to_vec()))
            }
        };
        let (ratio, ci) = match (&r.error, r.ratio, r.interval) {
            (Some(e), _, _) => (format!("failed: {e}"), String::new()),
            (None, Some(x), Some((l, h))) if r.arm == "live" => {
                (format!("{x:.3}"), format!("[{l:.3}, {h:.3}]"))
            }
            (None, Some(x), _) => (format!("{x:.3}"), "(one replay)".into()),
            _ => ("-".into(), String::new()),
        };
        s += &format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.arm,
            r.name,
            med(&r.a_ms),
            med(&r.b_ms),
            ratio,
            ci
        );
    }
    for arm in ["live", "replay"] {
        if let Some(g) = out["geomean_ratio"][arm].as_f64() {
            s += &format!("\nGeometric mean of B/A, {arm}: {g:.3}");
        }
    }
    s
}

fn write_report(dir: &Path, a: &AbArgs, rows: &[Row], out: &Value) -> Result<()> {
    let ok: Vec<&Row> = rows.iter().filter(|r| r.ratio.is_some()).collect();
    plot_ratios(&dir.join("ratio.svg"), a, &ok)?;
    plot_stalls(&dir.join("stall.svg"), a, &ok)?;
    let md = format!(
        "# A/B: {} (A) against {} (B)\n\n\
         Live: {} A-B pairs per workload, interleaved, on 2 pinned nodes × 1 CPU, 4 vCPUs, TCP; \
         B/A is the ratio of medians with a 95 % bootstrap interval. Replay: the reference-stream \
         traces of `{}`, one replay per policy. Below 1.0, B is faster.\n\n{}\n\n\
         ![B/A per workload](ratio.svg)\n\n![stall time](stall.svg)\n\n\
         Stall: fault stall and vCPU-move stall summed over vCPUs (live: counts × the run's medians).\n",
        a.a,
        a.b,
        a.pairs,
        a.traces.display(),
        table(a, rows, out)
    );
    std::fs::write(dir.join("report.md"), md)
        .with_context(|| format!("--report {}: cannot write report.md", dir.display()))?;
    std::fs::write(dir.join("ab.json"), out.to_string())
        .with_context(|| format!("--report {}: cannot write ab.json", dir.display()))?;
    Ok(())
}

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing a plot: {e}")
}

/// Each row's B/A with its interval, one line per row, and 1.0 marked.
fn plot_ratios(file: &Path, a: &AbArgs, rows: &[&Row]) -> Result<()> {
    use plotters::prelude::*;
    let n = rows.len().max(1);
    let root = SVGBackend::new(file, (800, 80 + 28 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (lo, hi) = rows
        .iter()
        .filter_map(|r| r.interval)
        .fold((1.0f64, 1.0f64), |(l, h), (a, b)| (l.min(a), h.max(b)));
    let pad = (hi - lo).max(0.1) * 0.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("B/A run time: {} / {}", a.b, a.a),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(110)
        .build_cartesian_2d((lo - pad).max(0.0)..hi + pad, 0..n)
        .map_err(plot_err)?;
    let labels: Vec<String> = rows
        .iter()
        .map(|r| format!("{} {}", r.arm, r.name))
        .collect();
    chart
        .configure_mesh()
        .y_labels(n)
        .y_label_formatter(&|i| labels.get(*i).cloned().unwrap_or_default())
        .x_desc("B/A (below 1: B faster)")
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(1.0, 0), (1.0, n)],
            BLACK.stroke_width(1),
        )))
        .map_err(plot_err)?;
    for (i, r) in rows.iter().enumerate() {
        let (Some(x), Some((l, h))) = (r.ratio, r.interval) else {
            continue;
        };
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(l, i), (h, i)],
                BLUE.stroke_width(2),
            )))
            .map_err(plot_err)?;
        chart
            .draw_series(std::iter::once(Circle::new((x, i), 4, BLUE.filled())))
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Fault stall and vCPU-move stall, A and B side by side per row.
fn plot_stalls(file: &Path, a: &AbArgs, rows: &[&Row]) -> Result<()> {
    use plotters::prelude::*;
    let n = rows.len().max(1);
    let root = SVGBackend::new(file, (800, 80 + 40 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let max = rows
        .iter()
        .flat_map(|r| r.stall.iter().map(|(f, m)| f + m))
        .fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("stall, ms summed over vCPUs: A = {}, B = {}", a.a, a.b),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(130)
        .build_cartesian_2d(0.0..max * 1.05, 0..2 * n)
        .map_err(plot_err)?;
    let labels: Vec<String> = rows
        .iter()
        .flat_map(|r| ["A", "B"].map(|k| format!("{} {} {k}", r.arm, r.name)))
        .collect();
    chart
        .configure_mesh()
        .y_labels(2 * n)
        .y_label_formatter(&|i| labels.get(*i).cloned().unwrap_or_default())
        .x_desc("ms (red: faults, green: vCPU moves)")
        .draw()
        .map_err(plot_err)?;
    for (i, r) in rows.iter().enumerate() {
        for (k, (faults, moves)) in r.stall.iter().enumerate() {
            let y = 2 * i + k;
            chart
                .draw_series([
                    Rectangle::new([(0.0, y), (*faults, y + 1)], RED.mix(0.6).filled()),
                    Rectangle::new(
                        [(*faults, y), (faults + moves, y + 1)],
                        GREEN.mix(0.6).filled(),
                    ),
                ])
                .map_err(plot_err)?;
        }
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bootstrap_interval_holds_the_ratio_and_narrows_with_agreement() {
        let a = [100.0, 101.0, 99.0, 100.5, 100.2];
        let b = [80.0, 81.0, 79.0, 80.5, 80.2];
        let (l, h) = bootstrap(&a, &b, 1);
        let r = median(b.to_vec()) / median(a.to_vec());
        assert!(l <= r && r <= h, "{l} {r} {h}");
        assert!(h < 1.0, "B is clearly faster: {h}");
        let noisy = [50.0, 150.0, 90.0, 130.0, 70.0];
        let (l2, h2) = bootstrap(&a, &noisy, 1);
        assert!(h2 - l2 > h - l);
        assert_eq!(bootstrap(&a, &b, 7), bootstrap(&a, &b, 7));
    }

    #[test]
    fn geomean_of_reciprocals_is_one() {
        assert!((geomean([2.0, 0.5].into_iter()).unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(geomean(std::iter::empty()), None);
    }
}
