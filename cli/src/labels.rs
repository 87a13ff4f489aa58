//! `flotilla replay --labels FILE`: one row per decided fault, for training a learned
//! policy (docs/simulator.md lists the columns).

use flotilla_placement::features::{FEATURE_NAMES, FEATURE_VERSION};
use flotilla_sim::{Decision, Label, Shape};
use flotilla_telemetry::export::{write_table_parquet, Column};
use flotilla_telemetry::trace::Trace;

fn name(d: Decision) -> String {
    match d {
        Decision::MovePage => "move_page",
        Decision::MoveVcpu => "move_vcpu",
    }
    .to_string()
}

/// Writes `labels` as Parquet: `t_ns`, `vcpu`, `node`, `page`, `holder`, the features by
/// name, `cost_page_ns`, `cost_vcpu_ns`, `best` (the cheaper, `move_page` on a tie) and
/// `taken` (what the replay did). The key-value metadata says what was replayed, with
/// `extra` entries after the fixed ones.
pub fn write(
    file: std::fs::File,
    labels: &[Label],
    trace: &Trace,
    policy: &str,
    shape: &Shape,
    horizon: u64,
    extra: &[(&str, String)],
) -> Result<(), String> {
    let ints = |f: fn(&Label) -> i64| Column::I64(labels.iter().map(f).collect());
    let mut columns = vec![
        ("t_ns", ints(|l| l.t_ns as i64)),
        ("vcpu", ints(|l| l.vcpu as i64)),
        ("node", ints(|l| l.node as i64)),
        ("page", ints(|l| l.page as i64)),
        ("holder", ints(|l| l.holder as i64)),
    ];
    for (i, n) in FEATURE_NAMES.iter().enumerate() {
        columns.push((
            n,
            Column::F32(labels.iter().map(|l| l.features[i]).collect()),
        ));
    }
    columns.push(("cost_page_ns", ints(|l| l.cost_page_ns as i64)));
    columns.push(("cost_vcpu_ns", ints(|l| l.cost_vcpu_ns as i64)));
    columns.push((
        "best",
        Column::Str(
            labels
                .iter()
                .map(|l| {
                    name(if l.cost_vcpu_ns < l.cost_page_ns {
                        Decision::MoveVcpu
                    } else {
                        Decision::MovePage
                    })
                })
                .collect(),
        ),
    ));
    columns.push((
        "taken",
        Column::Str(labels.iter().map(|l| name(l.taken)).collect()),
    ));
    let m = &trace.meta;
    let mut meta = vec![
        ("workload", m.workload.clone()),
        ("args", m.args.clone()),
        ("recorded_policy", m.policy.clone()),
        ("policy", policy.to_string()),
        ("nodes", shape.nodes.to_string()),
        ("cpus_per_node", shape.cpus.to_string()),
        ("horizon", horizon.to_string()),
        ("feature_version", FEATURE_VERSION.to_string()),
        ("features", FEATURE_NAMES.join(",")),
    ];
    meta.extend(extra.iter().cloned());
    write_table_parquet(file, &columns, &meta)
}
