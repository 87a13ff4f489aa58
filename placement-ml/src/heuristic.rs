//! The hand-written policy. Pages are the default currency: a page move costs one round
//! trip, and read-shared pages become replicas that never fault again. The vCPU moves only
//! when it is evidently working on another node's data: most of its recent faults went to
//! one node, or the page it wants keeps bouncing between nodes (a write-shared page whose
//! writers should meet rather than pass it around). Hysteresis keeps a vCPU that just
//! moved from moving again at once. Like the published policies it keeps the load rule: a
//! node's last vCPU never goes to a node whose CPUs are all busy
//! ([`FaultContext::would_pile_up`]), so it cannot gather every vCPU on one node.

use crate::{Access, Decision, FaultContext, Policy};

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Heuristic {
    /// Of the last `window` faults, this many must have gone to the same node.
    pub affinity: usize,
    pub window: usize,
    /// A page that moved this often recently is "hot": writers go to it.
    pub hot_page: u32,
    /// Faults a vCPU must take after a move before it may move again.
    pub cooldown: u32,
}

impl Default for Heuristic {
    fn default() -> Self {
        Heuristic {
            affinity: 6,
            window: 8,
            hot_page: 4,
            cooldown: 16,
        }
    }
}

impl Policy for Heuristic {
    fn name(&self) -> &'static str {
        "heuristic"
    }

    fn decide(&mut self, f: &FaultContext<'_>) -> Decision {
        // Ownership of a page already here costs no data transfer; code is read-shared.
        if f.have_replica || f.access == Access::Execute || f.holder == f.node {
            return Decision::MovePage;
        }
        if f.would_pile_up(f.holder) {
            return Decision::MovePage;
        }
        if f.history.faults_since_move < self.cooldown && !f.history.is_empty() {
            // Only when the history contains a move; a fresh vCPU has no cooldown.
            if f.history
                .records()
                .any(|r| r.decision == Decision::MoveVcpu)
            {
                return Decision::MovePage;
            }
        }
        let recent = f.history.records().rev().take(self.window);
        let to_holder = recent.filter(|r| r.holder == f.holder).count();
        if to_holder + 1 >= self.affinity {
            return Decision::MoveVcpu;
        }
        if f.access == Access::Write && f.page_heat >= self.hot_page {
            return Decision::MoveVcpu;
        }
        Decision::MovePage
    }

    /// It keeps no state of its own (the vCPU's history is the engine's): every vCPU
    /// thread may decide with its own copy, without a lock.
    fn fork(&self) -> Option<Box<dyn Policy>> {
        Some(Box::new(self.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::context;
    use crate::{FaultRecord, History};

    fn record(holder: u16, decision: Decision) -> FaultRecord {
        FaultRecord {
            page: 1,
            access: Access::Read,
            holder,
            decision,
        }
    }

    #[test]
    fn pages_by_default_vcpu_when_faults_cluster_on_one_node() {
        let mut h = History::default();
        let mut p = Heuristic::default();
        assert_eq!(p.decide(&context(&h)), Decision::MovePage);
        for _ in 0..8 {
            h.push(record(1, Decision::MovePage));
        }
        assert_eq!(p.decide(&context(&h)), Decision::MoveVcpu);
        // Upgrades never move the vCPU.
        let mut c = context(&h);
        c.have_replica = true;
        assert_eq!(p.decide(&c), Decision::MovePage);
    }

    #[test]
    fn cooldown_after_a_move() {
        let mut h = History::default();
        h.push(record(1, Decision::MoveVcpu));
        for _ in 0..8 {
            h.push(record(1, Decision::MovePage));
        }
        let mut p = Heuristic::default();
        assert_eq!(p.decide(&context(&h)), Decision::MovePage);
        for _ in 0..16 {
            h.push(record(1, Decision::MovePage));
        }
        assert_eq!(p.decide(&context(&h)), Decision::MoveVcpu);
    }

    #[test]
    fn the_last_vcpu_of_a_node_does_not_pile_onto_a_full_one() {
        let mut h = History::default();
        for _ in 0..8 {
            h.push(record(1, Decision::MovePage));
        }
        let mut c = context(&h);
        c.cpus = 1;
        c.node_vcpus = &[1, 1];
        assert_eq!(Heuristic::default().decide(&c), Decision::MovePage);
        c.node_vcpus = &[2, 1];
        c.local_vcpus = 2;
        assert_eq!(Heuristic::default().decide(&c), Decision::MoveVcpu);
    }

    #[test]
    fn hot_written_pages_pull_the_vcpu() {
        let h = History::default();
        let mut c = context(&h);
        c.access = Access::Write;
        c.page_heat = 10;
        assert_eq!(Heuristic::default().decide(&c), Decision::MoveVcpu);
        c.access = Access::Read;
        assert_eq!(Heuristic::default().decide(&c), Decision::MovePage);
    }
}
