//! The learned-policy loop as a user runs it on the committed datasets: `dataset build`,
//! `train`, `learn`, serving the model in `replay` and `bench policy`, and the errors on
//! bad data. No KVM: the simulator replays recorded traces.

mod common;

use common::{flotilla, json, repo, stderr};
use std::path::{Path, PathBuf};

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flotilla-learn-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn traces() -> String {
    repo().join("datasets/traces").display().to_string()
}

fn build(out: &Path) -> std::process::Output {
    flotilla(&[
        "dataset",
        "build",
        "--traces",
        &traces(),
        "--out",
        out.to_str().unwrap(),
        "--workloads",
        "sort,matmul",
        "--shapes",
        "2x1,4x1",
        "--link-us",
        "15",
        "--behaviour",
        "oracle,always-page",
        "--max-rows",
        "3000",
    ])
}

#[test]
fn a_dataset_is_built_deterministically_and_trains_models_that_serve() {
    let (a, b) = (temp("data-a"), temp("data-b"));
    for d in [&a, &b] {
        let out = build(d);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("manifest.json")).unwrap()).unwrap();
    // 2 workloads × 2 traces (2 and 4 nodes) × 2 behaviours × 2 shapes × 1 link.
    let files = manifest["files"].as_array().unwrap();
    assert_eq!(files.len(), 16, "{manifest}");
    assert!(manifest["rows"].as_u64().unwrap() > 100, "{manifest}");
    assert_eq!(manifest["continuation"], "heuristic");
    for f in files {
        let name = f["file"].as_str().unwrap();
        assert!(f["rows"].as_u64().unwrap() <= 3000);
        assert_eq!(
            std::fs::read(a.join(name)).unwrap(),
            std::fs::read(b.join(name)).unwrap(),
            "{name} differs between two builds"
        );
    }
    let data = a.to_str().unwrap();
    for kind in ["tree", "logistic"] {
        let model = a.join(format!("{kind}.onnx"));
        let out = flotilla(&[
            "train",
            "--data",
            data,
            "--model",
            kind,
            "-o",
            model.to_str().unwrap(),
            "--holdout",
            "matmul",
            "--trees",
            "2",
            "--json",
        ]);
        assert!(out.status.success(), "{kind}: {}", stderr(&out));
        let v = json(&out);
        assert_eq!(v["trained_on"], serde_json::json!(["sort"]), "{v}");
        assert!(v["heldout"]["examples"].as_u64().unwrap() > 0, "{v}");
        assert!(v["tract_checked"].as_u64().unwrap() > 0, "{v}");
        // The model serves in the simulator.
        let out = flotilla(&[
            "replay",
            &format!("{}/matmul-2n-always-page.ftrace.gz", traces()),
            "--policy",
            "learned",
            "--model",
            model.to_str().unwrap(),
            "--json",
        ]);
        assert!(out.status.success(), "{kind}: {}", stderr(&out));
        assert_eq!(json(&out)["policy"], "learned");
    }
    // Decision latency of a few policies, the model's included.
    let out = flotilla(&[
        "bench",
        "policy",
        "--trace",
        &format!("{}/sort-2n-always-page.ftrace.gz", traces()),
        "--policies",
        "heuristic,learned",
        "--model",
        a.join("tree.onnx").to_str().unwrap(),
        "--runs",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = json(&out);
    let rows = v["policies"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{v}");
    for r in rows {
        assert!(r["decisions"].as_u64().unwrap() > 0, "{v}");
        assert!(r["p99_ns"].as_u64().unwrap() >= r["p50_ns"].as_u64().unwrap());
    }

    // Bad data is named.
    let bad = |args: &[&str], want: &str| {
        let out = flotilla(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    };
    let m = a.join("m.onnx");
    let m = m.to_str().unwrap();
    bad(
        &[
            "train",
            "--data",
            data,
            "--model",
            "tree",
            "-o",
            m,
            "--holdout",
            "nope",
        ],
        "--holdout nope: not in the data",
    );
    bad(
        &[
            "train",
            "--data",
            "/nonexistent",
            "--model",
            "tree",
            "-o",
            m,
        ],
        "manifest.json",
    );
    let first = files[0]["file"].as_str().unwrap();
    std::fs::write(a.join(first), b"not parquet").unwrap();
    bad(
        &["train", "--data", data, "--model", "tree", "-o", m],
        first,
    );
    let text = std::fs::read_to_string(a.join("manifest.json")).unwrap();
    std::fs::write(
        a.join("manifest.json"),
        text.replacen("\"feature_version\": 1", "\"feature_version\": 0", 1),
    )
    .unwrap();
    bad(
        &["train", "--data", data, "--model", "tree", "-o", m],
        "rebuild the dataset",
    );
    bad(
        &["dataset", "build", "--out", data, "--shapes", "4"],
        "NODESxCPUS",
    );
    bad(
        &[
            "dataset",
            "build",
            "--out",
            data,
            "--continuation",
            "numa-balancing",
        ],
        "keeps state of its own",
    );
    for d in [a, b] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn learn_runs_the_loop_and_writes_a_model_with_its_card() {
    let work = temp("work");
    let models = work.join("models");
    let out = flotilla(&[
        "learn",
        "--traces",
        &traces(),
        "--work",
        work.to_str().unwrap(),
        "--models",
        models.to_str().unwrap(),
        "--name",
        "t",
        "--workloads",
        "sort,matmul",
        "--shapes",
        "2x1",
        "--link-us",
        "15",
        "--behaviour",
        "oracle,always-page",
        "--trees",
        "2",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v = json(&out);
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{v}");
    for r in rows {
        assert!(r["learned_ms"].as_f64().unwrap() > 0.0, "{v}");
        assert!(r["best_ms"].as_f64().unwrap() > 0.0, "{v}");
    }
    assert!(v["summary"][0]["geomean_ratio"].as_f64().is_some(), "{v}");
    let card = std::fs::read_to_string(models.join("t.md")).unwrap();
    assert!(card.contains("flotilla learn --traces"), "{card}");
    assert!(card.contains("| held-out workload |"), "{card}");
    assert!(work.join("heldout-sort.onnx").exists());
    let out = flotilla(&[
        "replay",
        &format!("{}/sort-2n-always-page.ftrace.gz", traces()),
        "--policy",
        "learned",
        "--model",
        models.join("t.onnx").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::remove_dir_all(work).unwrap();
}
