//! `tidalscale`: cost functions after TidalScale's (now HPE's) patents on moving vCPUs and
//! pages between the nodes of a software-defined server:
//! - US10783000: on every non-local stall, record the guest thread and address in a
//!   per-thread Bloom filter; a thread's *warmth* on a node is how many of those pages are
//!   local to it;
//! - US12236095: move the vCPU if the page is frequently updated and the vCPU is not
//!   "high-frequency";
//! - US11403135: the owning node's cost functions send the page or reject the request,
//!   and a reject moves the requester's vCPU; US11175927B2 adds node load and shared
//!   working sets to the factors.
//!
//! Here, per vCPU: a Bloom filter of the pages it faulted on recently (cleared every
//! [`Tidal::epoch`] faults), and its warmth per node, counted as the pages entered in the
//! filter this epoch, each counted at the node it was used at (where it came, or where the
//! vCPU went). A fault costs, in round trips:
//! - moving the page: 1, plus [`Tidal::contended`] if the page is frequently moved
//!   (`page_heat`) and written, since it will be pulled back;
//! - moving the vCPU: [`Tidal::move_cost`], plus the warmth it leaves behind here minus
//!   the warmth it finds there (pages it will fault on again, or not).
//!
//! The cheaper wins. A high-frequency vCPU (more than [`Tidal::busy`] faults in a row
//! without moving) stays. Simplified away: the owner-side refusal (our requester decides
//! alone, estimating the owner's view from `page_heat`), device pinning, memory pressure.

use crate::{Access, Decision, FaultContext, NodeId, Policy};
use std::collections::HashMap;

/// Bits in each vCPU's Bloom filter.
const BLOOM_BITS: usize = 4096;

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Tidal {
    /// Faults of a vCPU after which its filter and warmth start over.
    pub epoch: u32,
    /// Round trips a vCPU move costs (state out, then its first faults there).
    pub move_cost: i64,
    /// Extra round trips for moving a hot, written page (it comes back).
    pub contended: i64,
    /// `page_heat` from which a page counts as frequently updated.
    pub hot_page: u32,
    /// Faults without a move from which a vCPU counts as high-frequency and stays.
    pub busy: u32,
    vcpus: HashMap<u32, Warmth>,
}

#[derive(Debug, Clone)]
struct Warmth {
    bloom: Vec<u64>,
    by_node: Vec<i64>,
    faults: u32,
}

impl Warmth {
    fn new(nodes: usize) -> Self {
        Warmth {
            bloom: vec![0; BLOOM_BITS / 64],
            by_node: vec![0; nodes],
            faults: 0,
        }
    }

    /// Enters `page`; whether it was (probably) there already.
    fn enter(&mut self, page: u64) -> bool {
        let mut seen = true;
        for k in 0..2u64 {
            let h =
                (page ^ k.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            let bit = (h >> 40) as usize % BLOOM_BITS;
            let (word, mask) = (bit / 64, 1u64 << (bit % 64));
            seen &= self.bloom[word] & mask != 0;
            self.bloom[word] |= mask;
        }
        seen
    }

    fn at(&self, n: NodeId) -> i64 {
        self.by_node.get(n as usize).copied().unwrap_or(0)
    }
}

impl Default for Tidal {
    fn default() -> Self {
        Tidal {
            epoch: 256,
            move_cost: 3,
            contended: 4,
            hot_page: 4,
            busy: 64,
            vcpus: HashMap::new(),
        }
    }
}

impl Policy for Tidal {
    fn name(&self) -> &'static str {
        "tidalscale"
    }

    fn decide(&mut self, f: &FaultContext<'_>) -> Decision {
        let nodes = f.nodes.max(1) as usize;
        let w = self
            .vcpus
            .entry(f.vcpu)
            .or_insert_with(|| Warmth::new(nodes));
        if w.by_node.len() != nodes {
            *w = Warmth::new(nodes);
        }
        w.faults += 1;
        if w.faults.is_multiple_of(self.epoch) {
            *w = Warmth::new(nodes);
        }
        let known = w.enter(f.page);
        let page_cost = 1 + if f.access == Access::Write && f.page_heat >= self.hot_page {
            self.contended
        } else {
            0
        };
        let vcpu_cost = self.move_cost + w.at(f.node) - w.at(f.holder);
        let high_frequency = f.history.faults_since_move >= self.busy;
        let go = !f.have_replica
            && !high_frequency
            && vcpu_cost < page_cost
            && !f.would_pile_up(f.holder);
        let used_at = if go { f.holder } else { f.node };
        if !known {
            if let Some(c) = w.by_node.get_mut(used_at as usize) {
                *c += 1;
            }
        }
        if go {
            Decision::MoveVcpu
        } else {
            Decision::MovePage
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::context;
    use crate::History;

    #[test]
    fn a_cold_vcpu_goes_to_a_hot_written_page_and_a_warm_one_pulls_it() {
        let h = History::default();
        let mut c = context(&h);
        c.access = Access::Write;
        c.page_heat = 10;
        // No warmth anywhere: 3 round trips to go against 1 + 4 to pull a contended page.
        assert_eq!(Tidal::default().decide(&c), Decision::MoveVcpu);
        // Warm here (many recent pages used on this node): leaving costs more.
        let mut p = Tidal::default();
        let mut cold = context(&h);
        for i in 0..20 {
            cold.page = 10_000 + i;
            assert_eq!(p.decide(&cold), Decision::MovePage);
        }
        assert_eq!(p.decide(&c), Decision::MovePage);
    }

    #[test]
    fn reads_of_quiet_pages_bring_the_page() {
        let h = History::default();
        let c = context(&h);
        assert_eq!(Tidal::default().decide(&c), Decision::MovePage);
    }

    #[test]
    fn a_high_frequency_vcpu_stays() {
        let mut h = History::default();
        for i in 0..64 {
            h.push(crate::FaultRecord {
                page: i,
                access: Access::Read,
                holder: 1,
                decision: Decision::MovePage,
            });
        }
        let mut c = context(&h);
        c.access = Access::Write;
        c.page_heat = 10;
        assert_eq!(Tidal::default().decide(&c), Decision::MovePage);
    }

    #[test]
    fn the_bloom_filter_remembers_pages() {
        let mut w = Warmth::new(2);
        assert!(!w.enter(42));
        assert!(w.enter(42));
        let fresh = (0..1000u64)
            .filter(|&p| !w.enter(1_000_000 + p * 7919))
            .count();
        assert!(fresh > 900, "{fresh} of 1000 new pages looked new");
    }
}
