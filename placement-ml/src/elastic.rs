//! `elasticos`: the jump rule of ElasticOS (Zhu et al., "ElasticOS: An Elastic Operating
//! System for Datacenter Applications", arXiv 1806.00885). On a remote fault a process
//! *pulls* the page; it *jumps* (its execution moves to the other machine) once the pulls
//! from one node within a window pass a threshold, because its working set evidently lives
//! there. The original keeps a ring buffer of local/remote fault counts per process and
//! compares them with `threshold_page_pulls_*` in a pluggable `should_jump()`.
//!
//! Simplified here: the ring holds the last [`Elastic::window`] remote faults of each vCPU
//! (this node sees only its own faults, so "local" faults are not counted); a jump clears
//! it. ElasticOS ran single-threaded programs, so it had no load rule; here a vCPU does not
//! jump if that would leave its node without vCPUs while the target's CPUs are all busy
//! ([`FaultContext::would_pile_up`]).

use crate::{Decision, FaultContext, NodeId, Policy};
use std::collections::{HashMap, VecDeque};

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Elastic {
    /// Remote faults remembered per vCPU.
    pub window: usize,
    /// Pulls from one node within the window that make the vCPU jump there.
    pub threshold: usize,
    pulls: HashMap<u32, VecDeque<NodeId>>,
}

impl Default for Elastic {
    fn default() -> Self {
        Elastic {
            window: 32,
            threshold: 24,
            pulls: HashMap::new(),
        }
    }
}

impl Policy for Elastic {
    fn name(&self) -> &'static str {
        "elasticos"
    }

    fn decide(&mut self, f: &FaultContext<'_>) -> Decision {
        let ring = self.pulls.entry(f.vcpu).or_default();
        if ring.len() == self.window {
            ring.pop_front();
        }
        ring.push_back(f.holder);
        let from_holder = ring.iter().filter(|&&n| n == f.holder).count();
        if from_holder >= self.threshold && !f.have_replica && !f.would_pile_up(f.holder) {
            ring.clear();
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
    fn pulls_until_the_threshold_then_jumps_and_starts_over() {
        let h = History::default();
        let mut p = Elastic::default();
        let c = context(&h);
        for i in 0..23 {
            assert_eq!(p.decide(&c), Decision::MovePage, "pull {i}");
        }
        assert_eq!(p.decide(&c), Decision::MoveVcpu);
        assert_eq!(p.decide(&c), Decision::MovePage, "the ring starts over");
    }

    #[test]
    fn pulls_spread_over_nodes_never_jump() {
        let h = History::default();
        let mut p = Elastic::default();
        for i in 0..200u16 {
            let mut c = context(&h);
            c.nodes = 4;
            c.node_vcpus = &[1, 1, 1, 1];
            c.holder = 1 + i % 3;
            assert_eq!(p.decide(&c), Decision::MovePage);
        }
    }

    #[test]
    fn does_not_jump_to_pile_up() {
        let h = History::default();
        let mut p = Elastic::default();
        let mut c = context(&h);
        // The last vCPU here, and node 1's CPUs are busy: jumping would idle this node.
        c.node_vcpus = &[1, 2];
        for _ in 0..100 {
            assert_eq!(p.decide(&c), Decision::MovePage);
        }
    }
}
