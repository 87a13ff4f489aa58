//! What a node counts besides its metrics: counters the metrics do not keep, and
//! latency samples (a reservoir per kind), which travel to node 0 at the end of a run.

use flotilla_transport::{wire::MAX_SAMPLES, Samples};
use std::sync::atomic::AtomicU64;
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
