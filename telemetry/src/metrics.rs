//! A node's Prometheus metrics. Every metric carries a constant `node` label, so the
//! scrapes of all nodes can be summed or compared in one query.
//!
//! Counters and histograms are updated on the fault path (one atomic add each); values
//! that live elsewhere (bytes on the transport, pages and vCPUs resident, health
//! signals) are copied in by [`NodeMetrics::refresh`] just before each scrape.

use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// What the engine reports at scrape time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub pages_resident: u64,
    pub vcpus_resident: u64,
    /// `(signal, value)`, from [`crate::health::HealthReader::read`].
    pub health: Vec<(String, f64)>,
}

/// See the module documentation.
pub struct NodeMetrics {
    registry: Registry,
    remote_faults: IntCounterVec,
    page_moves: IntCounterVec,
    vcpu_moves: IntCounterVec,
    /// The labelled series the fault path uses, looked up once: read, write; in, out.
    faults_by_kind: [IntCounter; 2],
    pages_by_direction: [IntCounter; 2],
    vcpus_by_direction: [IntCounter; 2],
    invalidations: IntCounter,
    access_samples: IntCounter,
    bytes: IntCounterVec,
    fault_service: Histogram,
    vcpu_move: Histogram,
    policy_decision: Histogram,
    pages_resident: IntGauge,
    vcpus_resident: IntGauge,
    health: prometheus::GaugeVec,
    trace_events: IntCounter,
}

/// Which way a page or vCPU went, relative to this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    In = 0,
    Out = 1,
}

impl Direction {
    fn label(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Only reachable with a malformed name or label set in this file, which the unit test
    // below exercises.
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl NodeMetrics {
    pub fn new(node: u16) -> Self {
        let registry = Registry::new();
        let opts =
            |name: &str, help: &str| Opts::new(name, help).const_label("node", node.to_string());
        let hopts = |name: &str, help: &str, buckets: Vec<f64>| {
            HistogramOpts::new(name, help)
                .const_label("node", node.to_string())
                .buckets(buckets)
        };
        // 1 µs .. about 4 s, doubling.
        let latency = must(exponential_buckets(1e-6, 2.0, 23));
        // 100 ns .. about 0.4 s, doubling.
        let decision = must(exponential_buckets(1e-7, 2.0, 23));
        let remote_faults = must(IntCounterVec::new(
            opts(
                "flotilla_remote_faults_total",
                "Guest accesses to a page this node did not hold well enough, by access kind (read, write).",
            ),
            &["kind"],
        ));
        let page_moves = must(IntCounterVec::new(
            opts(
                "flotilla_page_moves_total",
                "Pages that arrived at (in) or were sent from (out) this node.",
            ),
            &["direction"],
        ));
        let vcpu_moves = must(IntCounterVec::new(
            opts(
                "flotilla_vcpu_moves_total",
                "vCPUs that arrived at (in) or left (out) this node.",
            ),
            &["direction"],
        ));
        // Every labelled series exists from the first scrape on, at zero.
        let faults_by_kind = ["read", "write"].map(|k| remote_faults.with_label_values(&[k]));
        let pages_by_direction =
            [Direction::In, Direction::Out].map(|d| page_moves.with_label_values(&[d.label()]));
        let vcpus_by_direction =
            [Direction::In, Direction::Out].map(|d| vcpu_moves.with_label_values(&[d.label()]));
        let m = NodeMetrics {
            faults_by_kind,
            pages_by_direction,
            vcpus_by_direction,
            remote_faults,
            page_moves,
            vcpu_moves,
            invalidations: must(IntCounter::with_opts(opts(
                "flotilla_invalidations_total",
                "Read-only copies this node dropped because another node wrote the page.",
            ))),
            access_samples: must(IntCounter::with_opts(opts(
                "flotilla_access_samples_total",
                "Accesses caught by the sampled access tracking (hinting faults).",
            ))),
            bytes: must(IntCounterVec::new(
                opts(
                    "flotilla_bytes_total",
                    "Frame bytes this node's transport sent or received, headers included.",
                ),
                &["direction"],
            )),
            fault_service: must(Histogram::with_opts(hopts(
                "flotilla_fault_service_seconds",
                "Remote faults served by bringing the page: from the fault exit to re-entry.",
                latency.clone(),
            ))),
            vcpu_move: must(Histogram::with_opts(hopts(
                "flotilla_vcpu_move_seconds",
                "vCPUs that arrived here: from the fault on the source node to re-entry here.",
                latency,
            ))),
            policy_decision: must(Histogram::with_opts(hopts(
                "flotilla_policy_decision_seconds",
                "Time the placement policy took to decide one fault.",
                decision,
            ))),
            pages_resident: must(IntGauge::with_opts(opts(
                "flotilla_pages_resident",
                "Guest pages this node holds a copy of (owned or read-only).",
            ))),
            vcpus_resident: must(IntGauge::with_opts(opts(
                "flotilla_vcpus_resident",
                "vCPUs running on this node now.",
            ))),
            health: must(prometheus::GaugeVec::new(
                opts(
                    "flotilla_node_health",
                    "Hardware health signals read from /sys (or injected), by signal.",
                ),
                &["signal"],
            )),
            trace_events: must(IntCounter::with_opts(opts(
                "flotilla_trace_events_total",
                "Events this node recorded into its fault trace.",
            ))),
            registry,
        };
        for c in [
            Box::new(m.remote_faults.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.page_moves.clone()),
            Box::new(m.vcpu_moves.clone()),
            Box::new(m.invalidations.clone()),
            Box::new(m.access_samples.clone()),
            Box::new(m.bytes.clone()),
            Box::new(m.fault_service.clone()),
            Box::new(m.vcpu_move.clone()),
            Box::new(m.policy_decision.clone()),
            Box::new(m.pages_resident.clone()),
            Box::new(m.vcpus_resident.clone()),
            Box::new(m.health.clone()),
            Box::new(m.trace_events.clone()),
        ] {
            must(m.registry.register(c));
        }
        for d in ["sent", "received"] {
            m.bytes.with_label_values(&[d]);
        }
        m
    }

    pub fn remote_fault(&self, write: bool) {
        self.faults_by_kind[write as usize].inc();
    }

    pub fn page_move(&self, d: Direction) {
        self.pages_by_direction[d as usize].inc();
    }

    pub fn vcpu_move(&self, d: Direction) {
        self.vcpus_by_direction[d as usize].inc();
    }

    pub fn invalidation(&self) {
        self.invalidations.inc();
    }

    pub fn access_sample(&self) {
        self.access_samples.inc();
    }

    pub fn trace_event(&self) {
        self.trace_events.inc();
    }

    /// Remote faults so far, reads and writes.
    pub fn remote_faults(&self) -> u64 {
        self.faults_by_kind.iter().map(IntCounter::get).sum()
    }

    pub fn page_moves(&self, d: Direction) -> u64 {
        self.pages_by_direction[d as usize].get()
    }

    pub fn vcpu_moves(&self, d: Direction) -> u64 {
        self.vcpus_by_direction[d as usize].get()
    }

    pub fn invalidations(&self) -> u64 {
        self.invalidations.get()
    }

    pub fn fault_service(&self, seconds: f64) {
        self.fault_service.observe(seconds);
    }

    pub fn vcpu_move_time(&self, seconds: f64) {
        self.vcpu_move.observe(seconds);
    }

    pub fn policy_decision(&self, seconds: f64) {
        self.policy_decision.observe(seconds);
    }

    /// Copies in the values kept elsewhere.
    pub fn refresh(&self, s: &Snapshot) {
        set_counter(&self.bytes.with_label_values(&["sent"]), s.bytes_sent);
        set_counter(
            &self.bytes.with_label_values(&["received"]),
            s.bytes_received,
        );
        self.pages_resident
            .set(s.pages_resident.min(i64::MAX as u64) as i64);
        self.vcpus_resident
            .set(s.vcpus_resident.min(i64::MAX as u64) as i64);
        for (signal, value) in &s.health {
            self.health.with_label_values(&[signal]).set(*value);
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Raises a counter to `value` (a counter that is already higher stays: counters never
/// go down).
fn set_counter(c: &IntCounter, value: u64) {
    let now = c.get();
    if value > now {
        c.inc_by(value - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_carries_the_node_label() {
        let m = NodeMetrics::new(3);
        m.remote_fault(true);
        m.fault_service(25e-6);
        m.refresh(&Snapshot {
            bytes_sent: 10,
            bytes_received: 20,
            pages_resident: 5,
            vcpus_resident: 1,
            health: vec![("thermal_max_celsius".into(), 41.5)],
        });
        m.refresh(&Snapshot {
            bytes_sent: 7,
            ..Default::default()
        });
        let text = m.encode();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.contains("node=\"3\""), "no node label: {line}");
        }
        assert!(text.contains("flotilla_remote_faults_total{kind=\"write\",node=\"3\"} 1"));
        assert!(text.contains("flotilla_remote_faults_total{kind=\"read\",node=\"3\"} 0"));
        assert!(text.contains("flotilla_bytes_total{direction=\"sent\",node=\"3\"} 10"));
        assert!(
            text.contains("flotilla_node_health{node=\"3\",signal=\"thermal_max_celsius\"} 41.5")
        );
        assert!(text.contains("flotilla_fault_service_seconds_count{node=\"3\"} 1"));
    }
}
