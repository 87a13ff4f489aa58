//! What a run reports: node 0's outcome as the launcher receives it ([`Reported`]), the
//! internal line that carries it from a `flotilla node` process to its launcher, and the
//! one JSON object (or text summary) a user sees.
//!
//! The internal line holds every raw latency sample so the launcher can compute
//! percentiles over all nodes; users only ever see [`summary`], which holds percentiles.

use anyhow::{anyhow, Context, Result};
use flotilla_engine::cluster::{quantile, ClusterOutcome};
use flotilla_transport::{NodeStats, Samples};
use flotilla_workloads::Workload;
use serde_json::{json, Map, Value};

/// Marks node 0's internal result line on stdout when `flotilla run` started it.
pub const RESULT_PREFIX: &str = "FLOTILLA-RESULT ";

/// A finished (or failed) cluster run, as node 0 saw it.
#[derive(Debug, Clone)]
pub struct Reported {
    /// The guest's exit code, or why the run failed.
    pub result: Result<i32, String>,
    pub report: Option<u64>,
    pub console: String,
    pub console_truncated: bool,
    pub wall_ms: f64,
    /// Summed over the nodes in `per_node` that are not `None`.
    pub totals: NodeStats,
    /// `None`: the node's counters never reached node 0.
    pub per_node: Vec<Option<NodeStats>>,
    pub samples: Samples,
    /// Events in the merged trace, if one was recorded.
    pub trace_events: Option<u64>,
    /// Why the trace asked for was not written.
    pub trace_error: Option<String>,
    /// The CPUs each node was confined to (`--cpus-per-node`), by node.
    pub cpu_sets: Option<Vec<Vec<usize>>>,
}

impl Reported {
    /// A run that ended before node 0 could report anything.
    pub fn failed(nodes: u16, why: String) -> Self {
        Reported {
            result: Err(why),
            report: None,
            console: String::new(),
            console_truncated: false,
            wall_ms: 0.0,
            totals: NodeStats::default(),
            per_node: vec![None; nodes as usize],
            samples: Samples::default(),
            trace_events: None,
            trace_error: None,
            cpu_sets: None,
        }
    }

    pub fn from_outcome(o: ClusterOutcome) -> Self {
        Reported {
            result: o.result.map_err(|e| e.to_string()),
            report: o.report,
            console: String::from_utf8_lossy(&o.console).into_owned(),
            console_truncated: o.console_truncated,
            wall_ms: o.wall.as_secs_f64() * 1e3,
            totals: o.totals,
            per_node: o.per_node,
            samples: o.samples,
            trace_events: None,
            trace_error: None,
            cpu_sets: None,
        }
    }

    /// The guest's exit code, if the run ended without an error.
    pub fn exit_code(&self) -> Option<i32> {
        self.result.as_ref().ok().copied()
    }

    /// Nodes whose counters are missing from the totals.
    pub fn missing_counters(&self) -> Vec<u16> {
        (0..self.per_node.len() as u16)
            .filter(|&n| self.per_node[n as usize].is_none())
            .collect()
    }

    /// The internal line node 0 prints for its launcher.
    pub fn to_line(&self) -> String {
        let v = json!({
            "exit_code": self.exit_code(),
            "error": self.result.as_ref().err(),
            // A hex string: a checksum above 2^53 does not survive a JSON number.
            "report": hex(self.report),
            "console": self.console,
            "console_truncated": self.console_truncated,
            "wall_ms": self.wall_ms,
            "per_node": self.per_node.iter().map(|s| s.as_ref().map(stats_json)).collect::<Vec<_>>(),
            "samples": samples_json(&self.samples),
        });
        format!("{RESULT_PREFIX}{v}")
    }

    /// Parses the part of an internal line after [`RESULT_PREFIX`].
    pub fn from_line(json: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(json).context("node 0's result line")?;
        let result = match (v["exit_code"].as_i64(), v["error"].as_str()) {
            (_, Some(e)) => Err(e.to_string()),
            (Some(code), None) => Ok(i32::try_from(code).context("node 0's exit code")?),
            (None, None) => return Err(anyhow!("node 0's result has no exit code and no error")),
        };
        let report = match v["report"].as_str() {
            Some(h) => Some(
                u64::from_str_radix(h.trim_start_matches("0x"), 16)
                    .context("node 0's reported value")?,
            ),
            None => None,
        };
        let per_node: Vec<Option<NodeStats>> = v["per_node"]
            .as_array()
            .map(|a| a.iter().map(stats_from_json).collect())
            .unwrap_or_default();
        let mut totals = NodeStats::default();
        for s in per_node.iter().flatten() {
            totals.add(s);
        }
        let mut samples = Samples::default();
        for (name, list) in sample_lists_mut(&mut samples) {
            *list = v["samples"][name]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_u64)
                        .map(|x| x as u32)
                        .collect()
                })
                .unwrap_or_default();
        }
        Ok(Reported {
            result,
            report,
            console: v["console"].as_str().unwrap_or_default().to_string(),
            console_truncated: v["console_truncated"].as_bool().unwrap_or(false),
            wall_ms: v["wall_ms"].as_f64().unwrap_or(0.0),
            totals,
            per_node,
            samples,
            trace_events: None,
            trace_error: None,
            cpu_sets: None,
        })
    }
}

fn stats_json(s: &NodeStats) -> Value {
    json!({
        "remote_faults": s.remote_faults, "page_moves": s.page_moves,
        "replicas_made": s.replicas_made, "invalidations": s.invalidations,
        "vcpu_moves": s.vcpu_moves, "bytes_sent": s.bytes_sent, "exits": s.exits,
        "pages_claimed": s.pages_claimed,
    })
}

fn stats_from_json(v: &Value) -> Option<NodeStats> {
    let n = |k: &str| v[k].as_u64();
    Some(NodeStats {
        remote_faults: n("remote_faults")?,
        page_moves: n("page_moves")?,
        replicas_made: n("replicas_made")?,
        invalidations: n("invalidations")?,
        vcpu_moves: n("vcpu_moves")?,
        bytes_sent: n("bytes_sent")?,
        exits: n("exits")?,
        pages_claimed: n("pages_claimed")?,
    })
}

fn sample_lists(s: &Samples) -> [(&'static str, &Vec<u32>); 7] {
    let lists = s.lists();
    std::array::from_fn(|i| (Samples::FIELDS[i], lists[i]))
}

fn sample_lists_mut(s: &mut Samples) -> [(&'static str, &mut Vec<u32>); 7] {
    let mut lists = s.lists_mut().into_iter();
    std::array::from_fn(|i| (Samples::FIELDS[i], lists.next().expect("7 lists")))
}

fn samples_json(s: &Samples) -> Value {
    Value::Object(
        sample_lists(s)
            .into_iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect::<Map<_, _>>(),
    )
}

/// `{p50, p99, samples}` of a list of latency samples (µs); null quantiles when empty.
pub fn percentiles(samples: &[u32]) -> Value {
    let mut v = samples.to_vec();
    if v.is_empty() {
        return json!({"p50": null, "p99": null, "samples": 0});
    }
    let p50 = quantile(&mut v, 0.5);
    let p99 = quantile(&mut v, 0.99);
    json!({"p50": p50, "p99": p99, "samples": v.len()})
}

/// `0x…` with 16 digits.
pub fn hex(v: Option<u64>) -> Option<String> {
    v.map(|v| format!("{v:#018x}"))
}

/// What was run, for the summary.
#[derive(Debug, Clone)]
pub struct RunInfo {
    /// The workload's name or the image's path.
    pub name: String,
    pub workload: Option<Workload>,
    pub vcpus: u32,
    pub nodes: u16,
    pub mem_bytes: u64,
    pub args: String,
    pub policy: String,
    pub transport: String,
    /// Emulated one-way link delay (µs).
    pub link_delay_us: u64,
}

/// Whether the run verified: `None` for external images (nothing to compare with) and
/// for a reference not computed (`--no-verify`); `Some(false)` for a workload run that
/// failed, exited non-zero, or whose checksum differs.
pub fn verified(info: &RunInfo, r: &Reported, reference: Option<u64>) -> Option<bool> {
    info.workload?;
    match (r.exit_code(), reference) {
        (Some(0), Some(want)) => Some(r.report == Some(want)),
        (Some(0), None) => None,
        _ => Some(false),
    }
}

/// The process exit status for a run: 0 when the guest exited 0 and did not fail to
/// verify, 1 when it failed or did not verify, 2 when the run ended in an error.
pub fn exit_status(info: &RunInfo, r: &Reported, reference: Option<u64>) -> i32 {
    match r.result {
        Err(_) => 2,
        Ok(0) if verified(info, r, reference) != Some(false) => 0,
        Ok(_) => 1,
    }
}

/// The one JSON object of `flotilla run --json` (and of a `flotilla node` 0 run by hand).
pub fn summary(info: &RunInfo, r: &Reported, reference: Option<u64>) -> Value {
    let t = &r.totals;
    let mut obj = json!({
        "workload": info.name,
        "vcpus": info.vcpus,
        "nodes": info.nodes,
        "policy": info.policy,
        "transport": info.transport,
        "link_delay_us": info.link_delay_us,
        "mem_bytes": info.mem_bytes,
        "args": info.args,
        "exit_code": r.exit_code(),
        "checksum": hex(r.report),
        "reference_checksum": hex(reference),
        "verified": verified(info, r, reference),
        "wall_ms": (r.wall_ms * 1000.0).round() / 1000.0,
        "exits": t.exits,
        "remote_faults": t.remote_faults,
        "page_moves": t.page_moves,
        "replicas_made": t.replicas_made,
        "invalidations": t.invalidations,
        "vcpu_moves": t.vcpu_moves,
        "pages_claimed": t.pages_claimed,
        "bytes_sent": t.bytes_sent,
        "missing_counters": r.missing_counters(),
        "fault_service_us": percentiles(&r.samples.fault_service_us),
        "vcpu_move_us": percentiles(&r.samples.vcpu_move_us),
        "claim_us": percentiles(&r.samples.claim_us),
        "rtt_4k_us": percentiles(&r.samples.rtt_4k_us),
        "install_us": percentiles(&r.samples.install_us),
        "capture_us": percentiles(&r.samples.capture_us),
        "restore_us": percentiles(&r.samples.restore_us),
        "console": r.console,
        "console_truncated": r.console_truncated,
        "trace_events": r.trace_events,
        "trace_error": r.trace_error,
        "cpu_sets": r.cpu_sets,
    });
    if let Err(e) = &r.result {
        obj["error"] = json!(e);
    }
    obj
}

/// The text summary `flotilla run` prints after the guest's console output.
pub fn text(info: &RunInfo, r: &Reported, reference: Option<u64>) -> String {
    let t = &r.totals;
    let check = match verified(info, r, reference) {
        Some(true) => "verified against the host reference".to_string(),
        Some(false) if reference.is_some() => format!(
            "MISMATCH: host reference is {}",
            hex(reference).unwrap_or_default()
        ),
        Some(false) => "not verified".to_string(),
        None if info.workload.is_some() => "not verified (--no-verify)".to_string(),
        None => "not verified (external image)".to_string(),
    };
    let ending = match &r.result {
        Ok(code) => format!("exit code {code}"),
        Err(_) => "failed".to_string(),
    };
    // A node alone has no links and nothing to place.
    let on = if info.nodes == 1 {
        "1 node".to_string()
    } else {
        format!("{} nodes ({}, {})", info.nodes, info.transport, info.policy)
    };
    let mut s = format!(
        "{}: {} vCPUs on {on}, {ending}, checksum {} ({check}), {:.1} ms\n",
        info.name,
        info.vcpus,
        hex(r.report).unwrap_or_else(|| "none".into()),
        r.wall_ms,
    );
    let missing = r.missing_counters();
    if missing.len() == r.per_node.len() {
        s += "  no counters: the run ended before the nodes reported them\n";
        return s;
    }
    s += &format!(
        "  remote faults {}, page moves {} ({} replicas), {} fresh pages claimed, invalidations {}, vCPU moves {}, {} bytes sent\n",
        t.remote_faults, t.page_moves, t.replicas_made, t.pages_claimed, t.invalidations, t.vcpu_moves, t.bytes_sent
    );
    if !missing.is_empty() {
        s += &format!("  counters missing from node(s) {missing:?}: the totals leave them out\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_internal_line_round_trips_with_a_checksum_above_2_53() {
        let mut r = Reported::failed(3, "x".into());
        r.result = Ok(0);
        r.report = Some(u64::MAX - 7);
        r.per_node = vec![
            Some(NodeStats {
                remote_faults: 5,
                exits: 9,
                ..Default::default()
            }),
            None,
            Some(NodeStats {
                remote_faults: 1,
                ..Default::default()
            }),
        ];
        r.samples.fault_service_us = vec![3, 1, 2];
        let line = r.to_line();
        let back = Reported::from_line(line.strip_prefix(RESULT_PREFIX).unwrap()).unwrap();
        assert_eq!(back.report, Some(u64::MAX - 7));
        assert_eq!(back.result, Ok(0));
        assert_eq!(back.totals.remote_faults, 6);
        assert_eq!(back.missing_counters(), vec![1]);
        assert_eq!(back.samples.fault_service_us, vec![3, 1, 2]);
    }

    #[test]
    fn a_failed_run_keeps_its_error() {
        let r = Reported::failed(2, "node 1 died".into());
        let back = Reported::from_line(r.to_line().strip_prefix(RESULT_PREFIX).unwrap()).unwrap();
        assert_eq!(back.result, Err("node 1 died".into()));
        assert_eq!(back.missing_counters(), vec![0, 1]);
    }

    #[test]
    fn percentiles_count_their_samples() {
        assert_eq!(
            percentiles(&[]),
            json!({"p50": null, "p99": null, "samples": 0})
        );
        assert_eq!(percentiles(&[5, 1, 9])["samples"], json!(3));
    }
}
