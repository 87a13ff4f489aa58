//! `flotilla learn`: the whole loop in one command, for the built-in workloads or your own
//! guest's traces. From a directory of reference-stream traces (record them with `flotilla
//! run … --touch-epoch-ms 5 --trace DIR/NAME.ftrace.gz`; `datasets/record.py` does it for
//! the built-in workloads):
//!
//! 1. `dataset build`: oracle labels on every shape and link cost;
//! 2. leave-one-workload-out: for each workload W, a model trained on the others, then W's
//!    trace replayed on every evaluation shape under each baseline heuristic, the oracle,
//!    and that model: the held-out A/B table, with a 95 % bootstrap interval (over
//!    workloads) of the geometric mean of learned / best heuristic;
//! 3. a model trained on every workload, written with its model card (`NAME.onnx`,
//!    `NAME.md`: the data, the held-out table, the command that rebuilt it).

use crate::dataset::{lab_costs, lab_shape, parse_shape, BuildArgs, LabelArgs};
use crate::train::FitArgs;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use flotilla_learned::train as fit;
use flotilla_placement::features::FEATURE_VERSION;
use flotilla_telemetry::trace::Trace;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct LearnArgs {
    /// The dataset: which traces, shapes, links, behaviours and look-ahead.
    #[command(flatten)]
    pub labels: LabelArgs,
    /// The model (the seed also seeds the dataset's subsampling).
    #[command(flatten)]
    pub fit: FitArgs,
    /// Scratch directory: the dataset and the held-out models.
    #[arg(long, default_value = "target/learn")]
    pub work: PathBuf,
    /// Reuse the dataset in WORK/data if its manifest is there.
    #[arg(long)]
    pub reuse_data: bool,
    /// Link latency of the held-out replays, µs.
    #[arg(long, default_value_t = 15)]
    pub eval_link_us: u64,
    /// The heuristics the learned policy is compared with; the best of them on each
    /// (workload, shape) is the baseline.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "heuristic,numa-balancing,tidalscale,elasticos"
    )]
    pub baselines: Vec<String>,
    /// Where the final model and its card go.
    #[arg(long, default_value = "models")]
    pub models: PathBuf,
    /// The final model's name (NAME.onnx, NAME.md).
    #[arg(long, default_value = "tree-v1")]
    pub name: String,
    /// Also A/B live on the pinned testbed (2 nodes × 1 CPU, 4 vCPUs, TCP, `bench
    /// sim-fidelity`'s sizes): each held-out model against every baseline, interleaved,
    /// and the best baseline's median kept. Built-in workloads only.
    #[arg(long)]
    pub live: bool,
    /// A-B pairs per (workload, baseline) of the live arm.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(5..=1000))]
    pub pairs: u32,
    /// Print exactly one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// One held-out workload live: the best baseline's runs and the learned policy's.
#[derive(Debug, Clone)]
struct LiveCell {
    workload: String,
    best: String,
    best_ms: Vec<f64>,
    learned_ms: Vec<f64>,
    ratio: f64,
    ci95: (f64, f64),
    /// Every baseline's median, ms.
    baselines: Vec<(String, f64)>,
}

/// One held-out workload's model: its name, file, look-ahead evaluation, and the model
/// loaded.
type Fold = (String, PathBuf, fit::Evaluation, crate::policy::Choice);

/// One held-out (workload, shape): predicted run times.
#[derive(Debug, Clone)]
struct Cell {
    workload: String,
    shape: (u16, u32),
    baselines: Vec<(String, f64)>,
    oracle_ms: f64,
    learned_ms: f64,
    learned_vcpu_moves: u64,
}

impl Cell {
    fn best(&self) -> (&str, f64) {
        self.baselines
            .iter()
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(n, ms)| (n.as_str(), *ms))
            .unwrap_or(("-", f64::NAN))
    }
    fn ratio(&self) -> f64 {
        self.learned_ms / self.best().1
    }
}

pub fn learn(a: LearnArgs) -> Result<i32> {
    let shapes = a
        .labels
        .shapes
        .iter()
        .map(|s| parse_shape(s))
        .collect::<Result<Vec<_>>>()?;
    for b in &a.baselines {
        crate::policy::Choice::new(b, 1, None).map_err(|e| anyhow!("--baselines: {e:#}"))?;
    }
    if a.baselines.is_empty() {
        bail!("--baselines: give at least one heuristic");
    }
    if a.name.is_empty() || a.name.contains('/') {
        bail!("--name {}: a file name, without a directory", a.name);
    }
    if a.live {
        crate::cpus::layout(&crate::cpus::allowed()?, 2, 1)
            .map_err(|e| anyhow!("--live needs the pinned testbed: {e:#}"))?;
    }
    let data = a.work.join("data");
    let say = |s: &str| {
        if !a.json {
            crate::say_err(s)
        }
    };
    if !(a.reuse_data && data.join("manifest.json").exists()) {
        say(&format!(
            "learn: building the dataset in {}",
            data.display()
        ));
        crate::dataset::build(BuildArgs {
            labels: a.labels.clone(),
            out: data.clone(),
            seed: a.fit.seed,
            jobs: None,
        })?;
    }
    let (ex, manifest) = crate::train::load(&data)?;
    let groups: Vec<String> = if a.labels.workloads.is_empty() {
        ex.groups.clone()
    } else {
        a.labels.workloads.clone()
    };
    if groups.len() < 2 {
        bail!("leave-one-out needs at least two workloads in the data");
    }
    for g in &groups {
        if !ex.groups.contains(g) {
            bail!(
                "workload {g}: not in the dataset ({})",
                ex.groups.join(", ")
            );
        }
    }
    // The evaluation trace of each workload: its recording on the fewest nodes.
    let traces = crate::ab::reference_traces(&a.labels.traces, &groups)?;
    let calibration = crate::ab::read_calibration(&a.labels.traces)?;
    let mut eval: Vec<(String, &PathBuf, &Trace)> = Vec::new();
    for g in &groups {
        let t = traces
            .iter()
            .filter(|(_, t)| &t.meta.workload == g)
            .min_by_key(|(_, t)| t.meta.nodes)
            .ok_or_else(|| anyhow!("workload {g}: no trace in {}", a.labels.traces.display()))?;
        eval.push((g.clone(), &t.0, &t.1));
    }
    // Held-out models, one per workload.
    let mut folds = Vec::new();
    for g in &groups {
        say(&format!("learn: training without {g}"));
        let path = a.work.join(format!("heldout-{g}.onnx"));
        let train_idx: Vec<usize> = ex
            .select(Some(g), false)
            .into_iter()
            .filter(|&i| groups.contains(&ex.groups[ex.group[i] as usize]))
            .collect();
        let others: Vec<&str> = groups
            .iter()
            .filter(|o| *o != g)
            .map(String::as_str)
            .collect();
        let meta = crate::train::model_meta(&a.fit, &others, Some(g), train_idx.len(), &manifest);
        let t = crate::train::fit(&ex, &train_idx, &a.fit, &meta)?;
        std::fs::create_dir_all(&a.work)
            .with_context(|| format!("creating {}", a.work.display()))?;
        std::fs::write(&path, &t.bytes).with_context(|| format!("writing {}", path.display()))?;
        let test = ex.select(Some(g), true);
        let e = fit::evaluate(&ex, &test, |x| (t.p_vcpu)(x) > 0.5);
        // Loaded and checked once, shared by the fold's replays.
        let choice = crate::policy::Choice::new(flotilla_placement::LEARNED, 1, Some(&path))?;
        folds.push((g.clone(), path, e, choice));
    }
    // Held-out replays: (workload, shape) jobs on every CPU.
    let jobs: Vec<(usize, (u16, u32))> = (0..groups.len())
        .flat_map(|w| shapes.iter().map(move |&s| (w, s)))
        .collect();
    let rows = crate::dataset::on_every_cpu(
        &jobs,
        crate::dataset::cpus(),
        "held-out replays",
        |&(w, shape)| {
            let (name, path, trace) = &eval[w];
            cell(&a, name, path, trace, &calibration, shape, &folds[w].3)
        },
    )?;
    let live = if a.live {
        folds
            .iter()
            .map(|(g, model, _, _)| live_cell(&a, g, model))
            .collect::<Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    // The final model, on everything.
    std::fs::create_dir_all(&a.models)
        .with_context(|| format!("creating {}", a.models.display()))?;
    let final_path = a.models.join(format!("{}.onnx", a.name));
    let command: Vec<String> = std::env::args().collect();
    let all_idx: Vec<usize> = (0..ex.len())
        .filter(|&i| groups.contains(&ex.groups[ex.group[i] as usize]))
        .collect();
    let names: Vec<&str> = groups.iter().map(String::as_str).collect();
    let meta = crate::train::model_meta(&a.fit, &names, None, all_idx.len(), &manifest);
    let t = crate::train::fit(&ex, &all_idx, &a.fit, &meta)?;
    flotilla_learned::Model::from_bytes(&t.bytes, &final_path.display().to_string())?;
    std::fs::write(&final_path, &t.bytes)
        .with_context(|| format!("writing {}", final_path.display()))?;
    let summary = summarise(&rows, &shapes, a.fit.seed);
    let mut table = markdown(&rows, &summary, &shapes);
    let live_summary = (!live.is_empty()).then(|| live_summary(&live, a.fit.seed));
    if let Some(s) = &live_summary {
        table += &live_markdown(&live, s, a.pairs);
    }
    let card = card(&a, &command, &manifest, &folds, &table, t.bytes.len());
    let card_path = a.models.join(format!("{}.md", a.name));
    std::fs::write(&card_path, card).with_context(|| format!("writing {}", card_path.display()))?;
    let out = json!({
        "model": final_path.display().to_string(),
        "card": card_path.display().to_string(),
        "kind": format!("{:?}", a.fit.model).to_ascii_lowercase(),
        "feature_version": FEATURE_VERSION,
        "eval_link_us": a.eval_link_us,
        "folds": folds.iter().map(|(g, _, e, _)| json!({
            "holdout": g, "accuracy": crate::bench::round3(e.accuracy),
            "gap_closed": crate::bench::round3(e.gap_closed()),
        })).collect::<Vec<_>>(),
        "rows": rows.iter().map(|c| json!({
            "workload": c.workload, "nodes": c.shape.0, "cpus_per_node": c.shape.1,
            "best_heuristic": c.best().0, "best_ms": crate::bench::round3(c.best().1),
            "baselines_ms": c.baselines.iter().map(|(n, ms)| (n.clone(), json!(crate::bench::round3(*ms)))).collect::<serde_json::Map<_, _>>(),
            "oracle_ms": crate::bench::round3(c.oracle_ms),
            "learned_ms": crate::bench::round3(c.learned_ms),
            "learned_vcpu_moves": c.learned_vcpu_moves,
            "ratio": crate::bench::round3(c.ratio()),
        })).collect::<Vec<_>>(),
        "summary": summary,
        "live": live.iter().map(|c| json!({
            "workload": c.workload, "best_heuristic": c.best,
            "best_ms": c.best_ms.iter().copied().map(crate::bench::round3).collect::<Vec<_>>(),
            "learned_ms": c.learned_ms.iter().copied().map(crate::bench::round3).collect::<Vec<_>>(),
            "ratio": crate::bench::round3(c.ratio),
            "ci95": [crate::bench::round3(c.ci95.0), crate::bench::round3(c.ci95.1)],
            "baselines_median_ms": c.baselines.iter().map(|(n, ms)| (n.clone(), json!(crate::bench::round3(*ms)))).collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
        "live_summary": live_summary,
    });
    std::fs::write(a.work.join("learn.json"), out.to_string())
        .with_context(|| format!("writing {}", a.work.join("learn.json").display()))?;
    if a.json {
        crate::say(&out.to_string());
    } else {
        crate::say(&table);
        crate::say(&format!(
            "\n{} written, its card {}",
            final_path.display(),
            card_path.display()
        ));
    }
    Ok(0)
}

/// One held-out (workload, shape): the baselines, the oracle and the fold's model.
fn cell(
    a: &LearnArgs,
    name: &str,
    path: &Path,
    trace: &Trace,
    calibration: &serde_json::Map<String, Value>,
    (nodes, cpus): (u16, u32),
    model: &crate::policy::Choice,
) -> Result<Cell> {
    let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let shape = lab_shape(trace, nodes, cpus);
    let costs = lab_costs(trace, file, calibration, a.eval_link_us)?;
    let at = |p: &str| format!("replaying {file} on {nodes}x{cpus} under {p}");
    let mut baselines = Vec::new();
    for b in &a.baselines {
        let c = crate::policy::Choice::new(b, trace.meta.seed, None)?;
        let o = flotilla_sim::replay(trace, &shape, &costs, |n| c.make(n))
            .map_err(|e| anyhow!("{}: {e}", at(b)))?;
        baselines.push((b.clone(), o.wall_ms));
    }
    let (oracle, _) = flotilla_sim::replay_labelled(
        trace,
        &shape,
        &costs,
        flotilla_sim::Decider::Oracle,
        flotilla_sim::LookAhead::fixed(flotilla_sim::DEFAULT_HORIZON),
        false,
    )
    .map_err(|e| anyhow!("{}: {e}", at("oracle")))?;
    let c = model.with_seed(trace.meta.seed);
    let learned = flotilla_sim::replay(trace, &shape, &costs, |n| c.make(n))
        .map_err(|e| anyhow!("{}: {e}", at("learned")))?;
    Ok(Cell {
        workload: name.to_string(),
        shape: (nodes, cpus),
        baselines,
        oracle_ms: oracle.wall_ms,
        learned_ms: learned.wall_ms,
        learned_vcpu_moves: learned.vcpu_moves,
    })
}

/// Held-out workload `w` live: its fold's model against every baseline, A B A B …
fn live_cell(a: &LearnArgs, w: &str, model: &Path) -> Result<LiveCell> {
    let mut best: Option<crate::ab::Row> = None;
    let mut best_name = String::new();
    let mut baselines = Vec::new();
    for b in &a.baselines {
        if !a.json {
            crate::say_err(&format!("learn: live {w}, {b} against learned"));
        }
        let row = crate::ab::live(
            &crate::ab::LiveArm {
                a: b,
                b: flotilla_placement::LEARNED,
                model: Some(model),
                pairs: a.pairs,
                seed: a.fit.seed,
            },
            w,
        )?;
        if let Some(e) = &row.error {
            bail!("live {w}: {e}");
        }
        let m = crate::bench::median(row.a_ms.clone());
        baselines.push((b.clone(), m));
        if best
            .as_ref()
            .is_none_or(|r| m < crate::bench::median(r.a_ms.clone()))
        {
            best = Some(row);
            best_name = b.clone();
        }
    }
    let r = best.ok_or_else(|| anyhow!("no baseline"))?;
    Ok(LiveCell {
        workload: w.to_string(),
        best: best_name,
        ratio: r.ratio.unwrap_or(f64::NAN),
        ci95: r.interval.unwrap_or((f64::NAN, f64::NAN)),
        best_ms: r.a_ms,
        learned_ms: r.b_ms,
        baselines,
    })
}

fn live_summary(live: &[LiveCell], seed: u64) -> Value {
    let logs: Vec<f64> = live.iter().map(|c| c.ratio.ln()).collect();
    let (gm, lo, hi) = geomean_ci(&logs, seed);
    json!({
        "geomean_ratio": crate::bench::round3(gm),
        "ci95": [crate::bench::round3(lo), crate::bench::round3(hi)],
        "worst_ratio": crate::bench::round3(live.iter().map(|c| c.ratio).fold(f64::MIN, f64::max)),
    })
}

fn live_markdown(live: &[LiveCell], s: &Value, pairs: u32) -> String {
    let mut t = format!(
        "\nLive, pinned 2 nodes × 1 CPU, 4 vCPUs, TCP; {pairs} pairs against each baseline, medians; \
         95 % bootstrap interval of learned / best:\n\n\
         | held-out workload | best heuristic live | its ms | learned ms | learned / best (95 % CI) | every baseline's median ms |\n|---|---|---|---|---|---|\n"
    );
    for c in live {
        t += &format!(
            "| {} | {} | {:.1} | {:.1} | {:.3} [{:.3}, {:.3}] | {} |\n",
            c.workload,
            c.best,
            crate::bench::median(c.best_ms.clone()),
            crate::bench::median(c.learned_ms.clone()),
            c.ratio,
            c.ci95.0,
            c.ci95.1,
            c.baselines
                .iter()
                .map(|(n, ms)| format!("{n} {ms:.1}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    t += &format!(
        "\nGeometric mean of learned / best, live: {} [{}, {}] (95 % CI over workloads); worst {}.\n",
        s["geomean_ratio"], s["ci95"][0], s["ci95"][1], s["worst_ratio"]
    );
    t
}

/// The geometric mean of `exp(logs)` with a 95 % bootstrap interval (resampling the
/// entries, 2000 times, seeded).
fn geomean_ci(logs: &[f64], seed: u64) -> (f64, f64, f64) {
    let gm = |v: &[f64]| (v.iter().sum::<f64>() / v.len().max(1) as f64).exp();
    let mut rng = fit::Rng(seed);
    let mut boots: Vec<f64> = (0..2000)
        .map(|_| {
            let draw: Vec<f64> = (0..logs.len())
                .map(|_| logs[(rng.next_u64() % logs.len().max(1) as u64) as usize])
                .collect();
            gm(&draw)
        })
        .collect();
    boots.sort_by(f64::total_cmp);
    (gm(logs), boots[49], boots[1949])
}

/// Per shape: the geometric mean of learned / best heuristic over the held-out workloads
/// with a 95 % bootstrap interval (resampling workloads), the worst ratio, and the share
/// of the best heuristic's excess over the oracle that the learned policy removes.
fn summarise(rows: &[Cell], shapes: &[(u16, u32)], seed: u64) -> Value {
    let mut out = Vec::new();
    for &s in shapes {
        let here: Vec<&Cell> = rows.iter().filter(|c| c.shape == s).collect();
        let logs: Vec<f64> = here.iter().map(|c| c.ratio().ln()).collect();
        if logs.is_empty() {
            continue;
        }
        let (gm, lo, hi) = geomean_ci(&logs, seed);
        let worst = here.iter().map(|c| c.ratio()).fold(f64::MIN, f64::max);
        let gap: f64 = here.iter().map(|c| c.best().1 - c.oracle_ms).sum();
        let closed: f64 = here.iter().map(|c| c.best().1 - c.learned_ms).sum();
        out.push(json!({
            "nodes": s.0, "cpus_per_node": s.1,
            "geomean_ratio": crate::bench::round3(gm),
            "ci95": [crate::bench::round3(lo), crate::bench::round3(hi)],
            "worst_ratio": crate::bench::round3(worst),
            "gap_closed": (gap > 0.0).then(|| crate::bench::round3(closed / gap)),
        }));
    }
    Value::Array(out)
}

fn markdown(rows: &[Cell], summary: &Value, shapes: &[(u16, u32)]) -> String {
    let mut s = String::from(
        "| held-out workload | shape | best heuristic | its ms | learned ms | learned / best | oracle ms |\n|---|---|---|---|---|---|---|\n",
    );
    for &sh in shapes {
        for c in rows.iter().filter(|c| c.shape == sh) {
            let (b, ms) = c.best();
            s += &format!(
                "| {} | {}x{} | {b} | {ms:.1} | {:.1} | {:.3} | {:.1} |\n",
                c.workload,
                sh.0,
                sh.1,
                c.learned_ms,
                c.ratio(),
                c.oracle_ms
            );
        }
    }
    s += "\n| shape | geomean learned / best (95 % CI over workloads) | worst | best-to-oracle gap closed |\n|---|---|---|---|\n";
    for r in summary.as_array().into_iter().flatten() {
        s += &format!(
            "| {}x{} | {} [{}, {}] | {} | {} |\n",
            r["nodes"],
            r["cpus_per_node"],
            r["geomean_ratio"],
            r["ci95"][0],
            r["ci95"][1],
            r["worst_ratio"],
            match r["gap_closed"].as_f64() {
                Some(g) => format!("{:.0} %", 100.0 * g),
                None => "no gap (the oracle is not faster)".into(),
            }
        );
    }
    s
}

fn card(
    a: &LearnArgs,
    command: &[String],
    manifest: &Value,
    folds: &[Fold],
    table: &str,
    bytes: usize,
) -> String {
    let traces: Vec<String> = manifest["traces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["file"].as_str().map(|f| format!("`{f}`")))
        .collect();
    let mut folds_md = String::from(
        "| held out | look-ahead accuracy | always-page-to-oracle gap closed (look-ahead cost) |\n|---|---|---|\n",
    );
    for (g, _, e, _) in folds {
        folds_md += &format!(
            "| {g} | {:.1} % | {:.0} % |\n",
            100.0 * e.accuracy,
            100.0 * e.gap_closed()
        );
    }
    format!(
        "# Model card: `{name}.onnx`\n\n\
         A {kind} placement model for `--policy learned --model {dir}/{name}.onnx` ({bytes} bytes).\n\n\
         - **Feature version** {fv} (`placement-ml/src/features.rs`; the file's metadata carries it and the names).\n\
         - **Data**: the oracle labels of `flotilla dataset build` over {traces} (traces in `{tdir}`), \
         replayed on shapes {shapes} (NODESxCPUS) and links of {links} µs one way; {rows} labelled faults. \
         Each example weighs the cost difference of its two choices (cost-sensitive).\n\
         - **Trained** with linfa ({kind}: {trees} trees of depth {depth} for a tree model; {draws} draws per fit), seed {seed}.\n\
         - **Rebuild**: `{cmd}`{reuse}\n\n\
         ## Held out\n\n\
         Leave-one-workload-out: each row's model was trained without that workload. Predicted \
         run time by replay (the simulator, `docs/simulator.md`) of the workload's recording on \
         the fewest nodes, at {eval} µs one way; the baseline is the best of {baselines} on each row.\n\n\
         {table}\n\
         On the labels of the held-out workload (look-ahead costs, not run time):\n\n{folds_md}\n\
         ## Limits\n\n\
         The labels come from a myopic oracle (a bounded look-ahead with a fixed continuation); \
         the simulator's fidelity against live runs is measured in `docs/simulator.md`. \
         Seven workloads are a small training set: judge it on your guest with `flotilla learn --traces YOUR_DIR`.\n",
        name = a.name,
        kind = format!("{:?}", a.fit.model).to_ascii_lowercase(),
        dir = a.models.display(),
        fv = FEATURE_VERSION,
        traces = traces.join(", "),
        tdir = a.labels.traces.display(),
        shapes = a.labels.shapes.join(", "),
        links = a.labels.link_us.iter().map(|u| u.to_string()).collect::<Vec<_>>().join(", "),
        rows = manifest["rows"],
        trees = a.fit.trees,
        depth = a.fit.depth,
        draws = a.fit.draws,
        seed = a.fit.seed,
        cmd = command_line(command),
        reuse = if a.reuse_data {
            format!(
                " (`--reuse-data` took the dataset in `{}/data` that the same command without it builds first; the build is deterministic)",
                a.work.display()
            )
        } else {
            String::new()
        },
        eval = a.eval_link_us,
        baselines = a.baselines.join(", "),
    )
}

/// The command as a user would type it: `flotilla …`, not the binary's full path.
fn command_line(command: &[String]) -> String {
    let mut parts = vec!["flotilla".to_string()];
    parts.extend(command.iter().skip(1).cloned());
    parts.join(" ")
}
