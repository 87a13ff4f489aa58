//! `flotilla train --data DIR --model logistic|tree -o FILE`: a placement model from the
//! oracle labels of `flotilla dataset build`, trained with linfa
//! (`flotilla_learned::train`), written as ONNX (`flotilla_learned::onnx`), loaded back in
//! tract and checked against the trainer's own arithmetic before it is kept.
//! `--holdout W` leaves workload W out of training and reports the model on it.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use flotilla_learned::train::{self, Evaluation, Examples};
use flotilla_placement::features::{FEATURE_COUNT, FEATURE_NAMES, FEATURE_VERSION};
use flotilla_telemetry::export::{read_table_parquet, Column, Table};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// Logistic regression (linfa-logistic), as MatMul/Add/Sigmoid.
    Logistic,
    /// Bagged decision trees (linfa-trees), as an ai.onnx.ml TreeEnsembleClassifier.
    Tree,
}

/// The model and how it is fitted.
#[derive(Args, Debug, Clone)]
pub struct FitArgs {
    #[arg(long, value_enum, default_value = "tree")]
    pub model: Kind,
    /// Trees of a tree model. tract's tree-ensemble op walks the leaves' votes from the
    /// start at every tree, so a decision costs about the number of leaves: 4 trees of
    /// depth 6 decide in 3.3 µs p50 (4.9 µs p99) here, 8 of depth 8 in 10 µs (14 µs), and
    /// did as well held out.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub trees: u64,
    /// Depth of each tree.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u64).range(1..=32))]
    pub depth: u64,
    /// Examples drawn for each fit (each tree, or the logistic model).
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(100..=10_000_000))]
    pub draws: u64,
    /// Seed of the draws.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// A directory written by `flotilla dataset build`.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    #[command(flatten)]
    pub fit: FitArgs,
    /// Where to write the ONNX model.
    #[arg(long, short, value_name = "FILE")]
    pub out: PathBuf,
    /// Leave this workload out of training and report the model on it.
    #[arg(long, value_name = "WORKLOAD")]
    pub holdout: Option<String>,
    /// Print exactly one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The examples of a `dataset build` directory, after checking its manifest and every
/// file's feature version and names against this build's.
pub fn load(dir: &Path) -> Result<(Examples, Value)> {
    let mpath = dir.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).with_context(|| {
        format!(
            "--data {}: no manifest.json (write one with `flotilla dataset build`)",
            dir.display()
        )
    })?;
    let manifest: Value =
        serde_json::from_str(&text).with_context(|| format!("{}", mpath.display()))?;
    let version = manifest["feature_version"].as_u64();
    if version != Some(FEATURE_VERSION as u64) {
        bail!(
            "{}: feature version {} but this build computes {FEATURE_VERSION}: rebuild the dataset",
            mpath.display(),
            version.map_or("missing".into(), |v| v.to_string())
        );
    }
    let files = manifest["files"]
        .as_array()
        .ok_or_else(|| anyhow!("{}: no files list", mpath.display()))?;
    let mut ex = Examples::default();
    let bar = crate::replay::counting_bar(files.len() as u64, "files");
    for f in files {
        let name = f["file"]
            .as_str()
            .ok_or_else(|| anyhow!("{}: a file entry has no name", mpath.display()))?;
        if name.contains('/') || name.contains("..") {
            bail!("{}: file {name} is not in the directory", mpath.display());
        }
        let workload = f["workload"]
            .as_str()
            .ok_or_else(|| anyhow!("{}: {name} has no workload", mpath.display()))?;
        let path = dir.join(name);
        let file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let table = read_table_parquet(file).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        append(&mut ex, &table, workload).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        if let Some(b) = &bar {
            b.inc(1);
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok((ex, manifest))
}

/// Appends a labels table's rows to `ex`, checking its feature definition.
fn append(ex: &mut Examples, t: &Table, workload: &str) -> Result<(), String> {
    if t.meta("feature_version") != Some(&FEATURE_VERSION.to_string()) {
        return Err(format!(
            "feature version {} but this build computes {FEATURE_VERSION}",
            t.meta("feature_version").unwrap_or("missing")
        ));
    }
    if t.meta("features") != Some(&FEATURE_NAMES.join(",")) {
        return Err("its feature names are not this build's".into());
    }
    let f32s = |name: &str| match t.column(name) {
        Some(Column::F32(v)) => Ok(v),
        _ => Err(format!("no float column {name}")),
    };
    let i64s = |name: &str| match t.column(name) {
        Some(Column::I64(v)) => Ok(v),
        _ => Err(format!("no integer column {name}")),
    };
    let cols = FEATURE_NAMES
        .iter()
        .map(|n| f32s(n))
        .collect::<Result<Vec<_>, _>>()?;
    let (page, vcpu) = (i64s("cost_page_ns")?, i64s("cost_vcpu_ns")?);
    for r in 0..t.rows {
        let mut x = [0f32; FEATURE_COUNT];
        for (j, c) in cols.iter().enumerate() {
            x[j] = c[r];
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err(format!("row {r}: a feature is not finite"));
        }
        if page[r] < 0 || vcpu[r] < 0 {
            return Err(format!("row {r}: a negative cost"));
        }
        ex.push(x, page[r] as f64, vcpu[r] as f64, workload);
    }
    Ok(())
}

/// What a model file's metadata says of its training, besides the feature definition:
/// the kind, the workloads, the held-out one, the examples, the seed, the command and the
/// dataset's shapes and links.
pub fn model_meta(
    fit: &FitArgs,
    trained_on: &[&str],
    holdout: Option<&str>,
    examples: usize,
    manifest: &Value,
) -> Vec<(&'static str, String)> {
    let command: Vec<String> = std::env::args().collect();
    let mut meta = vec![
        (
            "flotilla.model",
            format!("{:?}", fit.model).to_ascii_lowercase(),
        ),
        ("flotilla.trained_on", trained_on.join(",")),
    ];
    if let Some(w) = holdout {
        meta.push(("flotilla.holdout", w.to_string()));
    }
    meta.extend([
        ("flotilla.examples", examples.to_string()),
        ("flotilla.seed", fit.seed.to_string()),
        ("flotilla.command", command.join(" ")),
        ("flotilla.dataset_shapes", manifest["shapes"].to_string()),
        ("flotilla.dataset_link_us", manifest["link_us"].to_string()),
    ]);
    meta
}

/// A model's probability of moving the vCPU, as the trainer computes it.
pub type Predict = Box<dyn Fn(&[f32; FEATURE_COUNT]) -> f64>;

/// A trained model: its ONNX bytes and its decision as the trainer computes it.
pub struct Trained {
    pub bytes: Vec<u8>,
    pub p_vcpu: Predict,
    pub summary: Value,
}

/// Trains `kind` on `idx` of `ex`.
pub fn fit(ex: &Examples, idx: &[usize], a: &FitArgs, meta: &[(&str, String)]) -> Result<Trained> {
    match a.model {
        Kind::Logistic => {
            let bar = crate::replay::counting_bar(1, "fits");
            let m = train::logistic(
                ex,
                idx,
                &train::LogisticOptions {
                    draws: a.draws as usize,
                    seed: a.seed,
                    ..Default::default()
                },
            )?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let bytes = flotilla_learned::onnx::logistic(&m.w, m.b, meta);
            let summary = json!({
                "weights": FEATURE_NAMES.iter().zip(m.w).map(|(n, w)| (n.to_string(), json!(w))).collect::<serde_json::Map<_, _>>(),
                "bias": m.b,
            });
            Ok(Trained {
                bytes,
                p_vcpu: Box::new(move |x| m.p_vcpu(x)),
                summary,
            })
        }
        Kind::Tree => {
            let bar = crate::replay::counting_bar(a.trees, "trees");
            let trees = train::forest(
                ex,
                idx,
                &train::ForestOptions {
                    trees: a.trees as usize,
                    max_depth: a.depth as usize,
                    draws: a.draws as usize,
                    seed: a.seed,
                    ..Default::default()
                },
                &mut |_| {
                    if let Some(b) = &bar {
                        b.inc(1);
                    }
                },
            )?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let bytes = flotilla_learned::onnx::trees(&trees, meta).map_err(|e| anyhow!(e))?;
            let summary = json!({
                "trees": trees.len(),
                "nodes": trees.iter().map(Vec::len).sum::<usize>(),
            });
            Ok(Trained {
                bytes,
                p_vcpu: Box::new(move |x| train::forest_p_vcpu(&trees, x)),
                summary,
            })
        }
    }
}

/// Loads `bytes` in tract and checks its decisions against `p_vcpu` on up to 2000 of
/// `idx`: the model that is written is the model that was trained. Returns the decisions
/// compared.
fn check_in_tract(
    bytes: &[u8],
    name: &str,
    ex: &Examples,
    idx: &[usize],
    p_vcpu: &dyn Fn(&[f32; FEATURE_COUNT]) -> f64,
) -> Result<usize> {
    let model = flotilla_learned::Model::from_bytes(bytes, name)?;
    let mut state = model.state().map_err(|e| anyhow!("{name}: {e}"))?;
    let step = (idx.len() / 2000).max(1);
    let mut n = 0;
    for &i in idx.iter().step_by(step) {
        let x = &ex.x[i];
        let p = model
            .predict(&mut state, x)
            .map_err(|e| anyhow!("{name}: {e}"))? as f64;
        let q = p_vcpu(x);
        // A probability right at the threshold may round either way in f32.
        if (p > 0.5) != (q > 0.5) && (q - 0.5).abs() > 1e-4 {
            bail!("{name}: tract gives p = {p} where the trainer gives {q}, on example {i}");
        }
        n += 1;
    }
    Ok(n)
}

fn eval_json(e: &Evaluation) -> Value {
    let r = crate::bench::round3;
    json!({
        "examples": e.examples,
        "accuracy": r(e.accuracy),
        "vcpu_share": r(e.vcpu_share),
        "cost_ms": {"model": r(e.rule_ns / 1e6), "oracle": r(e.oracle_ns / 1e6),
                    "always_page": r(e.page_ns / 1e6), "always_vcpu": r(e.vcpu_ns / 1e6)},
        "gap_closed": r(e.gap_closed()),
    })
}

pub fn train(a: TrainArgs) -> Result<i32> {
    let (ex, manifest) = load(&a.data)?;
    if ex.is_empty() {
        bail!("--data {}: no labelled faults", a.data.display());
    }
    if let Some(w) = &a.holdout {
        if !ex.groups.contains(w) {
            bail!(
                "--holdout {w}: not in the data (it has {})",
                ex.groups.join(", ")
            );
        }
    }
    let train_idx = ex.select(a.holdout.as_deref(), false);
    let test_idx = a
        .holdout
        .as_deref()
        .map(|w| ex.select(Some(w), true))
        .unwrap_or_default();
    let trained_on: Vec<&str> = ex
        .groups
        .iter()
        .filter(|g| Some(g.as_str()) != a.holdout.as_deref())
        .map(String::as_str)
        .collect();
    let meta = model_meta(
        &a.fit,
        &trained_on,
        a.holdout.as_deref(),
        train_idx.len(),
        &manifest,
    );
    let t = fit(&ex, &train_idx, &a.fit, &meta)?;
    let name = a.out.display().to_string();
    let checked = check_in_tract(&t.bytes, &name, &ex, &train_idx, &*t.p_vcpu)?;
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&a.out, &t.bytes).with_context(|| format!("writing {name}"))?;
    let decide = |x: &[f32; FEATURE_COUNT]| (t.p_vcpu)(x) > 0.5;
    let on_train = train::evaluate(&ex, &train_idx, decide);
    let on_test = (!test_idx.is_empty()).then(|| train::evaluate(&ex, &test_idx, decide));
    let out = json!({
        "model": name,
        "kind": format!("{:?}", a.fit.model).to_ascii_lowercase(),
        "bytes": t.bytes.len(),
        "feature_version": FEATURE_VERSION,
        "trained_on": trained_on,
        "holdout": a.holdout,
        "train": eval_json(&on_train),
        "heldout": on_test.as_ref().map(eval_json),
        "tract_checked": checked,
        "params": t.summary,
    });
    if a.json {
        crate::say(&out.to_string());
    } else {
        crate::say(&format!(
            "{name}: {} model, {} bytes, trained on {} faults of {}",
            out["kind"].as_str().unwrap_or(""),
            t.bytes.len(),
            train_idx.len(),
            trained_on.join(",")
        ));
        let line = |what: &str, e: &Evaluation| {
            format!(
                "  {what}: {} faults, {:.1} % right, look-ahead cost {:.1} ms (oracle {:.1}, always-page {:.1}, always-vcpu {:.1}): {:.0} % of always-page's gap to the oracle closed",
                e.examples,
                100.0 * e.accuracy,
                e.rule_ns / 1e6,
                e.oracle_ns / 1e6,
                e.page_ns / 1e6,
                e.vcpu_ns / 1e6,
                100.0 * e.gap_closed()
            )
        };
        crate::say(&line("train", &on_train));
        if let (Some(e), Some(w)) = (&on_test, &a.holdout) {
            crate::say(&line(&format!("held out ({w})"), e));
        }
        crate::say(&format!(
            "  loaded in tract: its decisions match the trainer's on {checked} faults"
        ));
    }
    Ok(0)
}
