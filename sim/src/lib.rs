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
//! Modelled from the trace's layout block (format version 3; older traces home stacks by
//! the RAM rule and the image like any RAM): the image starts replicated on every node,
//! each vCPU's stack on its first node, and a fault on a vCPU's own stack brings the page
//! whatever the policy.
//!
//! Not modelled, and said so in the results' use:
//! - futex traffic to node 0 is not replayed;
//! - messages cost a fixed time each, with no queueing on links;
//! - a page transaction takes effect when it starts; its cost is charged to the faulting
//!   vCPU (others can see the page moved before the faulting vCPU resumes).

use flotilla_placement::{FaultContext, FaultRecord, History, LinkCost, Policy};
use flotilla_telemetry::trace::{flags, Event, EventKind, Trace, NONE16};
use flotilla_transport::directory::{PageDirectory, CLAIM_BACKOFF, CLAIM_EXTENT, FIRST_TOUCH_RUN};
use flotilla_transport::{Access, Message, NodeId};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

/// A hasher for page numbers: one multiply (Fibonacci hashing). The replay does a few
/// map operations per touch; SipHash's DoS resistance buys nothing here and cost half
/// the replay's time.
#[derive(Default, Clone, Copy)]
struct PageHasher(u64);

impl Hasher for PageHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type PageMap<V> = HashMap<u64, V, BuildHasherDefault<PageHasher>>;
type PageSet = HashSet<u64, BuildHasherDefault<PageHasher>>;

pub use flotilla_coherence::Decision;
pub use oracle::{
    replay_labelled, replay_labelled_with, Decider, Label, LookAhead, MakePolicy, DEFAULT_HORIZON,
};

mod oracle;

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
        Costs::measured(&t.meta.run.as_ref().map(|r| r.costs).unwrap_or_default())
    }

    /// The same from a run's measured medians (a trace's, or a plain run's: a
    /// reference-stream recording slows the engine down, so its own medians run high).
    pub fn measured(c: &flotilla_telemetry::trace::Costs) -> Costs {
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

    /// What the engine tells a policy about its links (it measures the same two costs).
    pub fn link(&self) -> LinkCost {
        LinkCost {
            page_us: self.fetch_ns as f32 / 1e3,
            vcpu_us: self.move_ns as f32 / 1e3,
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

/// The simulated cluster, and where the guest starts on it.
#[derive(Debug, Clone)]
pub struct Shape {
    pub nodes: u16,
    /// CPUs each node runs vCPUs on.
    pub cpus: u32,
    /// The initial spread of guest RAM; `None`: the recorded run's.
    pub ram: Option<Ram>,
    /// vCPUs start round-robin over the nodes, not where the recorded run started them.
    pub spread: bool,
}

/// How guest RAM starts out over the nodes (the engine's `--ram`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ram {
    /// Equal contiguous ranges.
    Contiguous,
    /// By page, round-robin.
    Interleave,
}

impl Shape {
    /// `nodes` nodes of `cpus` CPUs, the guest started as recorded.
    pub fn new(nodes: u16, cpus: u32) -> Shape {
        Shape {
            nodes,
            cpus,
            ram: None,
            spread: false,
        }
    }
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
    #[error("a look-ahead needs a horizon of at least one touch")]
    Horizon,
    #[error("policy {0} keeps state of its own, so it cannot continue a look-ahead (which is played and rewound): use a stateless policy, such as heuristic or always-page")]
    StatefulContinuation(&'static str),
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
    /// Pages of fresh memory a node took over with no data sent (a claim).
    pub pages_claimed: u64,
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
    /// The touch this one must follow: the latest conflicting access to the same page
    /// by another vCPU in the recording (a write before this read; any access before
    /// this write), as (vCPU, index in its stream); `NONE16` for none (see [`streams`]).
    after_vcpu: u16,
    after_index: u32,
    /// Whether a fault here may claim the run after the page (the engine claims only
    /// where nothing is pending under the page's lock: a fault decoded from an `EFAULT`
    /// exit, not one that came back as MMIO). Known for recorded faults; for samples,
    /// what most of the trace's faults were.
    may_claim: bool,
}

/// The touch streams of a trace, by vCPU, each touch ordered after the latest
/// conflicting touch of the same page by another vCPU as recorded. This keeps what the
/// guest's own synchronisation kept: a reader sees the write it saw, a barrier's counter
/// is passed around in the recorded order, and a write-shared page bounces between its
/// writers as often as their accesses alternated. Without it a vCPU whose compute is
/// short races through its stream and a shared page stops bouncing.
fn streams(t: &Trace, costs: &Costs) -> Vec<Vec<Touch>> {
    /// The latest access, and the latest by a vCPU other than the latest's.
    type Recent = [(u16, u32); 2];
    fn note(r: &mut Recent, v: u16, i: u32) {
        if r[0].0 != v {
            r[1] = r[0];
        }
        r[0] = (v, i);
    }
    fn other(r: &Recent, v: u16) -> (u16, u32) {
        if r[0].0 != v {
            r[0]
        } else {
            r[1]
        }
    }
    let vcpus = t.meta.vcpus as usize;
    let mut last: Vec<Option<(u64, u64)>> = vec![None; vcpus];
    let mut out: Vec<Vec<Touch>> = vec![Vec::new(); vcpus];
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
    // Recorded traces are in time order already (`merge_parts`); others are sorted.
    if !events.is_sorted_by_key(|e| e.t_ns) {
        events.sort_by_key(|e| (e.t_ns, e.vcpu));
    }
    let faults: Vec<_> = events
        .iter()
        .filter(|e| e.kind() == Some(EventKind::RemoteFault))
        .collect();
    let decoded = |e: &Event| e.flags & flags::DECODED != 0;
    let mostly_decoded = faults.iter().filter(|e| decoded(e)).count() * 2 >= faults.len();
    let none = [(NONE16, 0); 2];
    // Per page: recent accesses, recent writes.
    let mut seen: PageMap<(Recent, Recent)> = PageMap::default();
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
        let access = e.access().unwrap_or(Access::Read);
        let write = access == Access::Write;
        let i = out[v].len() as u32;
        let (accesses, writes) = seen.entry(e.page).or_insert((none, none));
        // A write follows the last access by another vCPU; a read, the last write.
        let (after_vcpu, after_index) = if write {
            other(accesses, e.vcpu)
        } else {
            other(writes, e.vcpu)
        };
        note(accesses, e.vcpu, i);
        if write {
            note(writes, e.vcpu, i);
        }
        out[v].push(Touch {
            page: e.page,
            access,
            compute_ns,
            after_vcpu,
            after_index,
            may_claim: match e.kind() {
                Some(EventKind::RemoteFault) => decoded(e),
                _ => mostly_decoded,
            },
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

/// One change to [`Pages`], as it was before: what a look-ahead undoes.
#[derive(Debug, Clone, Copy)]
enum Undo {
    Held {
        node: NodeId,
        page: u64,
        was: Option<Held>,
    },
    Heat {
        node: NodeId,
        page: u64,
        was: Option<u32>,
    },
    /// `page` was touched for the first time.
    Touched { page: u64 },
    Directory {
        home: NodeId,
        page: u64,
        owner: NodeId,
        copyset: u64,
    },
}

/// Where a guest's pages start, by the engine's rules.
#[derive(Debug, Clone)]
struct Homes {
    nodes: u16,
    end: u64,
    interleave: bool,
    /// Replicated on every node at boot (owned by the RAM rule's home).
    image: std::ops::Range<u64>,
    stacks: std::ops::Range<u64>,
    stack_pages: u64,
    /// Each vCPU's first node: its stack's home.
    stack_homes: Vec<NodeId>,
}

impl Homes {
    fn home(&self, page: u64) -> NodeId {
        if let Some(v) = self.stack_of(page) {
            return self.stack_homes[v as usize];
        }
        if self.interleave {
            (page % self.nodes as u64) as NodeId
        } else {
            ((page - FIRST_PAGE) * self.nodes as u64 / (self.end - FIRST_PAGE)) as NodeId
        }
    }

    fn stack_of(&self, page: u64) -> Option<u32> {
        (self.stack_pages > 0 && self.stacks.contains(&page))
            .then(|| ((page - self.stacks.start) / self.stack_pages) as u32)
    }

    fn replicated(&self, page: u64) -> bool {
        self.image.contains(&page)
    }
}

/// The simulated cluster's pages: every node's copies and homes' directories.
struct Pages {
    nodes: u16,
    homes: Homes,
    held: Vec<PageMap<Held>>,
    dirs: Vec<PageDirectory>,
    heat: Vec<PageMap<u32>>,
    /// Pages some vCPU has touched: the others are fresh memory, which a claim can take
    /// with no data sent.
    touched: PageSet,
    /// While a look-ahead runs: every change, so it can be undone.
    journal: Option<Vec<Undo>>,
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
    fn new(homes: Homes) -> Pages {
        let nodes = homes.nodes;
        let count = homes.end - FIRST_PAGE;
        let all = if nodes >= 64 {
            u64::MAX
        } else {
            (1u64 << nodes) - 1
        };
        let dirs = (0..nodes)
            .map(|me| {
                PageDirectory::new(me, nodes, FIRST_PAGE, count, |p| {
                    let copies = if homes.replicated(p) { all } else { 1u64 << me };
                    (homes.home(p) == me).then_some((me, copies))
                })
            })
            .collect();
        Pages {
            nodes,
            homes,
            held: vec![PageMap::default(); nodes as usize],
            dirs,
            heat: vec![PageMap::default(); nodes as usize],
            touched: Default::default(),
            journal: None,
        }
    }

    fn home(&self, page: u64) -> NodeId {
        self.homes.home(page)
    }

    /// How `node` holds `page` (a page never moved is its home's, owned, and an image
    /// page is replicated on every other node).
    fn state(&self, node: NodeId, page: u64) -> Option<Held> {
        match self.held[node as usize].get(&page) {
            Some(h) => Some(*h),
            None if self.moved(page) => None,
            None if self.home(page) == node => Some(Held::Owned),
            None if self.homes.replicated(page) => Some(Held::Shared),
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

    fn heat(&self, node: NodeId, page: u64) -> u32 {
        self.heat[node as usize].get(&page).copied().unwrap_or(0)
    }

    /// Sets (or with `None` drops) `node`'s copy of `page`, journaled.
    fn set_held(&mut self, node: NodeId, page: u64, to: Option<Held>) {
        let h = &mut self.held[node as usize];
        let was = match to {
            Some(to) => h.insert(page, to),
            None => h.remove(&page),
        };
        if let Some(j) = &mut self.journal {
            j.push(Undo::Held { node, page, was });
        }
    }

    fn warm(&mut self, node: NodeId, page: u64) {
        let e = self.heat[node as usize].entry(page).or_default();
        let was = *e;
        *e += 1;
        if let Some(j) = &mut self.journal {
            j.push(Undo::Heat {
                node,
                page,
                was: (was > 0).then_some(was),
            });
        }
    }

    /// Starts journaling changes (a look-ahead begins).
    fn mark(&mut self) {
        self.journal = Some(Vec::new());
    }

    /// Undoes every change since [`mark`](Self::mark), newest first, and stops
    /// journaling.
    fn rewind(&mut self) -> Result<(), SimError> {
        for u in self.journal.take().unwrap_or_default().into_iter().rev() {
            match u {
                Undo::Held { node, page, was } => {
                    let h = &mut self.held[node as usize];
                    match was {
                        Some(w) => h.insert(page, w),
                        None => h.remove(&page),
                    };
                }
                Undo::Heat { node, page, was } => {
                    let h = &mut self.heat[node as usize];
                    match was {
                        Some(w) => h.insert(page, w),
                        None => h.remove(&page),
                    };
                }
                Undo::Touched { page } => {
                    self.touched.remove(&page);
                }
                Undo::Directory {
                    home,
                    page,
                    owner,
                    copyset,
                } => self.dirs[home as usize]
                    .set_entry(page, owner, copyset)
                    .map_err(|e| SimError::Protocol(e.to_string()))?,
            }
        }
        Ok(())
    }

    /// Notes that a vCPU touched `page`; returns whether it was fresh until now.
    fn first_touch(&mut self, page: u64) -> bool {
        let fresh = self.touched.insert(page);
        if fresh {
            if let Some(j) = &mut self.journal {
                j.push(Undo::Touched { page });
            }
        }
        fresh
    }

    /// `node`'s first touch of `page` maps the run after it that `node` holds the same
    /// way and nobody has touched (the engine's `FIRST_TOUCH_RUN`): those are no longer
    /// fresh.
    fn populate_run(&mut self, node: NodeId, page: u64) {
        let held = self.state(node, page);
        for p in page + 1..page + FIRST_TOUCH_RUN {
            if p >= self.homes.end || self.touched.contains(&p) || self.state(node, p) != held {
                break;
            }
            self.first_touch(p);
        }
    }

    /// Whether `page` is fresh memory its home could hand over with no data: never
    /// touched, never moved, not part of the image.
    fn fresh(&self, page: u64) -> bool {
        !self.touched.contains(&page) && !self.moved(page) && !self.homes.replicated(page)
    }

    /// `node` claims `page` (homed elsewhere) and the pages after it with the same home
    /// that it does not hold, up to [`CLAIM_EXTENT`]; the home grants each that is fresh
    /// (`page` itself if `page_fresh`: it was, before this touch). As the engine does at
    /// a remote fault: one round trip, no data for what is granted. Returns whether
    /// `page` was granted, and how many pages were.
    fn claim(
        &mut self,
        node: NodeId,
        page: u64,
        page_fresh: bool,
    ) -> Result<(bool, u64), SimError> {
        let home = self.home(page);
        let err =
            |e: flotilla_transport::directory::ProtocolError| SimError::Protocol(e.to_string());
        let mut extent = 1;
        while extent < u64::from(CLAIM_EXTENT) {
            let p = page + extent;
            if p >= self.homes.end || self.home(p) != home || self.state(node, p).is_some() {
                break;
            }
            extent += 1;
        }
        let (mut first, mut taken) = (false, 0);
        for p in page..page + extent {
            let fresh = if p == page { page_fresh } else { self.fresh(p) };
            if !fresh {
                continue;
            }
            if let Some(j) = &mut self.journal {
                j.push(Undo::Directory {
                    home,
                    page: p,
                    owner: home,
                    copyset: 1u64 << home,
                });
            }
            if self.dirs[home as usize].claim(p, node).map_err(err)? {
                self.dirs[home as usize].done(p, node).map_err(err)?;
                self.set_held(node, p, Some(Held::Owned));
                taken += 1;
                first |= p == page;
            }
        }
        Ok((first, taken))
    }

    /// Materialises a page's implicit state (owned by its home, replicated if an image
    /// page) before it changes.
    fn touch(&mut self, page: u64) {
        if !self.moved(page) {
            let home = self.home(page);
            if self.homes.replicated(page) {
                for n in (0..self.nodes).filter(|&n| n != home) {
                    self.set_held(n, page, Some(Held::Shared));
                }
            }
            self.set_held(home, page, Some(Held::Owned));
        }
    }

    /// `node` brings `page` for `want`, through the home directory, message by message.
    fn bring(&mut self, node: NodeId, page: u64, want: Access) -> Result<Moved, SimError> {
        self.touch(page);
        let home = self.home(page);
        let err =
            |e: flotilla_transport::directory::ProtocolError| SimError::Protocol(e.to_string());
        if self.journal.is_some() {
            let (owner, copyset) = self.dirs[home as usize].entry(page).ok_or_else(|| {
                SimError::Protocol(format!("page {page:#x} has no entry at its home"))
            })?;
            if let Some(j) = &mut self.journal {
                j.push(Undo::Directory {
                    home,
                    page,
                    owner,
                    copyset,
                });
            }
        }
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
                    let kept = (want != Access::Write).then_some(Held::Shared);
                    self.set_held(to, page, kept);
                    moved.bytes += PAGE_FRAME;
                    moved.data = true;
                    let state = if want == Access::Write {
                        Held::Owned
                    } else {
                        moved.replica = true;
                        Held::Shared
                    };
                    self.set_held(requester, page, Some(state));
                    self.warm(requester, page);
                    queue.push_back((requester, home, Message::Done { page }));
                    Vec::new()
                }
                Message::Grant { page, .. } => {
                    self.set_held(to, page, Some(Held::Owned));
                    vec![(home, Message::Done { page })]
                }
                Message::Invalidate { page, .. } => {
                    moved.invalidations += 1;
                    self.set_held(to, page, None);
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

/// A vCPU in the simulation: where it is, and its clock.
#[derive(Clone)]
struct SimVcpu {
    node: NodeId,
    clock_ns: u64,
    history: History,
}

/// A touch taken off its vCPU's stream, its compute time run, not yet served.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    v: usize,
    touch: Touch,
    /// The vCPU's clock once the compute before the touch has run.
    t: u64,
}

/// The remote fault a step takes, as the faulting node sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fault {
    holder: NodeId,
    have_replica: bool,
    heat: u32,
}

/// What a replay changes as it goes, besides the pages: small enough for a look-ahead
/// to copy and put back whole.
#[derive(Clone)]
struct State {
    pos: Vec<usize>,
    vcpus: Vec<SimVcpu>,
    /// Runnable vCPUs per node (a vCPU with no touches left, or waiting, takes no CPU).
    load: Vec<u32>,
    /// vCPUs on each node that have not finished (what the engine's policies see).
    resident: Vec<u32>,
    /// Per node: faults left before it claims again, after a claim that got nothing.
    claim_backoff: Vec<u32>,
    /// The vCPU with the earliest clock goes next.
    ready: BinaryHeap<Reverse<(u64, usize)>>,
    /// vCPUs whose next touch must follow another vCPU's touch not yet served, by that
    /// vCPU: (the index it waits for, the waiting vCPU). Not runnable meanwhile.
    waiting: Vec<Vec<(u32, usize)>>,
    out: Outcome,
    stall_ns: u64,
}

/// A replay in progress: the cluster, every vCPU's place in its stream, and the counts
/// so far. Driven one touch at a time ([`take`](Sim::take), then
/// [`serve`](Sim::serve)), so a caller can decide a fault any way it likes, looking
/// ahead included.
pub(crate) struct Sim {
    shape: Shape,
    costs: Costs,
    streams: Vec<Vec<Touch>>,
    pages: Pages,
    st: State,
}

impl Sim {
    pub(crate) fn new(trace: &Trace, shape: &Shape, costs: &Costs) -> Result<Sim, SimError> {
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
        let streams = streams(trace, costs);
        let events: u64 = streams.iter().map(|s| s.len() as u64).sum();
        if events == 0 {
            return Err(SimError::Empty);
        }
        let run = trace.meta.run.as_ref();
        let interleave = match shape.ram {
            Some(r) => r == Ram::Interleave,
            None => run.is_some_and(|r| r.ram == "interleave"),
        };
        // Each vCPU's first node: the recorded one if the shape has it, else round-robin.
        let first = |v: usize| -> NodeId {
            match run.and_then(|r| r.vcpu_nodes.get(v)) {
                Some(&n) if n < shape.nodes && !shape.spread => n,
                _ => (v % shape.nodes as usize) as NodeId,
            }
        };
        let vcpus: Vec<SimVcpu> = (0..streams.len())
            .map(|v| SimVcpu {
                node: first(v),
                clock_ns: 0,
                history: History::default(),
            })
            .collect();
        let layout = run.and_then(|r| r.layout.as_ref());
        let stack_pages = run.map_or(0, |r| r.stack_bytes / 4096);
        let mut load = vec![0u32; shape.nodes as usize];
        for (v, s) in vcpus.iter().zip(&streams) {
            if !s.is_empty() {
                load[v.node as usize] += 1;
            }
        }
        let pages = Pages::new(Homes {
            nodes: shape.nodes,
            end: (trace.meta.mem_bytes / 4096).max(FIRST_PAGE + 1),
            interleave,
            image: layout.map_or(0..0, |l| l.image_pages.clone()),
            stacks: layout.map_or(0..0, |l| {
                l.stacks_first_page..l.stacks_first_page + stack_pages * vcpus.len() as u64
            }),
            stack_pages: if layout.is_some() { stack_pages } else { 0 },
            stack_homes: vcpus.iter().map(|v| v.node).collect(),
        });
        Ok(Sim {
            shape: shape.clone(),
            costs: *costs,
            st: State {
                pos: vec![0; streams.len()],
                ready: (0..streams.len()).map(|v| Reverse((0, v))).collect(),
                waiting: vec![Vec::new(); streams.len()],
                vcpus,
                resident: load.clone(),
                claim_backoff: vec![0; shape.nodes as usize],
                load,
                out: Outcome {
                    events,
                    ..Default::default()
                },
                stall_ns: 0,
            },
            streams,
            pages,
        })
    }

    /// The next touch, of the vCPU with the earliest clock, with its compute run.
    pub(crate) fn take(&mut self) -> Option<Step> {
        loop {
            let Reverse((_, v)) = self.st.ready.pop()?;
            let Some(&touch) = self.streams[v].get(self.st.pos[v]) else {
                continue;
            };
            let w = touch.after_vcpu as usize;
            if touch.after_vcpu != NONE16 && self.st.pos[w] <= touch.after_index as usize {
                // It must follow a touch `w` has not made yet: it waits, off its CPU.
                self.st.waiting[w].push((touch.after_index, v));
                self.st.load[self.st.vcpus[v].node as usize] -= 1;
                continue;
            }
            self.st.pos[v] += 1;
            let node = self.st.vcpus[v].node;
            // Processor sharing: a node with more runnable vCPUs than CPUs runs each
            // slower.
            let share = f64::from(self.st.load[node as usize]) / f64::from(self.shape.cpus);
            let compute = touch.compute_ns as f64 * self.costs.compute_scale;
            let t = self.st.vcpus[v].clock_ns + (compute * share.max(1.0)) as u64;
            return Some(Step { v, touch, t });
        }
    }

    /// The remote fault `s` takes, if its node does not hold the page well enough.
    pub(crate) fn fault(&self, s: &Step) -> Option<Fault> {
        let node = self.st.vcpus[s.v].node;
        let page = s.touch.page;
        (!self.pages.usable(node, page, s.touch.access)).then(|| Fault {
            holder: self.pages.holder(page),
            have_replica: self.pages.state(node, page) == Some(Held::Shared),
            heat: self.pages.heat(node, page),
        })
    }

    /// Whether a policy decides `f`: not when the page is on the vCPU's own node (an
    /// upgrade), nor for the vCPU's own stack, which follows it: the engine brings the
    /// page then too.
    pub(crate) fn decided(&self, s: &Step, f: &Fault) -> bool {
        f.holder != self.st.vcpus[s.v].node
            && self.pages.homes.stack_of(s.touch.page) != Some(s.v as u32)
    }

    /// `policies[node]`'s decision on `f` where a policy decides it; the page comes
    /// otherwise.
    pub(crate) fn decide(&self, s: &Step, f: &Fault, policies: &mut [Box<dyn Policy>]) -> Decision {
        if !self.decided(s, f) {
            return Decision::MovePage;
        }
        let fc = self.context(s, f);
        policies[fc.node as usize].decide(&fc)
    }

    /// What the engine would tell the policy about `f`.
    pub(crate) fn context(&self, s: &Step, f: &Fault) -> FaultContext<'_> {
        let node = self.st.vcpus[s.v].node;
        FaultContext {
            vcpu: s.v as u32,
            node,
            nodes: self.shape.nodes,
            page: s.touch.page,
            access: s.touch.access,
            holder: f.holder,
            home: self.pages.home(s.touch.page),
            have_replica: f.have_replica,
            local_vcpus: self.st.resident[node as usize],
            page_heat: f.heat,
            history: &self.st.vcpus[s.v].history,
            node_vcpus: &self.st.resident,
            cpus: self.shape.cpus,
            link: self.costs.link(),
        }
    }

    /// Serves step `s`: a hit costs nothing more; a remote fault `f` is served as
    /// `decision` says.
    pub(crate) fn serve(
        &mut self,
        s: Step,
        fault: Option<(Fault, Decision)>,
    ) -> Result<(), SimError> {
        let v = s.v;
        let node = self.st.vcpus[v].node;
        let page = s.touch.page;
        let access = s.touch.access;
        let mut t = s.t;
        let fresh = self.pages.fresh(page);
        self.pages.first_touch(page);
        if let Some((f, decision)) = fault {
            let holder = f.holder;
            self.st.out.remote_faults += 1;
            self.st.vcpus[v].history.push(FaultRecord {
                page,
                access,
                holder,
                decision,
            });
            let costs = self.costs;
            let cost = match decision {
                Decision::MovePage => {
                    // A fault on a page homed elsewhere asks for the run after it too,
                    // unless an empty claim paused claims (the engine's CLAIM_BACKOFF).
                    let mut granted = false;
                    if self.pages.home(page) != node && s.touch.may_claim {
                        let paused = &mut self.st.claim_backoff[node as usize];
                        if *paused > 0 {
                            *paused -= 1;
                        } else {
                            let (first, taken) = self.pages.claim(node, page, fresh)?;
                            self.st.out.pages_claimed += taken;
                            self.st.out.bytes_sent += SMALL_FRAME;
                            if taken == 0 {
                                self.st.claim_backoff[node as usize] = CLAIM_BACKOFF;
                            }
                            granted = first;
                        }
                    }
                    if granted {
                        // One round trip, no data.
                        costs.upgrade_ns
                    } else {
                        let m = self.pages.bring(node, page, access)?;
                        self.st.out.invalidations += m.invalidations;
                        self.st.out.bytes_sent += m.bytes;
                        self.st.out.page_moves += u64::from(m.data);
                        self.st.out.replicas_made += u64::from(m.replica);
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
                }
                Decision::MoveVcpu => {
                    if holder >= self.shape.nodes {
                        return Err(SimError::Protocol(format!(
                            "a vCPU sent to node {holder} of a {}-node cluster",
                            self.shape.nodes
                        )));
                    }
                    self.st.out.vcpu_moves += 1;
                    self.st.out.bytes_sent += MOVE_FRAME;
                    self.st.load[node as usize] -= 1;
                    self.st.load[holder as usize] += 1;
                    self.st.resident[node as usize] -= 1;
                    self.st.resident[holder as usize] += 1;
                    self.st.vcpus[v].node = holder;
                    // There, the page may still need an upgrade (a write to a replica).
                    let mut c = costs.move_ns;
                    if !self.pages.usable(holder, page, access) {
                        let m = self.pages.bring(holder, page, access)?;
                        self.st.out.invalidations += m.invalidations;
                        self.st.out.bytes_sent += m.bytes;
                        c += costs.upgrade_ns;
                    }
                    c
                }
            };
            self.st.stall_ns += cost;
            t += cost;
        }
        if fresh {
            self.pages.populate_run(self.st.vcpus[v].node, page);
        }
        self.st.vcpus[v].clock_ns = t;
        self.release(v);
        if self.st.pos[v] >= self.streams[v].len() {
            // It ran to its last touch and stops: no longer runnable where it is.
            self.st.load[self.st.vcpus[v].node as usize] -= 1;
            self.st.resident[self.st.vcpus[v].node as usize] -= 1;
        } else {
            self.st.ready.push(Reverse((t, v)));
        }
        Ok(())
    }

    /// Lets the vCPUs waiting for `v`'s touches made so far run, no earlier than now.
    fn release(&mut self, v: usize) {
        if self.st.waiting[v].is_empty() {
            return;
        }
        let done = self.st.pos[v] as u32;
        let t = self.st.vcpus[v].clock_ns;
        let mut i = 0;
        while i < self.st.waiting[v].len() {
            let (index, w) = self.st.waiting[v][i];
            if index < done {
                self.st.waiting[v].swap_remove(i);
                let vw = &mut self.st.vcpus[w];
                vw.clock_ns = vw.clock_ns.max(t);
                self.st.load[vw.node as usize] += 1;
                self.st.ready.push(Reverse((vw.clock_ns, w)));
            } else {
                i += 1;
            }
        }
    }

    fn save(&mut self) -> State {
        self.pages.mark();
        self.st.clone()
    }

    fn restore(&mut self, saved: State) -> Result<(), SimError> {
        self.pages.rewind()?;
        self.st = saved;
        Ok(())
    }

    /// What deciding `f` (of step `s`) as `decision` costs over the next `horizon`
    /// touches of every vCPU, later faults decided by `continuation` (one stateless
    /// policy per node), or each bringing the page without one: the sum of the vCPUs'
    /// clocks once each has made them, in ns. The simulation is left as it was.
    pub(crate) fn look_ahead(
        &mut self,
        s: Step,
        f: Fault,
        decision: Decision,
        horizon: usize,
        mut continuation: Option<&mut [Box<dyn Policy>]>,
    ) -> Result<u64, SimError> {
        let saved = self.save();
        let limit: Vec<usize> = self
            .st
            .pos
            .iter()
            .zip(&self.streams)
            .map(|(&p, st)| (p + horizon).min(st.len()))
            .collect();
        let result = (|| {
            self.serve(s, Some((f, decision)))?;
            while let Some(next) = self.take() {
                if self.st.pos[next.v] > limit[next.v] {
                    // Past its horizon: this vCPU stops here, still runnable.
                    continue;
                }
                let fault = self.fault(&next).map(|f| {
                    let d = match continuation.as_deref_mut() {
                        Some(p) => self.decide(&next, &f, p),
                        None => Decision::MovePage,
                    };
                    (f, d)
                });
                self.serve(next, fault)?;
            }
            Ok(self.clocks())
        })();
        self.restore(saved)?;
        result
    }

    /// Touches in all the streams.
    pub(crate) fn events(&self) -> u64 {
        self.st.out.events
    }

    /// The sum of every vCPU's clock, in ns.
    pub(crate) fn clocks(&self) -> u64 {
        self.st.vcpus.iter().map(|v| v.clock_ns).sum()
    }

    pub(crate) fn finish(self) -> Outcome {
        let mut out = self.st.out;
        let end = self.st.vcpus.iter().map(|v| v.clock_ns).max().unwrap_or(0);
        out.wall_ms = end as f64 / 1e6;
        out.stall_ms = self.st.stall_ns as f64 / 1e6;
        out
    }
}

/// Replays `trace` under `policy(node)` (one policy per node, as in the engine) on
/// `shape`, with `costs`.
pub fn replay(
    trace: &Trace,
    shape: &Shape,
    costs: &Costs,
    policy: impl FnMut(NodeId) -> Box<dyn Policy>,
) -> Result<Outcome, SimError> {
    replay_with(trace, shape, costs, policy, &mut |_, _| {})
}

/// Touches between two calls of a replay's progress callback.
pub const PROGRESS_EVERY: u64 = 1 << 16;

/// [`replay`], calling `progress(touches done, touches in all)` every
/// [`PROGRESS_EVERY`] touches (for a progress bar).
pub fn replay_with(
    trace: &Trace,
    shape: &Shape,
    costs: &Costs,
    policy: impl FnMut(NodeId) -> Box<dyn Policy>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Outcome, SimError> {
    let mut sim = Sim::new(trace, shape, costs)?;
    let mut policies: Vec<Box<dyn Policy>> = (0..shape.nodes).map(policy).collect();
    let mut done = 0u64;
    while let Some(s) = sim.take() {
        let decided = sim.fault(&s).map(|f| {
            let d = sim.decide(&s, &f, &mut policies);
            (f, d)
        });
        sim.serve(s, decided)?;
        done += 1;
        if done.is_multiple_of(PROGRESS_EVERY) {
            progress(done, sim.events());
        }
    }
    Ok(sim.finish())
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
    let shape = Shape::new(1, cpus);
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
