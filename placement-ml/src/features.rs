//! The numbers a learned policy sees at a fault: one fixed-length vector computed from a
//! [`FaultContext`] alone, so the engine (serving a model) and the simulator (writing
//! training labels) compute exactly the same thing. Cheap: a pass over the vCPU's
//! history of at most [`History::CAPACITY`](crate::History::CAPACITY) records.

use crate::{Access, Decision, FaultContext};

/// The version of this definition: bumped whenever a feature is added, dropped, reordered
/// or computed differently, so a model trained on one definition is never fed another.
pub const FEATURE_VERSION: u32 = 1;

/// How many features [`features`] returns.
pub const FEATURE_COUNT: usize = 18;

/// The features' names, in order: the column names of `flotilla replay --labels` and the
/// input order of a learned model.
pub const FEATURE_NAMES: [&str; FEATURE_COUNT] = [
    "is_write",
    "is_execute",
    "have_replica",
    "holder_is_home",
    "nodes",
    "cpus",
    "local_vcpus",
    "holder_vcpus",
    "room_on_holder",
    "would_pile_up",
    "page_heat",
    "faults_since_move",
    "history_len",
    "history_to_holder",
    "history_same_page",
    "history_writes",
    "link_page_us",
    "link_vcpu_us",
];

/// The feature vector of one fault; see [`FEATURE_NAMES`].
pub fn features(f: &FaultContext<'_>) -> [f32; FEATURE_COUNT] {
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    let mut to_holder = 0u32;
    let mut same_page = 0u32;
    let mut writes = 0u32;
    for r in f.history.records() {
        to_holder += u32::from(r.holder == f.holder && r.decision != Decision::MoveVcpu);
        same_page += u32::from(r.page == f.page);
        writes += u32::from(r.access == Access::Write);
    }
    let holder_vcpus = f.node_vcpus.get(f.holder as usize).copied().unwrap_or(0);
    [
        flag(f.access == Access::Write),
        flag(f.access == Access::Execute),
        flag(f.have_replica),
        flag(f.holder == f.home),
        f32::from(f.nodes),
        f.cpus as f32,
        f.local_vcpus as f32,
        holder_vcpus as f32,
        flag(f.room_on(f.holder)),
        flag(f.would_pile_up(f.holder)),
        f.page_heat as f32,
        f.history.faults_since_move.min(1 << 16) as f32,
        f.history.len() as f32,
        to_holder as f32,
        same_page as f32,
        writes as f32,
        f.link.page_us,
        f.link.vcpu_us,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FaultRecord, History};

    #[test]
    fn features_follow_the_context_and_its_history() {
        let mut h = History::default();
        for (page, holder, access) in [
            (7, 1, Access::Write),
            (9, 1, Access::Read),
            (100, 0, Access::Read),
        ] {
            h.push(FaultRecord {
                page,
                access,
                holder,
                decision: Decision::MovePage,
            });
        }
        let mut c = crate::tests::context(&h);
        c.access = Access::Write;
        let x = features(&c);
        let get = |name: &str| x[FEATURE_NAMES.iter().position(|&n| n == name).unwrap()];
        assert_eq!(get("is_write"), 1.0);
        assert_eq!(get("holder_is_home"), 1.0);
        assert_eq!(get("history_len"), 3.0);
        assert_eq!(get("history_to_holder"), 2.0);
        assert_eq!(get("history_same_page"), 1.0);
        assert_eq!(get("history_writes"), 1.0);
        assert_eq!(get("holder_vcpus"), 1.0);
        assert_eq!(get("room_on_holder"), 1.0);
        assert_eq!(get("faults_since_move"), 3.0);
        assert_eq!(get("link_page_us"), 100.0);
        assert_eq!(get("link_vcpu_us"), 200.0);
    }
}
