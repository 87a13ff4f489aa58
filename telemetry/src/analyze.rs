//! `flotilla trace stats`: a summary of a trace per node and per vCPU, the hottest pages,
//! how widely pages are shared, and which pages ping-pong between nodes.
//!
//! Definitions:
//! - a page is *touched* by every remote fault and every sampled access on it;
//! - its *sharing degree* is the number of distinct nodes (or vCPUs) that touched it;
//! - an *ownership transfer* is a page arriving somewhere as owner (`page_in`, write);
//!   a *bounce* is a transfer back to the node that owned the page two transfers
//!   before (A → B → A); a page with at least [`PING_PONG_BOUNCES`] bounces ping-pongs.

use crate::trace::{
    Event, EventKind, Outcome, Trace, ACCESS_WRITE, DECISION_MOVE_PAGE, DECISION_MOVE_VCPU,
};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

pub const PING_PONG_BOUNCES: u64 = 2;
const TOP: usize = 10;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub workload: String,
    pub args: String,
    pub policy: String,
    pub transport: String,
    pub nodes: u16,
    pub vcpus: u32,
    pub sample_rate: u32,
    /// "completed", "failed", or "unknown" (a version 1 trace).
    pub outcome: String,
    /// Why a failed run failed.
    pub error: String,
    /// Nodes whose events the trace lacks.
    pub missing_nodes: Vec<u16>,
    pub events: u64,
    /// From the first to the last event.
    pub span_ms: f64,
    pub by_kind: BTreeMap<String, u64>,
    pub per_node: Vec<NodeSummary>,
    pub per_vcpu: Vec<VcpuSummary>,
    pub hottest_pages: Vec<PageSummary>,
    /// Sharing degree → number of pages, by distinct nodes and by distinct vCPUs.
    pub sharing_by_nodes: BTreeMap<u32, u64>,
    pub sharing_by_vcpus: BTreeMap<u32, u64>,
    pub ping_pong_pages: u64,
    pub top_ping_pong: Vec<PingPong>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct NodeSummary {
    pub node: u16,
    pub remote_faults: u64,
    pub read_faults: u64,
    pub write_faults: u64,
    pub decided_move_page: u64,
    pub decided_move_vcpu: u64,
    pub pages_in: u64,
    pub pages_out: u64,
    pub vcpus_in: u64,
    pub vcpus_out: u64,
    pub invalidations: u64,
    pub access_samples: u64,
    pub fault_service_p50_us: Option<f64>,
    pub fault_service_p99_us: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct VcpuSummary {
    pub vcpu: u16,
    pub remote_faults: u64,
    pub moves: u64,
    pub access_samples: u64,
    pub distinct_pages: u64,
    pub nodes_visited: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PageSummary {
    pub page: u64,
    pub touches: u64,
    pub remote_faults: u64,
    pub nodes: u32,
    pub vcpus: u32,
    pub ownership_transfers: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PingPong {
    pub page: u64,
    pub bounces: u64,
    pub ownership_transfers: u64,
    /// The owners in order, up to the first 16.
    pub owners: Vec<u16>,
}

#[derive(Default)]
struct PageAcc {
    touches: u64,
    faults: u64,
    nodes: u64,
    vcpus: u64,
    owners: Vec<u16>,
    transfers: u64,
    bounces: u64,
}

fn quantile_us(v: &mut [u32], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    Some(v[i] as f64 / 1000.0)
}

fn bit(i: u16) -> u64 {
    1u64 << (i % 64)
}

/// Summarizes a (validated) trace.
pub fn summarize(t: &Trace) -> Summary {
    let m = &t.meta;
    let mut nodes: Vec<NodeSummary> = (0..m.nodes)
        .map(|node| NodeSummary {
            node,
            ..Default::default()
        })
        .collect();
    let mut vcpus: Vec<VcpuSummary> = (0..m.vcpus.min(u16::MAX as u32) as u16)
        .map(|vcpu| VcpuSummary {
            vcpu,
            ..Default::default()
        })
        .collect();
    let mut service: Vec<Vec<u32>> = vec![Vec::new(); m.nodes as usize];
    let mut vcpu_pages: Vec<std::collections::HashSet<u64>> = vec![Default::default(); vcpus.len()];
    let mut vcpu_nodes: Vec<u64> = vec![0; vcpus.len()];
    let mut pages: HashMap<u64, PageAcc> = HashMap::new();
    let mut by_kind = BTreeMap::new();
    for e in &t.events {
        let Some(kind) = e.kind() else { continue };
        *by_kind.entry(kind.name().to_string()).or_insert(0u64) += 1;
        let n = &mut nodes[e.node as usize];
        let v = vcpus.get_mut(e.vcpu as usize);
        match kind {
            EventKind::RemoteFault => {
                n.remote_faults += 1;
                if e.access == ACCESS_WRITE {
                    n.write_faults += 1;
                } else {
                    n.read_faults += 1;
                }
                match e.decision {
                    DECISION_MOVE_PAGE => {
                        n.decided_move_page += 1;
                        service[e.node as usize].push(e.service_ns);
                    }
                    DECISION_MOVE_VCPU => n.decided_move_vcpu += 1,
                    _ => {}
                }
                if let Some(v) = v {
                    v.remote_faults += 1;
                }
                touch(&mut pages, e, true);
            }
            EventKind::AccessSample => {
                n.access_samples += 1;
                if let Some(v) = v {
                    v.access_samples += 1;
                }
                touch(&mut pages, e, false);
            }
            EventKind::PageIn => {
                n.pages_in += 1;
                if e.access == ACCESS_WRITE {
                    let p = pages.entry(e.page).or_default();
                    p.transfers += 1;
                    let len = p.owners.len();
                    if len >= 2 && p.owners[len - 2] == e.node && p.owners[len - 1] != e.node {
                        p.bounces += 1;
                    }
                    p.owners.push(e.node);
                }
            }
            EventKind::PageOut => n.pages_out += 1,
            EventKind::VcpuOut => {
                n.vcpus_out += 1;
                if let Some(v) = v {
                    v.moves += 1;
                }
            }
            EventKind::VcpuIn => n.vcpus_in += 1,
            EventKind::Invalidate => n.invalidations += 1,
        }
        if matches!(
            kind,
            EventKind::RemoteFault | EventKind::AccessSample | EventKind::VcpuIn
        ) && (e.vcpu as usize) < vcpu_pages.len()
        {
            if kind != EventKind::VcpuIn {
                vcpu_pages[e.vcpu as usize].insert(e.page);
            }
            vcpu_nodes[e.vcpu as usize] |= bit(e.node);
        }
    }
    for (n, s) in nodes.iter_mut().zip(service.iter_mut()) {
        n.fault_service_p50_us = quantile_us(s, 0.5);
        n.fault_service_p99_us = quantile_us(s, 0.99);
    }
    for (i, v) in vcpus.iter_mut().enumerate() {
        v.distinct_pages = vcpu_pages[i].len() as u64;
        v.nodes_visited = vcpu_nodes[i].count_ones() as u64;
    }
    let mut sharing_by_nodes = BTreeMap::new();
    let mut sharing_by_vcpus = BTreeMap::new();
    for p in pages.values().filter(|p| p.touches > 0) {
        *sharing_by_nodes.entry(p.nodes.count_ones()).or_insert(0) += 1;
        *sharing_by_vcpus.entry(p.vcpus.count_ones()).or_insert(0) += 1;
    }
    let mut hot: Vec<(&u64, &PageAcc)> = pages.iter().filter(|(_, p)| p.touches > 0).collect();
    hot.sort_by(|a, b| b.1.touches.cmp(&a.1.touches).then(a.0.cmp(b.0)));
    let hottest_pages = hot
        .iter()
        .take(TOP)
        .map(|(&page, p)| PageSummary {
            page,
            touches: p.touches,
            remote_faults: p.faults,
            nodes: p.nodes.count_ones(),
            vcpus: p.vcpus.count_ones(),
            ownership_transfers: p.transfers,
        })
        .collect();
    let mut pp: Vec<(&u64, &PageAcc)> = pages
        .iter()
        .filter(|(_, p)| p.bounces >= PING_PONG_BOUNCES)
        .collect();
    pp.sort_by(|a, b| b.1.bounces.cmp(&a.1.bounces).then(a.0.cmp(b.0)));
    let span_ms = match (
        t.events.iter().map(|e| e.t_ns).min(),
        t.events.iter().map(|e| e.t_ns).max(),
    ) {
        (Some(a), Some(b)) => (b - a) as f64 / 1e6,
        _ => 0.0,
    };
    Summary {
        workload: m.workload.clone(),
        args: m.args.clone(),
        policy: m.policy.clone(),
        transport: m.transport.clone(),
        nodes: m.nodes,
        vcpus: m.vcpus,
        sample_rate: m.sample_rate,
        outcome: match m.run.as_ref().map(|r| r.outcome) {
            Some(Outcome::Completed) => "completed",
            Some(Outcome::Failed) => "failed",
            None => "unknown",
        }
        .into(),
        error: m.run.as_ref().map(|r| r.error.clone()).unwrap_or_default(),
        missing_nodes: m
            .run
            .as_ref()
            .map(|r| r.missing_nodes.clone())
            .unwrap_or_default(),
        events: t.events.len() as u64,
        span_ms,
        by_kind,
        per_node: nodes,
        per_vcpu: vcpus,
        hottest_pages,
        sharing_by_nodes,
        sharing_by_vcpus,
        ping_pong_pages: pp.len() as u64,
        top_ping_pong: pp
            .iter()
            .take(TOP)
            .map(|(&page, p)| PingPong {
                page,
                bounces: p.bounces,
                ownership_transfers: p.transfers,
                owners: p.owners.iter().take(16).copied().collect(),
            })
            .collect(),
    }
}

fn touch(pages: &mut HashMap<u64, PageAcc>, e: &Event, fault: bool) {
    let p = pages.entry(e.page).or_default();
    p.touches += 1;
    if fault {
        p.faults += 1;
    }
    p.nodes |= bit(e.node);
    p.vcpus |= bit(e.vcpu);
}

/// The summary as text for people.
pub fn render(s: &Summary) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} ({}) on {} nodes, {} vCPUs, policy {}, {}; {} events over {:.1} ms; sampling {} pages/s",
        s.workload,
        if s.args.is_empty() { "default args" } else { &s.args },
        s.nodes,
        s.vcpus,
        s.policy,
        s.transport,
        s.events,
        s.span_ms,
        s.sample_rate
    );
    let kinds: Vec<String> = s.by_kind.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(o, "events: {}", kinds.join(", "));
    if s.outcome == "failed" {
        let _ = writeln!(o, "the run failed: {}", s.error);
    }
    if !s.missing_nodes.is_empty() {
        let _ = writeln!(
            o,
            "incomplete: no events from node(s) {:?} (their part of the trace was lost)",
            s.missing_nodes
        );
    }
    let _ = writeln!(o, "\nnode  faults  (read/write)  move-page  move-vcpu  pages in/out  vcpus in/out  inval  samples  service p50/p99 us");
    let us = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    for n in &s.per_node {
        let _ = writeln!(
            o,
            "{:>4}  {:>6}  ({:>5}/{:<5})  {:>9}  {:>9}  {:>6}/{:<6}  {:>5}/{:<6}  {:>5}  {:>7}  {}/{}",
            n.node,
            n.remote_faults,
            n.read_faults,
            n.write_faults,
            n.decided_move_page,
            n.decided_move_vcpu,
            n.pages_in,
            n.pages_out,
            n.vcpus_in,
            n.vcpus_out,
            n.invalidations,
            n.access_samples,
            us(n.fault_service_p50_us),
            us(n.fault_service_p99_us)
        );
    }
    let _ = writeln!(o, "\nvcpu  faults  moves  samples  pages  nodes");
    for v in &s.per_vcpu {
        let _ = writeln!(
            o,
            "{:>4}  {:>6}  {:>5}  {:>7}  {:>5}  {:>5}",
            v.vcpu, v.remote_faults, v.moves, v.access_samples, v.distinct_pages, v.nodes_visited
        );
    }
    let _ = writeln!(
        o,
        "\nhottest pages (touches = remote faults + sampled accesses):"
    );
    for p in &s.hottest_pages {
        let _ = writeln!(
            o,
            "  page {:#x}: {} touches, {} faults, {} nodes, {} vCPUs, {} ownership transfers",
            p.page, p.touches, p.remote_faults, p.nodes, p.vcpus, p.ownership_transfers
        );
    }
    let hist = |h: &BTreeMap<u32, u64>| {
        h.iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        o,
        "\nsharing degree (pages touched by k nodes): {}",
        hist(&s.sharing_by_nodes)
    );
    let _ = writeln!(
        o,
        "sharing degree (pages touched by k vCPUs): {}",
        hist(&s.sharing_by_vcpus)
    );
    let _ = writeln!(
        o,
        "\nping-pong pages (ownership came back at least {PING_PONG_BOUNCES} times): {}",
        s.ping_pong_pages
    );
    for p in &s.top_ping_pong {
        let _ = writeln!(
            o,
            "  page {:#x}: {} bounces in {} transfers, owners {:?}",
            p.page, p.bounces, p.ownership_transfers, p.owners
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{TraceMeta, ACCESS_READ, NONE16};

    fn ev(kind: EventKind, node: u16, vcpu: u16, page: u64, access: u8) -> Event {
        Event {
            t_ns: 0,
            page,
            rip: 0,
            service_ns: 1000,
            vcpu,
            node,
            peer: NONE16,
            replicas: NONE16,
            kind: kind as u8,
            access,
            decision: if kind == EventKind::RemoteFault {
                DECISION_MOVE_PAGE
            } else {
                0
            },
            flags: 0,
        }
    }

    #[test]
    fn counts_sharing_and_ping_pong() {
        use EventKind::*;
        let mut events = vec![
            ev(RemoteFault, 0, 0, 10, ACCESS_WRITE),
            ev(RemoteFault, 1, 1, 10, ACCESS_READ),
            ev(AccessSample, 1, 1, 11, ACCESS_READ),
            ev(AccessSample, 1, 2, 11, ACCESS_READ),
        ];
        // Page 10's ownership: 0 → 1 → 0 → 1 → 0: three bounces.
        for n in [0, 1, 0, 1, 0] {
            events.push(ev(PageIn, n, NONE16, 10, ACCESS_WRITE));
        }
        // Page 12: 0 → 1 → 2: no bounce.
        for n in [0, 1, 2] {
            events.push(ev(PageIn, n, NONE16, 12, ACCESS_WRITE));
        }
        for (i, e) in events.iter_mut().enumerate() {
            e.t_ns = i as u64 * 1_000_000;
        }
        let t = Trace {
            meta: TraceMeta {
                nodes: 3,
                vcpus: 3,
                ..Default::default()
            },
            events,
        };
        let s = summarize(&t);
        assert_eq!(s.per_node[0].remote_faults, 1);
        assert_eq!(s.per_node[0].write_faults, 1);
        assert_eq!(s.per_node[1].read_faults, 1);
        assert_eq!(s.per_node[1].access_samples, 2);
        assert_eq!(s.per_node[0].fault_service_p50_us, Some(1.0));
        assert_eq!(s.sharing_by_nodes, BTreeMap::from([(1, 1), (2, 1)]));
        assert_eq!(s.sharing_by_vcpus, BTreeMap::from([(2, 2)]));
        assert_eq!(s.ping_pong_pages, 1);
        assert_eq!(s.top_ping_pong[0].page, 10);
        assert_eq!(s.top_ping_pong[0].bounces, 3);
        assert_eq!(s.hottest_pages[0].touches, 2);
        assert_eq!(s.per_vcpu[1].distinct_pages, 2);
        assert_eq!(s.span_ms, 11.0);
        assert!(render(&s).contains("ping-pong pages"));
    }
}
