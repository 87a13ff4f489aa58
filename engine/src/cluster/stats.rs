//! What a node counts besides its metrics: counters the metrics do not keep, and
//! latency samples (a reservoir per kind), which travel to node 0 at the end of a run.

use flotilla_placement::LinkCost;
use flotilla_transport::{wire::MAX_SAMPLES, Samples};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What the metrics do not already count (faults, moves and invalidations are read
/// back from [`NodeMetrics`]).
#[derive(Default)]
pub(super) struct Counters {
    pub replicas_made: AtomicU64,
    /// Pages of fresh memory this node claimed (owned with no data sent).
    pub pages_claimed: AtomicU64,
    pub exits: AtomicU64,
}

/// Latency samples, at most [`MAX_SAMPLES`] of each kind (then a reservoir).
#[derive(Default)]
pub(super) struct SampleSet {
    pub samples: Samples,
    seen: [u64; 7],
}

#[derive(Clone, Copy)]
pub(super) enum Sample {
    FaultService = 0,
    VcpuMove = 1,
    Install = 2,
    Capture = 3,
    Restore = 4,
    Rtt = 5,
    /// A remote fault served by a claim of fresh memory (no data).
    Claim = 6,
}

impl SampleSet {
    pub fn push(&mut self, kind: Sample, d: Duration) {
        let us = d.as_micros().min(u32::MAX as u128) as u32;
        let s = &mut self.samples;
        let list = match kind {
            Sample::FaultService => &mut s.fault_service_us,
            Sample::VcpuMove => &mut s.vcpu_move_us,
            Sample::Install => &mut s.install_us,
            Sample::Capture => &mut s.capture_us,
            Sample::Restore => &mut s.restore_us,
            Sample::Rtt => &mut s.rtt_4k_us,
            Sample::Claim => &mut s.claim_us,
        };
        let seen = &mut self.seen[kind as usize];
        *seen += 1;
        if list.len() < MAX_SAMPLES {
            list.push(us);
        } else {
            let j = (seen.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % *seen;
            if (j as usize) < MAX_SAMPLES {
                list[j as usize] = us;
            }
        }
    }
}

/// A node's running estimate of what its remote faults cost, which policies see as
/// [`FaultContext::link`](flotilla_placement::FaultContext): each kind an average that
/// decays by 1/8 a sample, in nanoseconds; a page fetch starts from the first bare
/// round trip measured. Racy updates lose a sample at worst.
#[derive(Default)]
pub(super) struct LinkEstimate {
    page_ns: AtomicU64,
    vcpu_ns: AtomicU64,
}

impl LinkEstimate {
    pub fn observe(&self, kind: Sample, d: Duration) {
        let ns = d.as_nanos().min(u64::MAX as u128 / 8) as u64;
        let slot = match kind {
            Sample::FaultService => &self.page_ns,
            Sample::VcpuMove => &self.vcpu_ns,
            Sample::Rtt if self.page_ns.load(Ordering::Relaxed) == 0 => &self.page_ns,
            _ => return,
        };
        let old = slot.load(Ordering::Relaxed);
        let new = if old == 0 { ns } else { (old * 7 + ns) / 8 };
        slot.store(new, Ordering::Relaxed);
    }

    pub fn get(&self) -> LinkCost {
        LinkCost {
            page_us: self.page_ns.load(Ordering::Relaxed) as f32 / 1e3,
            vcpu_us: self.vcpu_ns.load(Ordering::Relaxed) as f32 / 1e3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_estimate_starts_from_a_round_trip_and_decays_toward_recent_samples() {
        let l = LinkEstimate::default();
        assert_eq!(l.get(), LinkCost::default(), "nothing measured yet");
        l.observe(Sample::Rtt, Duration::from_micros(80));
        assert_eq!(l.get().page_us, 80.0);
        l.observe(Sample::Rtt, Duration::from_micros(10));
        assert_eq!(
            l.get().page_us,
            80.0,
            "a round trip only seeds the estimate"
        );
        l.observe(Sample::FaultService, Duration::from_micros(160));
        assert_eq!(l.get().page_us, 90.0, "(7 * 80 + 160) / 8");
        l.observe(Sample::Install, Duration::from_micros(5));
        l.observe(Sample::VcpuMove, Duration::from_micros(300));
        assert_eq!(l.get().vcpu_us, 300.0);
        assert_eq!(l.get().page_us, 90.0);
    }
}
