//! Placement policies. At every remote fault the engine builds a [`FaultContext`] from
//! what it knows cheaply (which vCPU, which page, which node probably holds it, what this
//! vCPU faulted on lately) and asks a [`Policy`] for a [`Decision`]: bring the page here,
//! or send the vCPU to the page.
//!
//! This crate is on the engine's fault path, so it has no heavy dependencies: learned
//! policies (tract, linfa) live behind the same trait in a separate feature-gated module
//! that the engine never needs to build.

mod elastic;
pub mod features;
mod heuristic;
mod numa;
mod tidal;

pub use elastic::Elastic;
pub use heuristic::Heuristic;
pub use numa::NumaBalancing;
pub use tidal::Tidal;

pub use flotilla_coherence::{Access, Decision, NodeId};

/// One past fault of a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRecord {
    pub page: u64,
    pub access: Access,
    /// The node the page was (probably) on.
    pub holder: NodeId,
    pub decision: Decision,
}

/// The recent faults of one vCPU, oldest first, at most [`History::CAPACITY`].
#[derive(Debug, Clone, Default)]
pub struct History {
    records: std::collections::VecDeque<FaultRecord>,
    /// Faults since this vCPU last moved between nodes.
    pub faults_since_move: u32,
}

impl History {
    pub const CAPACITY: usize = 16;

    pub fn push(&mut self, record: FaultRecord) {
        if self.records.len() == Self::CAPACITY {
            self.records.pop_front();
        }
        if record.decision == Decision::MoveVcpu {
            self.faults_since_move = 0;
        } else {
            self.faults_since_move = self.faults_since_move.saturating_add(1);
        }
        self.records.push_back(record);
    }

    /// Oldest first.
    pub fn records(&self) -> impl DoubleEndedIterator<Item = &FaultRecord> + ExactSizeIterator {
        self.records.iter()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Largest [`encode`](Self::encode)d history.
    pub const MAX_ENCODED: usize = 5 + Self::CAPACITY * Self::RECORD_BYTES;
    const RECORD_BYTES: usize = 12;

    /// The history as bytes, to travel with its vCPU when it moves (a policy's view of
    /// a vCPU must not depend on which node it is on): `faults_since_move` (u32 LE), the
    /// record count (u8), then per record, oldest first, page (u64 LE), access code (u8),
    /// holder (u16 LE), decision code (u8).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + self.records.len() * Self::RECORD_BYTES);
        out.extend_from_slice(&self.faults_since_move.to_le_bytes());
        out.push(self.records.len() as u8);
        for r in &self.records {
            out.extend_from_slice(&r.page.to_le_bytes());
            out.push(r.access.code());
            out.extend_from_slice(&r.holder.to_le_bytes());
            out.push(r.decision.code());
        }
        out
    }

    /// Reads [`encode`](Self::encode)'s bytes back; says what is wrong with bad ones.
    pub fn decode(bytes: &[u8]) -> Result<History, String> {
        let [a, b, c, d, n, rest @ ..] = bytes else {
            return Err(format!(
                "a history of {} bytes, shorter than 5",
                bytes.len()
            ));
        };
        let n = *n as usize;
        if n > Self::CAPACITY || rest.len() != n * Self::RECORD_BYTES {
            return Err(format!(
                "a history of {n} records in {} bytes (at most {} records of {} bytes)",
                rest.len(),
                Self::CAPACITY,
                Self::RECORD_BYTES
            ));
        }
        let mut records = std::collections::VecDeque::with_capacity(n);
        for r in rest.chunks_exact(Self::RECORD_BYTES) {
            let page = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
            let access = Access::from_code(r[8]).ok_or_else(|| format!("access code {}", r[8]))?;
            let holder = u16::from_le_bytes([r[9], r[10]]);
            let decision =
                Decision::from_code(r[11]).ok_or_else(|| format!("decision code {}", r[11]))?;
            records.push_back(FaultRecord {
                page,
                access,
                holder,
                decision,
            });
        }
        Ok(History {
            records,
            faults_since_move: u32::from_le_bytes([*a, *b, *c, *d]),
        })
    }
}

/// What a remote fault costs on this cluster's links, as the faulting node last measured
/// it (a decayed average of its own service times; 0 until it has measured one).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkCost {
    /// Bringing a page here: fault exit to re-entry (µs).
    pub page_us: f32,
    /// Sending a vCPU away: fault exit to re-entry on the other node (µs).
    pub vcpu_us: f32,
}

/// Everything the engine knows cheaply at a remote fault.
#[derive(Debug, Clone, Copy)]
pub struct FaultContext<'a> {
    pub vcpu: u32,
    /// The node the vCPU is on (where the fault happened).
    pub node: NodeId,
    pub nodes: u16,
    /// Guest-physical page number (address / 4096).
    pub page: u64,
    pub access: Access,
    /// The node that probably holds the page's current copy (the last one this node
    /// heard of; the page's home knows for sure).
    pub holder: NodeId,
    /// The node whose directory tracks the page.
    pub home: NodeId,
    /// This node already holds a read-only copy: a write only needs ownership.
    pub have_replica: bool,
    /// vCPUs currently running on this node.
    pub local_vcpus: u32,
    /// Times this page moved in or out of this node recently (decays).
    pub page_heat: u32,
    /// This vCPU's recent faults.
    pub history: &'a History,
    /// vCPUs running on each node, by node id, as the faulting node knows them (its own
    /// entry exact, the others the last it heard: a hint).
    pub node_vcpus: &'a [u32],
    /// CPUs each node may run vCPUs on.
    pub cpus: u32,
    pub link: LinkCost,
}

impl FaultContext<'_> {
    /// Whether sending this vCPU to `to` keeps the cluster's load no worse: after the move
    /// `to` would run no more vCPUs than it has CPUs, or no more than this node would
    /// still run. Without it a vCPU-moving policy gathers every vCPU on the node holding
    /// the data and leaves the other nodes' CPUs idle.
    pub fn room_on(&self, to: NodeId) -> bool {
        let there = self.node_vcpus.get(to as usize).copied().unwrap_or(0) + 1;
        let here = self
            .node_vcpus
            .get(self.node as usize)
            .copied()
            .unwrap_or(self.local_vcpus)
            .saturating_sub(1);
        there <= self.cpus.max(here)
    }

    /// Whether sending this vCPU to `to` would pile vCPUs up there while this node's CPUs
    /// idle: it is the last vCPU here and `to` already runs at least as many vCPUs as it
    /// has CPUs. The weakest load rule: every published policy here keeps to it, so none
    /// gathers every vCPU on one node while another node has idle CPUs.
    pub fn would_pile_up(&self, to: NodeId) -> bool {
        let here = self
            .node_vcpus
            .get(self.node as usize)
            .copied()
            .unwrap_or(self.local_vcpus);
        let there = self.node_vcpus.get(to as usize).copied().unwrap_or(0);
        here <= 1 && there >= self.cpus
    }
}

/// A placement policy. Called on the faulting vCPU's thread; must be cheap and must not
/// block. Policies are per node and may keep state.
pub trait Policy: Send {
    /// The name `--policy` selects it by.
    fn name(&self) -> &'static str;
    fn decide(&mut self, fault: &FaultContext<'_>) -> Decision;
    /// A copy for one more vCPU thread of the same node, when this policy keeps no state
    /// that its vCPUs must share: the engine then gives every vCPU thread its own, and
    /// decisions take no lock. `None` (the default): one instance per node, behind a lock.
    fn fork(&self) -> Option<Box<dyn Policy>> {
        None
    }
}

/// Always bring the page.
#[derive(Debug, Default)]
pub struct AlwaysPage;

impl Policy for AlwaysPage {
    fn name(&self) -> &'static str {
        "always-page"
    }
    fn decide(&mut self, _: &FaultContext<'_>) -> Decision {
        Decision::MovePage
    }
    fn fork(&self) -> Option<Box<dyn Policy>> {
        Some(Box::new(AlwaysPage))
    }
}

/// Always send the vCPU to the page.
#[derive(Debug, Default)]
pub struct AlwaysVcpu;

impl Policy for AlwaysVcpu {
    fn name(&self) -> &'static str {
        "always-vcpu"
    }
    fn decide(&mut self, _: &FaultContext<'_>) -> Decision {
        Decision::MoveVcpu
    }
    fn fork(&self) -> Option<Box<dyn Policy>> {
        Some(Box::new(AlwaysVcpu))
    }
}

/// A coin flip per fault from a seeded generator (SplitMix64): reproducible chaos for
/// testing that every interleaving of page and vCPU moves keeps the guest correct.
#[derive(Debug)]
pub struct Random {
    state: u64,
}

impl Random {
    pub fn new(seed: u64) -> Self {
        Random { state: seed }
    }

    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl Policy for Random {
    fn name(&self) -> &'static str {
        "random"
    }
    fn decide(&mut self, _: &FaultContext<'_>) -> Decision {
        if self.next() & 1 == 0 {
            Decision::MovePage
        } else {
            Decision::MoveVcpu
        }
    }
}

/// The policies `--policy` accepts.
pub const POLICY_NAMES: [&str; 7] = [
    "always-page",
    "always-vcpu",
    "random",
    "heuristic",
    "numa-balancing",
    "tidalscale",
    "elasticos",
];

/// A `--policy` name that is not one of [`POLICY_NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnknownPolicy {
    #[error("unknown policy '{0}' (known: always-page, always-vcpu, random, heuristic, numa-balancing, tidalscale, elasticos, learned)")]
    Unknown(String),
    /// `learned` is not built here: it serves a model (the `flotilla-learned` crate).
    #[error("policy learned serves a trained model: give --model FILE")]
    NeedsModel,
}

/// The name of the policy that serves a trained model ([`by_name`] does not build it).
pub const LEARNED: &str = "learned";

/// Builds the policy called `name` for `node`. `seed` seeds `random` (mixed with the
/// node id, so nodes do not flip the same coins).
pub fn by_name(name: &str, seed: u64, node: NodeId) -> Result<Box<dyn Policy>, UnknownPolicy> {
    Ok(match name {
        "always-page" => Box::new(AlwaysPage),
        "always-vcpu" => Box::new(AlwaysVcpu),
        "random" => Box::new(Random::new(
            seed ^ (node as u64).wrapping_mul(0xA24B_AED4_963E_E407),
        )),
        "heuristic" => Box::new(Heuristic::default()),
        "numa-balancing" => Box::new(NumaBalancing::default()),
        "tidalscale" => Box::new(Tidal::default()),
        "elasticos" => Box::new(Elastic::default()),
        LEARNED => return Err(UnknownPolicy::NeedsModel),
        other => return Err(UnknownPolicy::Unknown(other.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn context(history: &History) -> FaultContext<'_> {
        FaultContext {
            vcpu: 0,
            node: 0,
            nodes: 2,
            page: 100,
            access: Access::Read,
            holder: 1,
            home: 1,
            have_replica: false,
            local_vcpus: 1,
            page_heat: 0,
            history,
            node_vcpus: &[1, 1],
            cpus: 2,
            link: LinkCost {
                page_us: 100.0,
                vcpu_us: 200.0,
            },
        }
    }

    #[test]
    fn room_on_a_node_is_an_idle_cpu_or_no_worse_balance() {
        let h = History::default();
        let mut c = context(&h);
        // 2 CPUs a node.
        c.node_vcpus = &[1, 1];
        assert!(c.room_on(1), "node 1 has an idle CPU");
        c.node_vcpus = &[1, 2];
        assert!(!c.room_on(1), "node 1 is full, this node would idle a CPU");
        c.node_vcpus = &[4, 2];
        assert!(c.room_on(1), "3 against 3 is no worse than 4 against 2");
        c.node_vcpus = &[2, 2];
        c.cpus = 1;
        assert!(
            !c.room_on(1),
            "1-CPU nodes at 2 and 2: no move keeps the balance"
        );
    }

    #[test]
    fn names_round_trip() {
        for name in POLICY_NAMES {
            assert_eq!(by_name(name, 1, 0).unwrap().name(), name);
        }
        assert_eq!(
            by_name("nope", 1, 0).err(),
            Some(UnknownPolicy::Unknown("nope".into()))
        );
    }

    #[test]
    fn random_is_seeded_and_mixes_both_moves() {
        let history = History::default();
        let draw = |seed| {
            let mut p = by_name("random", seed, 0).unwrap();
            (0..64)
                .map(|_| p.decide(&context(&history)))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let d = draw(7);
        assert!(d.contains(&Decision::MovePage) && d.contains(&Decision::MoveVcpu));
    }

    #[test]
    fn a_history_travels_as_bytes_and_bad_bytes_are_named() {
        let mut h = History::default();
        for i in 0..20 {
            h.push(FaultRecord {
                page: 1 << 40 | i,
                access: Access::ALL[i as usize % 3],
                holder: (i % 5) as NodeId,
                decision: Decision::ALL[i as usize % 2],
            });
        }
        let bytes = h.encode();
        assert_eq!(bytes.len(), History::MAX_ENCODED);
        let back = History::decode(&bytes).unwrap();
        assert_eq!(
            back.records().collect::<Vec<_>>(),
            h.records().collect::<Vec<_>>()
        );
        assert_eq!(back.faults_since_move, h.faults_since_move);
        assert!(History::decode(&bytes[..3])
            .unwrap_err()
            .contains("shorter than 5"));
        assert!(History::decode(&bytes[..20])
            .unwrap_err()
            .contains("16 records"));
        let mut bad = bytes.clone();
        bad[5 + 8] = 9;
        assert!(History::decode(&bad).unwrap_err().contains("access code 9"));
        assert!(History::decode(&History::default().encode())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn history_is_bounded_and_counts_since_move() {
        let mut h = History::default();
        for i in 0..40 {
            h.push(FaultRecord {
                page: i,
                access: Access::Read,
                holder: 1,
                decision: if i == 30 {
                    Decision::MoveVcpu
                } else {
                    Decision::MovePage
                },
            });
        }
        assert_eq!(h.len(), History::CAPACITY);
        assert_eq!(h.records().last().unwrap().page, 39);
        assert_eq!(h.faults_since_move, 9);
    }
}
