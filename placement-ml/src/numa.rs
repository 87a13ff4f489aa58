//! `numa-balancing`: Linux's automatic NUMA balancing (`kernel/sched/fair.c`,
//! `task_numa_fault`, `task_numa_placement`, `task_numa_migrate`,
//! `should_numa_migrate_memory`; v5.3), transposed from "migrate the page or the task at a
//! hinting fault" to "move the page or the vCPU at a remote fault".
//!
//! Kept:
//! - Per vCPU, fault counts by node that decay as `count = count / 2 + new` (Linux decays
//!   once per scan; here once every [`NumaBalancing::decay_every`] faults of the vCPU).
//!   The preferred node is their argmax, once the vCPU has a history (Linux: no preferred
//!   node early in a task's life, when it always migrates the memory).
//! - Private/shared classification: a fault is private if the last vCPU of this node to
//!   fault on the page was this one (Linux: `last_cpupid`).
//! - The two-stage filter: a shared page (two of this node's vCPUs fault on it) moves here
//!   only on the second fault in a row from this node; on the first, the vCPU goes to it
//!   instead if the load allows (a remote access, transposed).
//! - `task_numa_migrate`: the vCPU moves to its preferred node when that is where the page
//!   is and the gain (node weights `1000 · faults / total`) is at least 30 (`SMALLIMP`).
//! - The load check (`load_too_imbalanced`, `imbalance_pct` 112): the target may not end up
//!   more than 12 % busier than this node unless it has an idle CPU.
//!
//! Simplified away: task swapping (Linux swaps with a task on the target when the load
//! forbids a move; here the vCPU stays), numa groups and their 3/4 hysteresis (one guest
//! is one group), and scan-rate adaptation. Each node sees only its own faults, where
//! Linux keeps `last_cpupid` per page for all CPUs.

use crate::{Decision, FaultContext, NodeId, Policy};
use std::collections::HashMap;

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct NumaBalancing {
    /// Faults of a vCPU between two halvings of its counts.
    pub decay_every: u32,
    /// Faults a vCPU needs before it has a preferred node.
    pub settle: u32,
    /// Least gain, in thousandths of the vCPU's faults, to move it (Linux `SMALLIMP`).
    pub min_gain: u32,
    /// Load imbalance allowed after a move, in percent (Linux `imbalance_pct`).
    pub imbalance_pct: u32,
    vcpus: HashMap<u32, Faults>,
    last: HashMap<u64, u32>,
}

#[derive(Debug, Clone, Default)]
struct Faults {
    by_node: Vec<u32>,
    seen: u32,
}

/// Pages remembered for the private/shared test before the table starts over.
const LAST_CAPACITY: usize = 1 << 20;

impl Default for NumaBalancing {
    fn default() -> Self {
        NumaBalancing {
            decay_every: 64,
            settle: 16,
            min_gain: 30,
            imbalance_pct: 112,
            vcpus: HashMap::new(),
            last: HashMap::new(),
        }
    }
}

impl NumaBalancing {
    /// Whether the load allows sending a vCPU from this node to `to`.
    fn load_allows(&self, f: &FaultContext<'_>, to: NodeId) -> bool {
        let here = f.node_vcpus.get(f.node as usize).copied().unwrap_or(1);
        let there = f.node_vcpus.get(to as usize).copied().unwrap_or(0) + 1;
        !f.would_pile_up(to)
            && (there <= f.cpus
                || there * 100 <= here.saturating_sub(1).max(1) * self.imbalance_pct)
    }
}

impl Policy for NumaBalancing {
    fn name(&self) -> &'static str {
        "numa-balancing"
    }

    fn decide(&mut self, f: &FaultContext<'_>) -> Decision {
        let nodes = f.nodes.max(1) as usize;
        let stats = self.vcpus.entry(f.vcpu).or_default();
        if stats.by_node.len() != nodes {
            stats.by_node = vec![0; nodes];
        }
        stats.seen += 1;
        if stats.seen.is_multiple_of(self.decay_every) {
            for c in &mut stats.by_node {
                *c /= 2;
            }
        }
        if let Some(c) = stats.by_node.get_mut(f.holder as usize) {
            *c += 1;
        }
        let settled = stats.seen >= self.settle;
        let total: u32 = stats.by_node.iter().sum::<u32>().max(1);
        let weight = |n: NodeId| stats.by_node.get(n as usize).copied().unwrap_or(0) * 1000 / total;
        let preferred = stats
            .by_node
            .iter()
            .enumerate()
            .max_by_key(|&(n, &c)| (c, std::cmp::Reverse(n)))
            .map(|(n, _)| n as NodeId);
        let gain = weight(f.holder).saturating_sub(weight(f.node));

        if self.last.len() >= LAST_CAPACITY {
            self.last.clear();
        }
        let previous = self.last.insert(f.page, f.vcpu);
        let shared = previous.is_some_and(|v| v != f.vcpu);

        if f.have_replica {
            // An ownership upgrade: no data to move, nothing to gain by going.
            return Decision::MovePage;
        }
        // task_numa_migrate: to the preferred node, where this page is.
        if settled
            && preferred == Some(f.holder)
            && gain >= self.min_gain
            && self.load_allows(f, f.holder)
        {
            return Decision::MoveVcpu;
        }
        // should_numa_migrate_memory: early or private, the page comes; shared, only at
        // the second fault in a row from this node (the first found another accessor).
        if !settled || !shared {
            return Decision::MovePage;
        }
        if self.load_allows(f, f.holder) {
            // Drop the mark: the next fault on it from this node is the second in a row.
            self.last.remove(&f.page);
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
    fn memory_moves_early_and_the_vcpu_follows_its_faults_once_settled() {
        let h = History::default();
        let mut p = NumaBalancing::default();
        let mut c = context(&h);
        for i in 0..15 {
            c.page = 1000 + i;
            assert_eq!(p.decide(&c), Decision::MovePage, "early fault {i}");
        }
        // Settled, every fault went to node 1: its preferred node, gain 1000.
        c.page = 2000;
        assert_eq!(p.decide(&c), Decision::MoveVcpu);
    }

    #[test]
    fn a_vcpu_goes_only_to_its_preferred_node() {
        let h = History::default();
        let mut p = NumaBalancing::default();
        let mut c = context(&h);
        c.nodes = 3;
        c.node_vcpus = &[1, 1, 1];
        let mut moved_to = Vec::new();
        for i in 0..64u64 {
            c.page = 5000 + i;
            c.holder = 1 + (i % 2) as u16;
            if p.decide(&c) == Decision::MoveVcpu {
                moved_to.push(c.holder);
            }
        }
        // Nodes 1 and 2 tie; the preferred node is the lower id.
        assert!(
            !moved_to.is_empty() && moved_to.iter().all(|&n| n == 1),
            "{moved_to:?}"
        );
    }

    #[test]
    fn the_load_check_keeps_the_vcpu_when_the_target_is_busier() {
        let h = History::default();
        let mut p = NumaBalancing::default();
        let mut c = context(&h);
        // 1 CPU a node, this node 2 vCPUs, node 1 already 2: 3 against 1 is too imbalanced.
        c.cpus = 1;
        c.node_vcpus = &[2, 2];
        for i in 0..40 {
            c.page = 100 + i;
            assert_eq!(p.decide(&c), Decision::MovePage);
        }
        // Node 1 idle: it has room.
        c.node_vcpus = &[2, 0];
        c.page = 7;
        assert_eq!(p.decide(&c), Decision::MoveVcpu);
    }

    #[test]
    fn a_shared_page_moves_on_the_second_fault_in_a_row() {
        let h = History::default();
        let mut p = NumaBalancing {
            settle: 0,
            min_gain: 2000, // never a task move: isolate the memory rule
            ..Default::default()
        };
        let mut c = context(&h);
        c.page = 9;
        c.vcpu = 0;
        assert_eq!(p.decide(&c), Decision::MovePage, "private (first touch)");
        c.vcpu = 1;
        assert_eq!(
            p.decide(&c),
            Decision::MoveVcpu,
            "shared, first from here: go"
        );
        c.vcpu = 2;
        assert_eq!(
            p.decide(&c),
            Decision::MovePage,
            "the second in a row: it comes"
        );
    }
}
