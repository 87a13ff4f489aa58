//! The trace-driven placement simulator: what would this run have cost under another
//! policy, on another cluster?
//!
//! [`replay`] takes a trace's touch stream: every `remote_fault` and `access_sample`
//! event, which with `--touch-epoch-ms` is every page each vCPU touched per epoch. It
//! plays the stream again on a simulated cluster:
//! - Each vCPU replays its touches in order. The compute time between two touches is the
//!   recorded gap minus the stall the recording run paid at the first of them. A node
//!   runs its vCPUs on its CPUs by processor sharing.
//! - A touch of a page the vCPU's node does not hold well enough is a remote fault, and
//!   the policy decides, through the same `Policy` trait and `FaultContext` the engine
//!   uses. The page is brought through the engine's own home directory
//!   (`flotilla_transport::directory::PageDirectory`, one per node, driven message by
//!   message), or the vCPU moves to the node holding the page.
//! - Costs come from the trace's measured medians (run metadata, format version 2), or
//!   from [`Costs`] given by the caller.
//!
//! Modelled as the engine does it: RAM homes (contiguous or interleaved), each vCPU's
//! first node, replicas and invalidations, ownership upgrades.
//!
//! Not modelled, and said so in the results' use:
//! - stacks are homed by the RAM rule, not on their vCPU's node (the trace does not say
//!   where the stacks are);
//! - the guest image is taken as replicated everywhere and never written;
//! - futex traffic to node 0 is not replayed;
//! - messages cost a fixed time each, with no queueing on links;
//! - a page transaction takes effect when it starts; its cost is charged to the faulting
//!   vCPU (others can see the page moved before the faulting vCPU resumes).

use flotilla_placement::{FaultContext, FaultRecord, History, Policy};
use flotilla_telemetry::trace::{EventKind, Trace, NONE16};
use flotilla_transport::directory::PageDirectory;
use flotilla_transport::{Access, Message, NodeId};
use std::collections::{BinaryHeap, HashMap, VecDeque};

pub use flotilla_coherence::Decision;

/// Guest pages below this (`IMAGE_MIN_ADDR`, 2 MiB) are the engine's boot structures,
/// never coherent.
const FIRST_PAGE: u64 = 512;
/// Bytes on the wire: a frame header plus a small body, a page, a vCPU's state.
const SMALL_FRAME: u64 = 20 + 16;
const PAGE_FRAME: u64 = 20 + 10 + 4096;
const MOVE_FRAME: u64 = 20 + 32 + 8 * 1024;

/// What the mechanisms cost, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costs {
    /// A remote fault that brings 4 KiB of data: fault exit to re-entry.
    pub fetch_ns: u64,
    /// An ownership upgrade or a grant without data: one small round trip.
    pub upgrade_ns: u64,
    /// Invalidating replicas before a write: one more round trip (acks in parallel).
    pub invalidate_ns: u64,
    /// A vCPU move: fault exit on the source to re-entry on the destination.
    pub move_ns: u64,
    /// A local trap that maps a page (what a recorded sample paid).
    pub install_ns: u64,
    /// Factor on the recorded compute time between touches. A reference-stream
    /// recording runs many times slower than the guest does unrecorded (docs/telemetry.md),
    /// and its gaps hold that; [`calibrate_compute`] finds the factor that makes a 1-node
    /// replay take as long as a measured 1-node run.
    pub compute_scale: f64,
}

impl Costs {
    /// The trace's measured medians, with documented fallbacks where the recording run
    /// measured none: a fetch is a round trip plus an install, a move a round trip plus
    /// capture and restore; a 4 KiB TCP round trip of 60 µs when even that is missing.
    pub fn from_trace(t: &Trace) -> Costs {
        let c = t.meta.run.as_ref().map(|r| r.costs).unwrap_or_default();
        let rtt = if c.rtt_4k_ns > 0 { c.rtt_4k_ns } else { 60_000 };
        let install = if c.install_ns > 0 {
            c.install_ns
        } else {
            5_000
        };
        Costs {
            fetch_ns: if c.fault_service_ns > 0 {
                c.fault_service_ns
            } else {
                rtt + install
            },
            upgrade_ns: rtt,
            invalidate_ns: rtt,
            move_ns: if c.vcpu_move_ns > 0 {
                c.vcpu_move_ns
            } else {
                rtt + c.capture_ns + c.restore_ns
            },
            install_ns: install,
            compute_scale: 1.0,
        }
    }

    /// The same costs on a link `delta_ns` slower one way (negative: faster): every
    /// round trip pays twice the difference.
    pub fn with_link_delta(self, delta_ns: i64) -> Costs {
        let add = |v: u64| (v as i64 + 2 * delta_ns).max(0) as u64;
        Costs {
            fetch_ns: add(self.fetch_ns),
            upgrade_ns: add(self.upgrade_ns),
            invalidate_ns: add(self.invalidate_ns),
            move_ns: add(self.move_ns),
            install_ns: self.install_ns,
            compute_scale: self.compute_scale,
        }
    }
}

/// The simulated cluster.
#[derive(Debug, Clone)]
pub struct Shape {
    pub nodes: u16,
    /// CPUs each node runs vCPUs on.
    pub cpus: u32,
}

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("a cluster has 1 to 64 nodes, not {0}")]
    Nodes(u16),
    #[error("a node needs at least one CPU")]
    Cpus,
    #[error("the trace has no touches to replay (no remote_fault or access_sample events)")]
    Empty,
    #[error("the trace touches page {page:#x}, beyond the guest's {mem_bytes} bytes of RAM")]
    Page { page: u64, mem_bytes: u64 },
    #[error("the directory refused a step (a simulator bug): {0}")]
    Protocol(String),
}

/// What a replay predicts; the field names of `flotilla run --json` where they mean the
/// same thing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    /// Predicted run time: when the last vCPU finished its touches.
    pub wall_ms: f64,
    /// Time vCPUs spent stalled on faults and moves, summed over vCPUs.
    pub stall_ms: f64,
    pub remote_faults: u64,
    pub page_moves: u64,
    pub replicas_made: u64,
    pub invalidations: u64,
    pub vcpu_moves: u64,
    pub bytes_sent: u64,
    /// Touches replayed.
    pub events: u64,
}

/// One touch of a vCPU's stream.
#[derive(Debug, Clone, Copy)]
struct Touch {
    page: u64,
    access: Access,
    /// Compute time since the previous touch of the same vCPU.
    compute_ns: u64,
}

/// The touch streams of a trace, by vCPU.
fn streams(t: &Trace, costs: &Costs) -> Vec<VecDeque<Touch>> {
    let vcpus = t.meta.vcpus as usize;
    let mut last: Vec<Option<(u64, u64)>> = vec![None; vcpus];
    let mut out: Vec<VecDeque<Touch>> = vec![VecDeque::new(); vcpus];
    let mut events: Vec<_> = t
        .events
        .iter()
        .filter(|e| {
            e.vcpu != NONE16
                && (e.vcpu as usize) < vcpus
                && e.page >= FIRST_PAGE
                && matches!(
                    e.kind(),
                    Some(EventKind::RemoteFault | EventKind::AccessSample)
                )
        })
        .collect();
    events.sort_by_key(|e| (e.vcpu, e.t_ns));
    for e in events {
        let v = e.vcpu as usize;
        // What the recording run stalled at this touch.
        let stall = match e.kind() {
            Some(EventKind::RemoteFault) => u64::from(e.service_ns),
            _ => costs.install_ns,
        };
        let compute_ns = match last[v] {
            Some((t, s)) => e.t_ns.saturating_sub(t).saturating_sub(s),
            None => 0,
        };
        last[v] = Some((e.t_ns, stall));
        out[v].push_back(Touch {
            page: e.page,
            access: e.access().unwrap_or(Access::Read),
            compute_ns,
        });
    }
    out
}

/// How a node holds a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Shared,
    Owned,
}

/// The simulated cluster's pages: every node's copies and homes' directories.
struct Pages {
    nodes: u16,
    end: u64,
    interleave: bool,
    held: Vec<HashMap<u64, Held>>,
    dirs: Vec<PageDirectory>,
    heat: Vec<HashMap<u64, u32>>,
}

/// What one page transaction did.
#[derive(Debug, Default)]
struct Moved {
    data: bool,
    invalidations: u64,
    replica: bool,
    bytes: u64,
}

impl Pages {
    fn new(nodes: u16, mem_bytes: u64, interleave: bool) -> Pages {
        let end = (mem_bytes / 4096).max(FIRST_PAGE + 1);
        let count = end - FIRST_PAGE;
        let home = move |p: u64| home_of(p, nodes, end, interleave);
        let dirs = (0..nodes)
            .map(|me| {
                PageDirectory::new(me, nodes, FIRST_PAGE, count, |p| {
                    (home(p) == me).then_some((me, 1u64 << me))
                })
            })
            .collect();
        Pages {
            nodes,
            end,
            interleave,
            held: vec![HashMap::new(); nodes as usize],
            dirs,
            heat: vec![HashMap::new(); nodes as usize],
        }
    }

    fn home(&self, page: u64) -> NodeId {
        home_of(page, self.nodes, self.end, self.interleave)
    }

    /// How `node` holds `page` (a page never moved is its home's, owned).
    fn state(&self, node: NodeId, page: u64) -> Option<Held> {
        match self.held[node as usize].get(&page) {
            Some(h) => Some(*h),
            None if !self.moved(page) && self.home(page) == node => Some(Held::Owned),
            None => None,
        }
    }

    /// Whether `page` left its boot state (owned by its home, nowhere else) at some
    /// point; before that no node has an entry for it.
    fn moved(&self, page: u64) -> bool {
        self.held.iter().any(|h| h.contains_key(&page))
    }

    /// The node that holds the writable copy, or a copy, of `page`.
    fn holder(&self, page: u64) -> NodeId {
        (0..self.nodes)
            .find(|&n| self.state(n, page) == Some(Held::Owned))
            .or_else(|| (0..self.nodes).find(|&n| self.state(n, page).is_some()))
            .unwrap_or_else(|| self.home(page))
    }

    fn usable(&self, node: NodeId, page: u64, want: Access) -> bool {
        match self.state(node, page) {
            Some(Held::Owned) => true,
            Some(Held::Shared) => want != Access::Write,
            None => false,
        }
    }

    /// Materialises a page's implicit state (owned by its home) before it changes.
    fn touch(&mut self, page: u64) {
        if !self.moved(page) {
            let home = self.home(page);
            self.held[home as usize].insert(page, Held::Owned);
        }
    }

    /// `node` brings `page` for `want`, through the home directory, message by message.
    fn bring(&mut self, node: NodeId, page: u64, want: Access) -> Result<Moved, SimError> {
        self.touch(page);
        let home = self.home(page);
        let err =
            |e: flotilla_transport::directory::ProtocolError| SimError::Protocol(e.to_string());
        let mut moved = Moved::default();
        let mut queue: VecDeque<(NodeId, NodeId, Message)> = self.dirs[home as usize]
            .request(page, node, want)
            .map_err(err)?
            .into_iter()
            .map(|(to, m)| (home, to, m))
            .collect();
        while let Some((from, to, msg)) = queue.pop_front() {
            moved.bytes += SMALL_FRAME;
            let out: Vec<(NodeId, Message)> = match msg {
                Message::Fetch {
                    page,
                    want,
                    requester,
                    ..
                } => {
                    // `to` owns it: it downgrades or gives it up and sends the data
                    // (`PageData`, taken here at once: the simulator carries no bytes).
                    let h = &mut self.held[to as usize];
                    match want {
                        Access::Write => {
                            h.remove(&page);
                        }
                        _ => {
                            h.insert(page, Held::Shared);
                        }
                    }
                    moved.bytes += PAGE_FRAME;
                    moved.data = true;
                    let state = if want == Access::Write {
                        Held::Owned
                    } else {
                        moved.replica = true;
                        Held::Shared
                    };
                    self.held[requester as usize].insert(page, state);
                    *self.heat[requester as usize].entry(page).or_default() += 1;
                    queue.push_back((requester, home, Message::Done { page }));
                    Vec::new()
                }
                Message::Grant { page, .. } => {
                    self.held[to as usize].insert(page, Held::Owned);
                    vec![(home, Message::Done { page })]
                }
                Message::Invalidate { page, .. } => {
                    moved.invalidations += 1;
                    self.held[to as usize].remove(&page);
                    vec![(home, Message::InvalidateAck { page })]
                }
                Message::InvalidateAck { page } => self.dirs[to as usize]
                    .invalidate_ack(page, from)
                    .map_err(err)?,
                Message::Done { page } => self.dirs[to as usize].done(page, from).map_err(err)?,
                other => {
                    return Err(SimError::Protocol(format!(
                        "the directory sent {}, which the simulator does not model",
                        other.name()
                    )))
                }
            };
            queue.extend(out.into_iter().map(|(t, m)| (to, t, m)));
        }
        Ok(moved)
    }
}

fn home_of(page: u64, nodes: u16, end: u64, interleave: bool) -> NodeId {
    if interleave {
        (page % nodes as u64) as NodeId
    } else {
        ((page - FIRST_PAGE) * nodes as u64 / (end - FIRST_PAGE)) as NodeId
    }
}

/// A vCPU in the simulation: where it is, and its clock.
struct SimVcpu {
    node: NodeId,
    clock_ns: u64,
    history: History,
}

/// Replays `trace` under `policy(node)` (one policy per node, as in the engine) on
/// `shape`, with `costs`.
pub fn replay(
    trace: &Trace,
    shape: &Shape,
    costs: &Costs,
    mut policy: impl FnMut(NodeId) -> Box<dyn Policy>,
) -> Result<Outcome, SimError> {
    if shape.nodes == 0 || shape.nodes > 64 {
        return Err(SimError::Nodes(shape.nodes));
    }
    if shape.cpus == 0 {
        return Err(SimError::Cpus);
    }
    let end = trace.meta.mem_bytes / 4096;
    if let Some(e) = trace
        .events
        .iter()
        .find(|e| e.page >= end && e.vcpu != NONE16)
    {
        return Err(SimError::Page {
            page: e.page,
            mem_bytes: trace.meta.mem_bytes,
        });
    }
    let mut streams = streams(trace, costs);
    let events: u64 = streams.iter().map(|s| s.len() as u64).sum();
    if events == 0 {
        return Err(SimError::Empty);
    }
    let run = trace.meta.run.as_ref();
    let interleave = run.is_some_and(|r| r.ram == "interleave");
    let mut pages = Pages::new(shape.nodes, trace.meta.mem_bytes, interleave);
    let mut policies: Vec<Box<dyn Policy>> = (0..shape.nodes).map(&mut policy).collect();
    // Each vCPU's first node: the recorded one if the shape has it, else round-robin.
    let first = |v: usize| -> NodeId {
        match run.and_then(|r| r.vcpu_nodes.get(v)) {
            Some(&n) if n < shape.nodes => n,
            _ => (v % shape.nodes as usize) as NodeId,
        }
    };
    let mut vcpus: Vec<SimVcpu> = (0..streams.len())
        .map(|v| SimVcpu {
            node: first(v),
            clock_ns: 0,
            history: History::default(),
        })
        .collect();
    // A vCPU with no touches left is not runnable: it takes no CPU.
    let mut load = vec![0u32; shape.nodes as usize];
    for (v, s) in vcpus.iter().zip(&streams) {
        if !s.is_empty() {
            load[v.node as usize] += 1;
        }
    }
    let mut out = Outcome {
        events,
        ..Default::default()
    };
    let mut stall_ns = 0u64;
    // The vCPU with the earliest clock goes next.
    let mut ready: BinaryHeap<std::cmp::Reverse<(u64, usize)>> = (0..vcpus.len())
        .map(|v| std::cmp::Reverse((0, v)))
        .collect();
    while let Some(std::cmp::Reverse((_, v))) = ready.pop() {
        let Some(touch) = streams[v].pop_front() else {
            continue;
        };
        let last = streams[v].is_empty();
        let node = vcpus[v].node;
        // Processor sharing: a node with more runnable vCPUs than CPUs runs each slower.
        let share = f64::from(load[node as usize]) / f64::from(shape.cpus);
        let compute = touch.compute_ns as f64 * costs.compute_scale;
        let mut t = vcpus[v].clock_ns + (compute * share.max(1.0)) as u64;
        if !pages.usable(node, touch.page, touch.access) {
            out.remote_faults += 1;
            let holder = pages.holder(touch.page);
            let have_replica = pages.state(node, touch.page) == Some(Held::Shared);
            let heat = pages.heat[node as usize]
                .get(&touch.page)
                .copied()
                .unwrap_or(0);
            let decision = if holder == node {
                Decision::MovePage
            } else {
                let fc = FaultContext {
                    vcpu: v as u32,
                    node,
                    nodes: shape.nodes,
                    page: touch.page,
                    access: touch.access,
                    holder,
                    home: pages.home(touch.page),
                    have_replica,
                    local_vcpus: load[node as usize],
                    page_heat: heat,
                    history: &vcpus[v].history,
                    node_vcpus: &load,
                    cpus: shape.cpus,
                };
                policies[node as usize].decide(&fc)
            };
            vcpus[v].history.push(FaultRecord {
                page: touch.page,
                access: touch.access,
                holder,
                decision,
            });
            let cost = match decision {
                Decision::MovePage => {
                    let m = pages.bring(node, touch.page, touch.access)?;
                    out.invalidations += m.invalidations;
                    out.bytes_sent += m.bytes;
                    if m.data {
                        out.page_moves += 1;
                    }
                    if m.replica {
                        out.replicas_made += 1;
                    }
                    (if m.data {
                        costs.fetch_ns
                    } else {
                        costs.upgrade_ns
                    }) + if m.invalidations > 0 {
                        costs.invalidate_ns
                    } else {
                        0
                    }
                }
                Decision::MoveVcpu => {
                    out.vcpu_moves += 1;
                    out.bytes_sent += MOVE_FRAME;
                    load[node as usize] -= 1;
                    load[holder as usize] += 1;
                    vcpus[v].node = holder;
                    // There, the page may still need an upgrade (a write to a replica).
                    let mut c = costs.move_ns;
                    if !pages.usable(holder, touch.page, touch.access) {
                        let m = pages.bring(holder, touch.page, touch.access)?;
                        out.invalidations += m.invalidations;
                        out.bytes_sent += m.bytes;
                        c += costs.upgrade_ns;
                    }
                    c
                }
            };
            stall_ns += cost;
            t += cost;
        }
        vcpus[v].clock_ns = t;
        if last {
            // It ran to its last touch and stops: no longer runnable where it is.
            load[vcpus[v].node as usize] -= 1;
        } else {
            ready.push(std::cmp::Reverse((t, v)));
        }
    }
    let end = vcpus.iter().map(|v| v.clock_ns).max().unwrap_or(0);
    out.wall_ms = end as f64 / 1e6;
    out.stall_ms = stall_ns as f64 / 1e6;
    Ok(out)
}

/// The compute scale that makes `trace`, replayed on one node with `cpus` CPUs, take
/// `one_node_ms` (a measured run of the same guest on one node): the recorded gaps
/// between touches include what recording cost.
pub fn calibrate_compute(
    trace: &Trace,
    cpus: u32,
    costs: &Costs,
    one_node_ms: f64,
) -> Result<f64, SimError> {
    let shape = Shape { nodes: 1, cpus };
    let unit = Costs {
        compute_scale: 1.0,
        ..*costs
    };
    let alone = replay(trace, &shape, &unit, |_| {
        Box::new(flotilla_placement::AlwaysPage)
    })?;
    Ok(if alone.wall_ms > 0.0 {
        one_node_ms / alone.wall_ms
    } else {
        1.0
    })
}

#[cfg(test)]
mod tests;
