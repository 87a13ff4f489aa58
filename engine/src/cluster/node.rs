//! A node's runtime. Boot builds the same guest RAM image on every node, then keeps
//! only the pages this node starts with (the rest are dropped and become missing). From
//! then on a page of this node's copy is in one of three [`PageState`]s, changed only
//! under the page's lock: `Invalid` (missing: any access traps), `Shared` (a
//! write-protected replica: writes trap) or `Owned` (the one writable copy).
//!
//! Messages arrive on transport threads ([`Node::handle`]); vCPU threads and node 0's
//! futex thread wait for pages in [`Node::acquire`]. Nothing holds a page lock while
//! sending, and the directory lock is never held together with a page lock.

use super::directory::{Outgoing, PageDirectory};
use super::leader::Leader;
use super::sampler::Armed;
use super::uffd::{Userfault, PAGE};
use super::{ClusterSpec, NodeId, RamPlacement};
use crate::boot::BootLayout;
use crate::kvm::VcpuState;
use crate::memory::{GuestMemory, GuestRead, MemoryError};
use crate::Error;
use flotilla_abi::IMAGE_MIN_ADDR;
use flotilla_placement::Policy;
use flotilla_telemetry::health::HealthReader;
use flotilla_telemetry::metrics::{Direction, NodeMetrics, Snapshot};
use flotilla_telemetry::record::Recorder;
use flotilla_telemetry::trace::{Event, EventKind, NONE16};
use flotilla_transport::{
    wire::MAX_SAMPLES, Access, Handler, Message, NodeStats, Samples, Transport, TransportError,
};
use std::collections::HashMap;
use std::sync::atomic::{
    AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

const STRIPES: usize = 1024;
const STATE_MASK: u8 = 3;
const POPULATED: u8 = 4;
const ZERO_PAGE: [u8; PAGE as usize] = [0; PAGE as usize];
/// How often waiting threads look at the stop flag.
pub(super) const POLL: Duration = Duration::from_millis(100);

/// This node's copy of one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    Invalid = 0,
    Shared = 1,
    Owned = 2,
}

impl PageState {
    fn from_bits(b: u8) -> Self {
        match b & STATE_MASK {
            1 => PageState::Shared,
            2 => PageState::Owned,
            _ => PageState::Invalid,
        }
    }

    pub fn allows(self, want: Access) -> bool {
        matches!(
            (self, want),
            (PageState::Owned, _) | (PageState::Shared, Access::Read | Access::Execute)
        )
    }
}

/// What a vCPU that is not running here is waiting for.
pub(super) struct Arrival {
    pub from: NodeId,
    pub page: u64,
    pub fault_ns: u64,
    pub clock_ns: u64,
    pub state: Vec<u8>,
}

#[derive(Default)]
pub(super) struct Inbox {
    woken: bool,
    arrival: Option<Arrival>,
    futex: Option<i32>,
}

/// Where one thread waits: for a page, a futex result, or (vCPUs) its own arrival.
#[derive(Default)]
pub(super) struct Slot {
    inbox: Mutex<Inbox>,
    cond: Condvar,
    /// Set on every delivery: a waiter polls it briefly before sleeping, because a
    /// futex sleep and wake-up cost more than most answers take to arrive.
    ready: AtomicBool,
}

/// How long a waiter polls before sleeping.
const SLOT_SPIN: Duration = Duration::from_micros(50);

impl Slot {
    fn lock(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Inbox)) {
        f(&mut self.lock());
        self.ready.store(true, Ordering::Release);
        self.cond.notify_all();
    }

    pub fn wake(&self) {
        self.update(|i| i.woken = true);
    }

    /// Makes a waiter look at the stop flag now. Unlike [`Slot::wake`] this delivers
    /// nothing: a thread waiting for a page must not take the end of the run for the
    /// page's arrival (it would then tell the home it is done with a transaction that
    /// never completed).
    pub fn interrupt(&self) {
        self.update(|_| {});
    }

    /// Waits until `take` returns something, or the run stops (`None`).
    pub fn wait<T>(
        &self,
        stop: &AtomicBool,
        mut take: impl FnMut(&mut Inbox) -> Option<T>,
    ) -> Option<T> {
        let spin_until = Instant::now() + SLOT_SPIN;
        while !self.ready.swap(false, Ordering::Acquire) && Instant::now() < spin_until {
            std::thread::yield_now();
        }
        let mut inbox = self.lock();
        loop {
            if let Some(v) = take(&mut inbox) {
                return Some(v);
            }
            if stop.load(Ordering::SeqCst) {
                return None;
            }
            inbox = self
                .cond
                .wait_timeout(inbox, POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub fn wait_woken(&self, stop: &AtomicBool) -> Option<()> {
        self.wait(stop, |i| std::mem::take(&mut i.woken).then_some(()))
    }

    pub fn wait_futex(&self, stop: &AtomicBool) -> Option<i32> {
        self.wait(stop, |i| i.futex.take())
    }

    pub fn wait_arrival(&self, stop: &AtomicBool) -> Option<Arrival> {
        self.wait(stop, |i| i.arrival.take())
    }
}

#[derive(Default)]
struct Waiting {
    in_flight: Option<Access>,
    slots: Vec<Arc<Slot>>,
}

/// Where pages start: every node computes the same answer.
#[derive(Debug, Clone)]
pub(super) struct Placement {
    nodes: u16,
    ram: RamPlacement,
    first: u64,
    count: u64,
    stacks: std::ops::Range<u64>,
    stack_pages: u64,
    vcpu_nodes: Vec<NodeId>,
    pub image: std::ops::Range<u64>,
}

impl Placement {
    pub fn home(&self, page: u64) -> NodeId {
        if let Some(v) = self.stack_of(page) {
            return self.vcpu_nodes[v as usize];
        }
        let i = page - self.first;
        match self.ram {
            RamPlacement::Contiguous => (i * self.nodes as u64 / self.count) as NodeId,
            RamPlacement::Interleave => (page % self.nodes as u64) as NodeId,
        }
    }

    /// The vCPU whose stack `page` is part of, if any.
    pub fn stack_of(&self, page: u64) -> Option<u32> {
        self.stacks
            .contains(&page)
            .then(|| ((page - self.stacks.start) / self.stack_pages) as u32)
    }
}

/// What the metrics do not already count (faults, moves and invalidations are read
/// back from [`NodeMetrics`]).
#[derive(Default)]
pub(super) struct Counters {
    pub replicas_made: AtomicU64,
    pub exits: AtomicU64,
}

/// Latency samples, at most [`MAX_SAMPLES`] of each kind (then a reservoir).
#[derive(Default)]
pub(super) struct SampleSet {
    pub samples: Samples,
    seen: [u64; 6],
}

#[derive(Clone, Copy)]
pub(super) enum Sample {
    FaultService = 0,
    VcpuMove = 1,
    Install = 2,
    Capture = 3,
    Restore = 4,
    Rtt = 5,
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

/// The main thread's view of the run.
#[derive(Default)]
struct Control {
    stop_received: bool,
    bye: bool,
    failure: Option<String>,
}

/// Pausing a node alone: its vCPUs park at their next exit with their state captured.
pub(super) struct PauseGate {
    requested: AtomicBool,
    parked: Mutex<Vec<Option<VcpuState>>>,
    changed: Condvar,
}

impl PauseGate {
    fn new(vcpus: u32) -> Self {
        PauseGate {
            requested: AtomicBool::new(false),
            parked: Mutex::new(vec![None; vcpus as usize]),
            changed: Condvar::new(),
        }
    }

    fn parked(&self) -> MutexGuard<'_, Vec<Option<VcpuState>>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    pub fn request(&self, on: bool) {
        let _g = self.parked();
        self.requested.store(on, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Parks vCPU `id` with its captured `state` until the pause ends or the run stops.
    pub fn park(&self, id: u32, state: VcpuState, stop: &AtomicBool) {
        let mut parked = self.parked();
        parked[id as usize] = Some(state);
        self.changed.notify_all();
        while self.requested() && !stop.load(Ordering::SeqCst) {
            parked = self
                .changed
                .wait_timeout(parked, POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        parked[id as usize] = None;
    }

    /// Every vCPU's state once each one that has not `returned` is parked; waits at most
    /// `limit` for that.
    pub fn wait_parked(
        &self,
        returned: &[Option<i32>],
        limit: Duration,
    ) -> Option<Vec<Option<VcpuState>>> {
        let all = |p: &[Option<VcpuState>]| {
            p.iter()
                .zip(returned)
                .all(|(s, r)| s.is_some() || r.is_some())
        };
        let mut parked = self.parked();
        if !all(&parked) {
            parked = self
                .changed
                .wait_timeout(parked, limit)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        all(&parked).then(|| {
            parked
                .iter()
                .zip(returned)
                .map(|(s, r)| if r.is_some() { None } else { s.clone() })
                .collect()
        })
    }
}

/// What this node can do with a page for one access, found under the page's lock.
pub(super) enum Local<'a> {
    /// Usable here; the lock stays held. `mapped`: it was held but not mapped and has
    /// just been (`Some(Some(t))`: the sampler had armed it at `t`).
    Ready {
        guard: MutexGuard<'a, ()>,
        mapped: Option<Option<u64>>,
    },
    /// Not held well enough for the access: a remote fault. How it is held.
    Missing(PageState),
}

/// A page held for use: its lock, and the home to tell once done.
pub(super) struct Held<'a> {
    _guard: MutexGuard<'a, ()>,
    done_to: Option<NodeId>,
}

/// One node of the cluster.
pub(super) struct Node {
    pub me: NodeId,
    pub nodes: u16,
    pub vcpus: u32,
    pub memory: Arc<GuestMemory>,
    /// `None` for a node that runs alone without the access sampler: it holds every
    /// page, so nothing ever has to trap, and first touches stay the kernel's.
    uffd: Option<Userfault>,
    /// First page under coherence (everything below is the engine's, private per node).
    pub first_page: u64,
    states: Vec<AtomicU8>,
    locks: Vec<Mutex<()>>,
    hints: Vec<AtomicU16>,
    /// Copies of the page the home counted when this node last got it (`u8::MAX`: not
    /// known yet).
    copies: Vec<AtomicU8>,
    heat: Vec<AtomicU8>,
    pub placement: Placement,
    directory: Mutex<PageDirectory>,
    waiting: Mutex<HashMap<u64, Waiting>>,
    transport: OnceLock<Arc<dyn Transport>>,
    pub slots: Vec<Arc<Slot>>,
    echo: Arc<Slot>,
    pub policy: Mutex<Box<dyn Policy>>,
    pub stop: AtomicBool,
    pub pause: PauseGate,
    pub resident: AtomicU32,
    pub threads: Mutex<Vec<Option<libc::pthread_t>>>,
    pub counters: Counters,
    pub samples: Mutex<SampleSet>,
    pub metrics: NodeMetrics,
    recorder: Option<Recorder>,
    health: HealthReader,
    /// Pages the access sampler took away, with their contents (see `sampler`).
    pub(super) armed: Mutex<HashMap<u64, Armed>>,
    pub(super) armed_count: AtomicUsize,
    epoch: Instant,
    epoch_offset_ns: u64,
    clock_floor_ns: AtomicU64,
    pub leader: Option<Leader>,
    control: Mutex<Control>,
    control_changed: Condvar,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock a local cluster's guest epoch is read from.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Node {
    fn index(&self, page: u64) -> usize {
        (page - self.first_page) as usize
    }

    pub fn pages(&self) -> u64 {
        self.memory.size() / PAGE
    }

    pub fn lock(&self, page: u64) -> MutexGuard<'_, ()> {
        self.locks[page as usize % STRIPES]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The page's state and whether it is physically installed. Call under its lock.
    pub fn state(&self, page: u64) -> (PageState, bool) {
        let b = self.states[self.index(page)].load(Ordering::Acquire);
        (PageState::from_bits(b), b & POPULATED != 0)
    }

    pub(super) fn set_state(&self, page: u64, state: PageState, populated: bool) {
        let b = state as u8 | if populated { POPULATED } else { 0 };
        self.states[self.index(page)].store(b, Ordering::Release);
    }

    /// The node that probably holds the page's current copy.
    pub fn hint(&self, page: u64) -> NodeId {
        self.hints[self.index(page)].load(Ordering::Relaxed)
    }

    fn set_hint(&self, page: u64, node: NodeId) {
        self.hints[self.index(page)].store(node, Ordering::Relaxed);
    }

    pub fn heat(&self, page: u64) -> u32 {
        self.heat[page as usize % self.heat.len()].load(Ordering::Relaxed) as u32
    }

    fn bump_heat(&self, page: u64) {
        let h = &self.heat[page as usize % self.heat.len()];
        let v = h.load(Ordering::Relaxed);
        h.store(if v >= 32 { v / 2 } else { v + 1 }, Ordering::Relaxed);
    }

    /// The fault trap; only a node that runs alone (and does not sample) has none, and
    /// such a node never moves, drops or protects a page.
    pub fn uffd(&self) -> Result<&Userfault, Error> {
        self.uffd
            .as_ref()
            .ok_or_else(|| Error::Config("this node runs alone, without userfaultfd".into()))
    }

    /// Locks `page` and looks at what this node has of it for `want`; a page held but not
    /// mapped (never touched, or armed by the sampler) is mapped on the way.
    pub fn local(&self, page: u64, want: Access) -> Result<Local<'_>, Error> {
        let guard = self.lock(page);
        let (state, populated) = self.state(page);
        if !state.allows(want) {
            return Ok(Local::Missing(state));
        }
        let mapped = if populated {
            None
        } else {
            Some(self.populate(page, state)?)
        };
        Ok(Local::Ready { guard, mapped })
    }

    /// Installs a page this node holds but has not mapped: the contents the access
    /// sampler took away, or zeros for a page never touched. Under its lock. Returns when
    /// the sampler armed the page, if it did (the access is a sample).
    pub fn populate(&self, page: u64, state: PageState) -> Result<Option<u64>, Error> {
        let armed = self.take_armed(page);
        let data = armed.as_ref().map_or(&ZERO_PAGE, |a| &*a.data);
        self.uffd()?
            .install(page * PAGE, data, state == PageState::Shared)?;
        self.set_state(page, state, true);
        Ok(armed.map(|a| a.at_ns))
    }

    /// Removes the sampler's copy of a page. Under its lock.
    fn take_armed(&self, page: u64) -> Option<Armed> {
        if self.armed_count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let a = self
            .armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&page)?;
        self.armed_count.fetch_sub(1, Ordering::AcqRel);
        Some(a)
    }

    /// Copies the sampler's copy of a page into `out`, if it has one. Under its lock.
    fn copy_armed(&self, page: u64, out: &mut [u8; PAGE as usize]) -> bool {
        if self.armed_count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
        match armed.get(&page) {
            Some(a) => {
                out.copy_from_slice(&a.data[..]);
                true
            }
            None => false,
        }
    }

    /// Whether this node records a trace.
    pub fn tracing(&self) -> bool {
        self.recorder.is_some()
    }

    /// A trace event of this node, now.
    pub fn event(&self, kind: EventKind, vcpu: u32, page: u64) -> Event {
        Event {
            t_ns: self.clock_ns(),
            page,
            vcpu: vcpu.min(NONE16 as u32) as u16,
            node: self.me,
            peer: NONE16,
            replicas: NONE16,
            kind: kind as u8,
            ..Default::default()
        }
    }

    pub fn record(&self, e: Event) {
        if let Some(r) = &self.recorder {
            r.record(e);
            self.metrics.trace_event();
        }
    }

    /// Records a page event (no vCPU) if this node traces.
    fn trace_page(&self, kind: EventKind, page: u64, peer: NodeId, want: Access, replicas: u16) {
        if self.tracing() {
            let mut e = self.event(kind, u32::MAX, page);
            e.peer = peer;
            e.access = want.code();
            e.replicas = replicas;
            self.record(e);
        }
    }

    /// Copies of the page the home counted when this node last got it, if known.
    pub fn copies(&self, page: u64) -> u16 {
        match self.copies[self.index(page)].load(Ordering::Relaxed) {
            u8::MAX => NONE16,
            c => c as u16,
        }
    }

    fn set_copies(&self, page: u64, copies: u8) {
        self.copies[self.index(page)].store(copies, Ordering::Relaxed);
    }

    pub fn home(&self, page: u64) -> NodeId {
        self.placement.home(page)
    }

    /// The guest clock: shared epoch, never behind a clock a vCPU brought along.
    pub fn clock_ns(&self) -> u64 {
        let now = self.epoch_offset_ns + self.epoch.elapsed().as_nanos() as u64;
        now.max(self.clock_floor_ns.load(Ordering::Relaxed))
    }

    pub fn raise_clock(&self, ns: u64) {
        self.clock_floor_ns.fetch_max(ns, Ordering::Relaxed);
    }

    pub fn sample(&self, kind: Sample, d: Duration) {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(kind, d);
    }

    pub fn set_transport(&self, t: Arc<dyn Transport>) -> Result<(), Error> {
        self.transport
            .set(t)
            .map_err(|_| Error::Config("transport set twice".into()))
    }

    /// Sends to `to` without treating a failure as the link's loss (the end of a run).
    pub fn send_quietly(&self, to: NodeId, msg: &Message) {
        if let Some(t) = self.transport.get() {
            let _ = t.send(to, msg);
        }
    }

    pub fn close_transport(&self) {
        if let Some(t) = self.transport.get() {
            t.close();
        }
    }

    fn transport(&self) -> &Arc<dyn Transport> {
        // Frames can arrive before `establish` has returned on this node; they wait here
        // the few microseconds until it has.
        self.transport.wait()
    }

    /// Sends `msg` to `to`, or handles it here if `to` is this node.
    pub fn send(&self, to: NodeId, msg: Message) {
        if to == self.me {
            self.handle(self.me, msg);
            return;
        }
        if let Err(e) = self.transport().send(to, &msg) {
            self.link_failed(to, e);
        }
    }

    fn route(&self, out: Vec<Outgoing>) {
        for (to, msg) in out {
            self.send(to, msg);
        }
    }

    /// Sends to node 0, which keeps the run's outcome.
    pub fn to_leader(&self, msg: Message) {
        self.send(0, msg);
    }

    /// Waits until this node may use `page` for `want`, fetching it if needed. Returns
    /// with the page's lock held; [`Node::release`] ends the use.
    pub fn acquire(&self, page: u64, want: Access, slot: &Arc<Slot>) -> Result<Held<'_>, Error> {
        let mut done_to = None;
        loop {
            match self.local(page, want)? {
                Local::Ready { guard, .. } => {
                    return Ok(Held {
                        _guard: guard,
                        done_to,
                    })
                }
                Local::Missing(state) => {
                    if let Some(home) = done_to {
                        self.send(home, Message::Done { page });
                        return Err(Error::Page {
                            page,
                            what: format!("arrived as {state:?}, not usable for {want:?}"),
                        });
                    }
                }
            }
            let home = self.home(page);
            let issue = {
                let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
                let entry = w.entry(page).or_default();
                let issue = entry.in_flight.is_none();
                if issue {
                    entry.in_flight = Some(want);
                }
                entry.slots.push(Arc::clone(slot));
                issue
            };
            if issue {
                self.send(
                    home,
                    Message::PageRequest {
                        page,
                        want,
                        requester: self.me,
                    },
                );
            }
            let since = Instant::now();
            let mut warned = false;
            let woken = slot.wait(&self.stop, |i| {
                if !warned && since.elapsed() > Duration::from_secs(2) {
                    warned = true;
                    tracing::warn!(
                        node = self.me,
                        page = format_args!("{page:#x}"),
                        ?want,
                        home,
                        issued = issue,
                        "still waiting for a page after 2 s"
                    );
                }
                std::mem::take(&mut i.woken).then_some(())
            });
            if woken.is_none() {
                return Err(Error::Stopped);
            }
            if issue {
                done_to = Some(home);
            }
        }
    }

    /// Ends the use of a page from [`Node::acquire`].
    pub fn release(&self, held: Held<'_>, page: u64) {
        let done_to = held.done_to;
        drop(held);
        if let Some(home) = done_to {
            self.send(home, Message::Done { page });
        }
    }

    fn wake_waiters(&self, page: u64) -> Option<Access> {
        let entry = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&page)?;
        for slot in &entry.slots {
            slot.wake();
        }
        entry.in_flight
    }

    fn page_msg_check(&self, page: u64, from: NodeId, what: &str) -> Result<(), Error> {
        if page < self.first_page || page >= self.pages() {
            return Err(Error::Protocol {
                from,
                what: format!("{what} for page {page:#x}, outside coherent guest RAM"),
            });
        }
        Ok(())
    }

    /// Home → this node (the owner): send the page to `requester`.
    fn serve_fetch(
        &self,
        page: u64,
        want: Access,
        requester: NodeId,
        copies: u8,
    ) -> Result<(), Error> {
        let mut data = Box::new([0u8; PAGE as usize]);
        {
            let _g = self.lock(page);
            let (state, populated) = self.state(page);
            if state == PageState::Invalid {
                return Err(Error::Page {
                    page,
                    what: "asked to send it, but this node does not hold it".into(),
                });
            }
            let gpa = page * PAGE;
            if populated {
                if state == PageState::Owned {
                    // Stop local writers before copying.
                    self.uffd()?.protect(gpa, PAGE, true)?;
                }
                self.memory.read(gpa, &mut data[..])?;
            } else {
                // Not mapped: the sampler's copy, or a page never touched (zeros).
                self.copy_armed(page, &mut data);
            }
            match want {
                Access::Read | Access::Execute => {
                    self.set_state(page, PageState::Shared, populated)
                }
                Access::Write => {
                    if populated {
                        self.uffd()?.drop_pages(gpa, PAGE)?;
                    }
                    self.take_armed(page);
                    self.set_state(page, PageState::Invalid, false);
                    self.set_hint(page, requester);
                    self.bump_heat(page);
                }
            }
        }
        self.metrics.page_move(Direction::Out);
        self.trace_page(EventKind::PageOut, page, requester, want, copies as u16);
        self.send(
            requester,
            Message::PageData {
                page,
                want,
                data,
                copies,
            },
        );
        Ok(())
    }

    fn install(
        &self,
        page: u64,
        want: Access,
        data: &[u8; PAGE as usize],
        copies: u8,
        from: NodeId,
    ) -> Result<(), Error> {
        let me = self.me;
        {
            let _g = self.lock(page);
            let (state, populated) = self.state(page);
            if state != PageState::Invalid || populated {
                return Err(Error::Page {
                    page,
                    what: format!("arrived from node {from} while this node holds it ({state:?})"),
                });
            }
            let read_only = want == Access::Read;
            self.uffd()?.install(page * PAGE, data, read_only)?;
            let state = if read_only {
                PageState::Shared
            } else {
                PageState::Owned
            };
            self.set_state(page, state, true);
            if !read_only {
                self.set_hint(page, me);
            }
            self.set_copies(page, copies);
            self.bump_heat(page);
        }
        self.metrics.page_move(Direction::In);
        self.trace_page(EventKind::PageIn, page, from, want, copies as u16);
        if want == Access::Read {
            self.counters.replicas_made.fetch_add(1, Ordering::Relaxed);
        }
        if self.wake_waiters(page).is_none() {
            return Err(Error::Protocol {
                from,
                what: format!("page {page:#x}, which this node did not request"),
            });
        }
        Ok(())
    }

    fn grant(&self, page: u64, copies: u8, from: NodeId) -> Result<(), Error> {
        let me = self.me;
        let want = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&page)
            .and_then(|w| w.in_flight)
            .ok_or_else(|| Error::Protocol {
                from,
                what: format!("a grant of page {page:#x}, which this node did not request"),
            })?;
        {
            let _g = self.lock(page);
            let (state, populated) = self.state(page);
            if state == PageState::Invalid {
                return Err(Error::Page {
                    page,
                    what: format!("granted by node {from}, but this node does not hold it"),
                });
            }
            if want == Access::Write {
                if state == PageState::Shared && populated {
                    self.uffd()?.protect(page * PAGE, PAGE, false)?;
                }
                self.set_state(page, PageState::Owned, populated);
                self.set_hint(page, me);
            }
            self.set_copies(page, copies);
        }
        self.wake_waiters(page);
        Ok(())
    }

    fn invalidate(&self, page: u64, owner: NodeId, from: NodeId) -> Result<(), Error> {
        {
            let _g = self.lock(page);
            let (_, populated) = self.state(page);
            if populated {
                self.uffd()?.drop_pages(page * PAGE, PAGE)?;
            }
            self.set_state(page, PageState::Invalid, false);
            self.take_armed(page);
            self.set_hint(page, owner);
            self.bump_heat(page);
        }
        self.metrics.invalidation();
        self.trace_page(EventKind::Invalidate, page, owner, Access::Read, NONE16);
        self.send(from, Message::InvalidateAck { page });
        Ok(())
    }

    fn directory(&self) -> MutexGuard<'_, PageDirectory> {
        self.directory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handles one message from `from` (possibly this node).
    pub fn handle(&self, from: NodeId, msg: Message) {
        if let Err(e) = self.try_handle(from, msg) {
            self.fail(e);
        }
    }

    fn try_handle(&self, from: NodeId, msg: Message) -> Result<(), Error> {
        let name = msg.name();
        let protocol = |what: String| Error::Protocol { from, what };
        let leader_only = || protocol(format!("{name} to node {}, not node 0", self.me));
        match msg {
            Message::PageRequest {
                page,
                want,
                requester,
            } => {
                self.page_msg_check(page, from, name)?;
                if requester != from {
                    return Err(protocol(format!("a request on behalf of node {requester}")));
                }
                let out = self.directory().request(page, from, want);
                self.route(out.map_err(|e| protocol(e.to_string()))?);
            }
            Message::Fetch {
                page,
                want,
                requester,
                copies,
            } => {
                self.page_msg_check(page, from, name)?;
                if requester >= self.nodes {
                    return Err(protocol(format!("Fetch for unknown node {requester}")));
                }
                self.serve_fetch(page, want, requester, copies)?;
            }
            Message::Invalidate { page, owner } => {
                self.page_msg_check(page, from, name)?;
                self.invalidate(page, owner.min(self.nodes - 1), from)?;
            }
            Message::InvalidateAck { page } => {
                self.page_msg_check(page, from, name)?;
                let out = self.directory().invalidate_ack(page, from);
                self.route(out.map_err(|e| protocol(e.to_string()))?);
            }
            Message::PageData {
                page,
                want,
                data,
                copies,
            } => {
                self.page_msg_check(page, from, name)?;
                self.install(page, want, &data, copies, from)?;
            }
            Message::Grant { page, copies } => {
                self.page_msg_check(page, from, name)?;
                self.grant(page, copies, from)?;
            }
            Message::Done { page } => {
                self.page_msg_check(page, from, name)?;
                let out = self.directory().done(page, from);
                self.route(out.map_err(|e| protocol(e.to_string()))?);
            }
            Message::VcpuMove {
                vcpu,
                page,
                fault_ns,
                clock_ns,
                state,
            } => {
                let slot = self
                    .slots
                    .get(vcpu as usize)
                    .ok_or_else(|| protocol(format!("unknown vCPU {vcpu}")))?;
                slot.update(|i| {
                    i.arrival = Some(Arrival {
                        from,
                        page,
                        fault_ns,
                        clock_ns,
                        state,
                    })
                });
            }
            Message::FutexResult { vcpu, result } => {
                let slot = self
                    .slots
                    .get(vcpu as usize)
                    .ok_or_else(|| protocol(format!("a futex result for unknown vCPU {vcpu}")))?;
                slot.update(|i| i.futex = Some(result));
            }
            Message::Echo { reply: false, data } => {
                self.send(from, Message::Echo { reply: true, data });
            }
            Message::Echo { reply: true, .. } => self.echo.wake(),
            Message::Stop => {
                self.stop_vcpus();
                self.control(|c| c.stop_received = true);
            }
            Message::Bye => self.control(|c| c.bye = true),
            Message::Ping => {}
            msg @ (Message::FutexWait { .. }
            | Message::FutexWake { .. }
            | Message::Console { .. }
            | Message::Report { .. }
            | Message::VcpuReturned { .. }
            | Message::Exit { .. }
            | Message::Fatal { .. }
            | Message::Stats { .. }) => {
                let leader = self.leader.as_ref().ok_or_else(leader_only)?;
                leader.handle(from, msg)?;
            }
        }
        Ok(())
    }

    fn control(&self, f: impl FnOnce(&mut Control)) {
        f(&mut self.control.lock().unwrap_or_else(|p| p.into_inner()));
        self.control_changed.notify_all();
    }

    /// Ends the run with an error: node 0 records it, other nodes report it to node 0.
    /// On a cluster the error is marked with this node; a node alone keeps it as it is.
    pub fn fail(&self, error: Error) {
        // Not logged as an error: it reaches the user once, in node 0's result (or, for
        // a node that lost node 0, in its own exit). Failures after the stop are only
        // its echoes.
        tracing::debug!(node = self.me, %error, stopping = self.stop.load(Ordering::SeqCst), "run fails");
        let error = match error {
            e @ Error::Remote(_) => e,
            e if self.nodes > 1 => Error::OnNode {
                node: self.me,
                source: Box::new(e),
            },
            e => e,
        };
        match &self.leader {
            Some(leader) => leader.finish(Err(error)),
            None => {
                let text = error.to_string();
                self.control(|c| {
                    c.failure.get_or_insert(text.clone());
                });
                if let Some(t) = self.transport.get() {
                    let _ = t.send(0, &Message::Fatal { text });
                }
            }
        }
    }

    fn link_failed(&self, peer: NodeId, why: TransportError) {
        if let Some(leader) = &self.leader {
            leader.lost(peer);
        }
        let ending = {
            let c = self.control.lock().unwrap_or_else(|p| p.into_inner());
            c.stop_received || c.bye
        } || self.leader.as_ref().is_some_and(|l| l.ended());
        if ending {
            return;
        }
        self.fail(Error::LinkLost { peer, source: why });
    }

    /// Stops every vCPU of this node: kicks them out of the guest and out of waits.
    pub fn stop_vcpus(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick_vcpus();
        for s in &self.slots {
            s.interrupt();
        }
        self.pause.request(false);
    }

    /// Kicks every vCPU thread of this node out of the guest (to look at its flags).
    pub fn kick_vcpus(&self) {
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        for t in threads.iter().flatten() {
            crate::kvm::kick::kick(*t);
        }
    }

    /// A node other than node 0: waits until node 0 stops it, says goodbye, or this
    /// node's part fails; returns the failure.
    pub fn wait_stop_or_failure(&self) -> Option<String> {
        let mut c = self.control.lock().unwrap_or_else(|p| p.into_inner());
        while !c.stop_received && !c.bye && c.failure.is_none() {
            c = self
                .control_changed
                .wait(c)
                .unwrap_or_else(|p| p.into_inner());
        }
        c.failure.clone()
    }

    /// Waits at most `limit` for node 0's goodbye (not after a failure of this node's
    /// own, which node 0 may never answer).
    pub fn wait_bye(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut c = self.control.lock().unwrap_or_else(|p| p.into_inner());
        while !c.bye && Instant::now() < deadline {
            if c.failure.is_some() && !c.stop_received {
                break;
            }
            c = self
                .control_changed
                .wait_timeout(c, POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub fn stop_received(&self) -> bool {
        self.control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop_received
    }

    /// Writes the rest of the trace; returns the events written, if this node traces.
    pub fn finish_trace(&self) -> Result<Option<u64>, Error> {
        match &self.recorder {
            Some(r) => r
                .finish()
                .map(Some)
                .map_err(|e| Error::Config(format!("trace: {e}"))),
            None => Ok(None),
        }
    }

    pub fn stats(&self) -> NodeStats {
        let (c, m) = (&self.counters, &self.metrics);
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NodeStats {
            remote_faults: m.remote_faults(),
            page_moves: m.page_moves(Direction::In),
            replicas_made: l(&c.replicas_made),
            invalidations: m.invalidations(),
            vcpu_moves: m.vcpu_moves(Direction::Out),
            bytes_sent: self.transport.get().map_or(0, |t| t.bytes_sent()),
            exits: l(&c.exits),
        }
    }

    /// Updates the metrics kept elsewhere and renders them (one scrape).
    pub fn scrape(&self) -> String {
        let pages_resident = self
            .states
            .iter()
            .filter(|s| PageState::from_bits(s.load(Ordering::Relaxed)) != PageState::Invalid)
            .count() as u64;
        let (bytes_sent, bytes_received) = self
            .transport
            .get()
            .map_or((0, 0), |t| (t.bytes_sent(), t.bytes_received()));
        self.metrics.refresh(&Snapshot {
            bytes_sent,
            bytes_received,
            pages_resident,
            vcpus_resident: self.resident.load(Ordering::Relaxed) as u64,
            health: self.health.read(),
        });
        self.metrics.encode()
    }

    pub fn take_samples(&self) -> Samples {
        std::mem::take(
            &mut self
                .samples
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .samples,
        )
    }

    /// Measures `rounds` bare 4 KiB round trips to node 0.
    pub fn echo_rounds(&self, rounds: u32) -> Result<(), Error> {
        for i in 0..rounds {
            let t = Instant::now();
            let data = Box::new([i as u8; PAGE as usize]);
            self.send(0, Message::Echo { reply: false, data });
            if self.echo.wait_woken(&self.stop).is_none() {
                return Err(Error::Stopped);
            }
            self.sample(Sample::Rtt, t.elapsed());
        }
        Ok(())
    }
}

impl Handler for Node {
    fn deliver(&self, from: NodeId, msg: Message) {
        self.handle(from, msg);
    }

    fn link_lost(&self, peer: NodeId, why: TransportError) {
        self.link_failed(peer, why);
    }
}

/// Guest RAM as a vCPU thread (or the futex thread) sees it: pages come here first.
pub(super) struct CoherentView<'a> {
    pub node: &'a Node,
    pub slot: &'a Arc<Slot>,
}

impl CoherentView<'_> {
    fn each_page(
        &self,
        addr: u64,
        len: usize,
        want: Access,
        mut f: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), MemoryError>,
    ) -> Result<(), MemoryError> {
        self.check(addr, len as u64)?;
        let mut done = 0usize;
        while done < len {
            let at = addr + done as u64;
            let page = at / PAGE;
            let n = ((PAGE - at % PAGE) as usize).min(len - done);
            if page < self.node.first_page {
                if want == Access::Write {
                    return Err(MemoryError::OutOfRange {
                        addr: at,
                        len: n as u64,
                        size: self.node.memory.size(),
                    });
                }
                f(at, done..done + n)?;
            } else {
                let held = self.node.acquire(page, want, self.slot).map_err(|e| {
                    MemoryError::Unavailable {
                        page,
                        reason: e.to_string(),
                    }
                })?;
                let r = f(at, done..done + n);
                self.node.release(held, page);
                r?;
            }
            done += n;
        }
        Ok(())
    }

    pub fn write_bytes(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        let mem = &self.node.memory;
        self.each_page(addr, data.len(), Access::Write, |at, r| {
            mem.write(at, &data[r])
        })
    }
}

impl GuestRead for CoherentView<'_> {
    fn ram_bytes(&self) -> u64 {
        self.node.memory.size()
    }

    fn read_bytes(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let mem = &self.node.memory;
        let len = buf.len();
        self.each_page(addr, len, Access::Read, |at, r| mem.read(at, &mut buf[r]))
    }
}

/// What a node is built from (the rest of its setup is in `run`).
pub(super) struct Parts {
    pub me: NodeId,
    pub spec: ClusterSpec,
    pub layout: BootLayout,
    pub memory: Arc<GuestMemory>,
    /// Alone and not sampling: every page owned and mapped by the kernel, no trap.
    pub alone: bool,
    pub policy: Box<dyn Policy>,
    pub recorder: Option<Recorder>,
    pub health: HealthReader,
    /// The guest clock at this node's start.
    pub clock_base_ns: u64,
    pub leader: Option<Leader>,
}

impl Node {
    /// Builds this node's page table over guest RAM (already loaded): the pages it starts
    /// with, the home directory of the pages it is home to, and the fault trap. Pages it
    /// does not start with are dropped from its copy.
    pub(super) fn new(parts: Parts) -> Result<Arc<Node>, Error> {
        let Parts {
            me,
            spec,
            layout,
            memory,
            alone,
            policy,
            recorder,
            health,
            clock_base_ns,
            leader,
        } = parts;
        let first_page = IMAGE_MIN_ADDR / PAGE;
        let pages = spec.mem_bytes / PAGE;
        let placement = Placement {
            nodes: spec.nodes,
            ram: spec.ram,
            first: first_page,
            count: pages - first_page,
            stacks: layout.stacks_start / PAGE
                ..(layout.stacks_start / PAGE) + spec.vcpus as u64 * (layout.stack_bytes / PAGE),
            stack_pages: layout.stack_bytes / PAGE,
            vcpu_nodes: spec.vcpu_nodes.clone(),
            image: layout.image_start / PAGE..layout.image_end.div_ceil(PAGE),
        };
        let all_nodes = if spec.nodes == 64 {
            u64::MAX
        } else {
            (1u64 << spec.nodes) - 1
        };
        let uffd = if alone {
            None
        } else {
            Some(Userfault::register(
                &memory,
                IMAGE_MIN_ADDR,
                spec.mem_bytes,
            )?)
        };
        let count = (pages - first_page) as usize;
        let resident = match &uffd {
            Some(u) => u.resident(IMAGE_MIN_ADDR, spec.mem_bytes - IMAGE_MIN_ADDR)?,
            None => vec![true; count],
        };
        let mut states = Vec::with_capacity(count);
        let mut hints = Vec::with_capacity(count);
        let mut run_start: Option<u64> = None;
        for (i, &was_resident) in resident.iter().enumerate().take(count) {
            let page = first_page + i as u64;
            let home = placement.home(page);
            let replicated = placement.image.contains(&page) && !alone;
            let state = if replicated {
                PageState::Shared
            } else if home == me {
                PageState::Owned
            } else {
                PageState::Invalid
            };
            let populated = was_resident && state != PageState::Invalid;
            states.push(AtomicU8::new(
                state as u8 | if populated { POPULATED } else { 0 },
            ));
            hints.push(AtomicU16::new(home));
            // Drop runs of pages this node does not start with (never alone: it has them all).
            if let Some(uffd) = &uffd {
                match (state == PageState::Invalid, run_start) {
                    (true, None) => run_start = Some(page),
                    (false, Some(s)) => {
                        uffd.drop_pages(s * PAGE, (page - s) * PAGE)?;
                        run_start = None;
                    }
                    _ => {}
                }
            }
        }
        if let (Some(uffd), Some(s)) = (&uffd, run_start) {
            uffd.drop_pages(s * PAGE, (pages - s) * PAGE)?;
        }
        // The image is a read-only replica everywhere; writes upgrade through its home.
        if let (Some(uffd), false) = (&uffd, placement.image.is_empty()) {
            let start = placement.image.start.max(first_page);
            for page in start..placement.image.end {
                if resident[(page - first_page) as usize] {
                    uffd.protect(page * PAGE, PAGE, true)?;
                }
            }
        }
        let directory = PageDirectory::new(me, spec.nodes, first_page, count as u64, |page| {
            let home = placement.home(page);
            (home == me).then(|| {
                if placement.image.contains(&page) {
                    (home, all_nodes)
                } else {
                    (home, 1u64 << home)
                }
            })
        });
        Ok(Arc::new(Node {
            me,
            nodes: spec.nodes,
            vcpus: spec.vcpus,
            memory,
            uffd,
            first_page,
            states,
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hints,
            copies: (0..count).map(|_| AtomicU8::new(u8::MAX)).collect(),
            heat: (0..4096).map(|_| AtomicU8::new(0)).collect(),
            placement,
            directory: Mutex::new(directory),
            waiting: Mutex::new(HashMap::new()),
            transport: OnceLock::new(),
            slots: (0..spec.vcpus).map(|_| Arc::new(Slot::default())).collect(),
            echo: Arc::new(Slot::default()),
            policy: Mutex::new(policy),
            stop: AtomicBool::new(false),
            pause: PauseGate::new(spec.vcpus),
            resident: AtomicU32::new(0),
            threads: Mutex::new(vec![None; spec.vcpus as usize]),
            counters: Counters::default(),
            samples: Mutex::new(SampleSet::default()),
            metrics: NodeMetrics::new(me),
            recorder,
            health,
            armed: Mutex::new(HashMap::new()),
            armed_count: AtomicUsize::new(0),
            epoch: Instant::now(),
            epoch_offset_ns: clock_base_ns,
            clock_floor_ns: AtomicU64::new(0),
            leader,
            control: Mutex::new(Control::default()),
            control_changed: Condvar::new(),
        }))
    }
}
