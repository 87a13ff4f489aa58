//! The oracle, and per-fault labels for training.
//!
//! At every fault a policy decides, the simulator can play both choices forward: serve
//! the fault by bringing the page, or by moving the vCPU, then run the next `horizon`
//! touches of every vCPU with a continuation ([`LookAhead`]: every later fault brings the
//! page, or a stateless policy decides the later faults), and add up what the vCPUs'
//! clocks advanced. The cheaper choice is the oracle's decision; the two costs are the
//! fault's label.
//!
//! With a policy π as the continuation, the two costs are π's cost-to-go after each
//! choice (a rollout): the choice that is cheaper is a one-step improvement on π, which
//! is what a learned policy trained on such labels can aim at. With the fixed
//! continuation the labels cannot see that a policy moving vCPUs keeps moving them.
//!
//! The look-ahead is myopic by design (a bounded horizon): it is the cost a decision
//! causes soon, not the best of all futures. What it can still miss: a vCPU move that
//! pays off only beyond the horizon, and a page move whose harm is a bounce far later.

use crate::{Decision, Outcome, Shape, Sim, SimError};
use flotilla_placement::features::{features, FEATURE_COUNT};
use flotilla_placement::Policy;
use flotilla_telemetry::trace::Trace;
use flotilla_transport::NodeId;

/// Touches per vCPU each look-ahead plays, unless told otherwise.
pub const DEFAULT_HORIZON: usize = 32;

/// One decided fault, with what each choice would have cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    /// Simulated time of the fault.
    pub t_ns: u64,
    pub vcpu: u32,
    pub node: NodeId,
    pub page: u64,
    pub holder: NodeId,
    /// `flotilla_placement::features` of the fault, as the engine would compute it.
    pub features: [f32; FEATURE_COUNT],
    /// vCPU time spent over the look-ahead if the page is brought, in ns.
    pub cost_page_ns: u64,
    /// The same if the vCPU moves to the holder.
    pub cost_vcpu_ns: u64,
    /// What the replay did (the oracle: the cheaper, a page move on a tie).
    pub taken: Decision,
}

/// Builds node `n`'s policy.
pub type MakePolicy<'a> = Box<dyn FnMut(NodeId) -> Box<dyn Policy> + 'a>;

/// How a look-ahead plays the future after the choice it prices.
pub struct LookAhead<'a> {
    /// Touches per vCPU.
    pub horizon: usize,
    /// Builds node `n`'s policy for the later faults (it must keep no state of its own:
    /// [`Policy::fork`] is `Some`); `None`: every later fault brings the page.
    pub continuation: Option<MakePolicy<'a>>,
}

impl LookAhead<'static> {
    /// `horizon` touches, every later fault bringing the page.
    pub fn fixed(horizon: usize) -> LookAhead<'static> {
        LookAhead {
            horizon,
            continuation: None,
        }
    }
}

/// Who decides the faults of a labelled replay.
pub enum Decider<'a> {
    /// The cheaper choice by look-ahead.
    Oracle,
    /// A policy per node; the look-ahead only labels.
    Policy(&'a mut dyn FnMut(NodeId) -> Box<dyn Policy>),
}

/// Replays `trace` on `shape` with `costs`, decided by `decider`; with `labels`, every
/// decided fault's [`Label`], priced by `look`. The oracle looks ahead whether or not it
/// labels.
pub fn replay_labelled(
    trace: &Trace,
    shape: &Shape,
    costs: &crate::Costs,
    decider: Decider<'_>,
    look: LookAhead<'_>,
    labels: bool,
) -> Result<(Outcome, Vec<Label>), SimError> {
    replay_labelled_with(trace, shape, costs, decider, look, labels, &mut |_, _| {})
}

/// [`replay_labelled`] with a progress callback, as [`crate::replay_with`].
pub fn replay_labelled_with(
    trace: &Trace,
    shape: &Shape,
    costs: &crate::Costs,
    decider: Decider<'_>,
    look: LookAhead<'_>,
    labels: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Outcome, Vec<Label>), SimError> {
    let horizon = look.horizon;
    if horizon == 0 {
        return Err(SimError::Horizon);
    }
    let mut sim = Sim::new(trace, shape, costs)?;
    let mut continuation: Option<Vec<Box<dyn Policy>>> = look
        .continuation
        .map(|mut make| (0..shape.nodes).map(&mut make).collect());
    if let Some(p) = continuation.iter().flatten().find(|p| p.fork().is_none()) {
        return Err(SimError::StatefulContinuation(p.name()));
    }
    let mut policies: Option<Vec<Box<dyn Policy>>> = match decider {
        Decider::Oracle => None,
        Decider::Policy(make) => Some((0..shape.nodes).map(make).collect()),
    };
    let mut out = Vec::new();
    let mut done = 0u64;
    while let Some(s) = sim.take() {
        done += 1;
        if done.is_multiple_of(crate::PROGRESS_EVERY) {
            progress(done, sim.events());
        }
        let Some(f) = sim.fault(&s) else {
            sim.serve(s, None)?;
            continue;
        };
        if !sim.decided(&s, &f) {
            sim.serve(s, Some((f, Decision::MovePage)))?;
            continue;
        }
        let (x, node, chosen) = {
            let fc = sim.context(&s, &f);
            let chosen = policies.as_mut().map(|p| p[fc.node as usize].decide(&fc));
            (features(&fc), fc.node, chosen)
        };
        let looked = if labels || chosen.is_none() {
            let now: u64 = sim.clocks();
            let page = sim.look_ahead(
                s,
                f,
                Decision::MovePage,
                horizon,
                continuation.as_deref_mut(),
            )?;
            let vcpu = sim.look_ahead(
                s,
                f,
                Decision::MoveVcpu,
                horizon,
                continuation.as_deref_mut(),
            )?;
            Some((page.saturating_sub(now), vcpu.saturating_sub(now)))
        } else {
            None
        };
        let taken = match (chosen, looked) {
            (Some(d), _) => d,
            (None, Some((page, vcpu))) if vcpu < page => Decision::MoveVcpu,
            (None, _) => Decision::MovePage,
        };
        if labels {
            let (cost_page_ns, cost_vcpu_ns) = looked.unwrap_or_default();
            out.push(Label {
                t_ns: s.t,
                vcpu: s.v as u32,
                node,
                page: s.touch.page,
                holder: f.holder,
                features: x,
                cost_page_ns,
                cost_vcpu_ns,
                taken,
            });
        }
        sim.serve(s, Some((f, taken)))?;
    }
    Ok((sim.finish(), out))
}
