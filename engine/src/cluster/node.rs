//! One node of a cluster: what it holds (its page table, the home directory of the
//! pages it is home to, the threads waiting for pages, its counters, node 0's leader
//! state) and where its messages go. [`Node::send`] is the only way out (the transport,
//! or the loopback for messages to itself) and [`Node::handle`] the only way in: it
//! dispatches each message to the coherence handlers (`coherence`), the vCPU and futex
//! slots (`wait`) or the leader (`leader`).
//!
//! Messages arrive on transport threads; vCPU threads and node 0's futex thread wait for
//! pages in [`Node::acquire`]. Nothing holds a page lock while sending, and the directory
//! lock is never held together with a page lock.

use super::leader::Leader;
use super::pages::PageTable;
use super::stats::{Counters, LinkEstimate, Sample, SampleSet};
use super::uffd::PAGE;
use super::wait::{Arrival, PauseGate, Slot, Waiting};
use super::{ClusterSpec, NodeId, POLL};
use crate::boot::BootLayout;
use crate::memory::GuestMemory;
use crate::Error;
use flotilla_placement::Policy;
use flotilla_telemetry::health::HealthReader;
use flotilla_telemetry::metrics::{Direction, NodeMetrics, Snapshot};
use flotilla_telemetry::record::Recorder;
use flotilla_telemetry::trace::{Event, EventKind, NONE16};
use flotilla_transport::directory::{Outgoing, PageDirectory};
use flotilla_transport::{Access, Handler, Message, NodeStats, Samples, Transport, TransportError};
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

thread_local! {
    /// Messages to this node queued while this thread handles one (see `Node::loopback`);
    /// `None` while it handles none.
    static LOOPBACK: RefCell<Option<VecDeque<Message>>> = const { RefCell::new(None) };
}

/// This thread drains its loopback queue until dropped (also on a panic).
struct Draining;

impl Draining {
    fn start() -> Draining {
        LOOPBACK.with(|q| *q.borrow_mut() = Some(VecDeque::new()));
        Draining
    }
}

impl Drop for Draining {
    fn drop(&mut self) {
        LOOPBACK.with(|q| *q.borrow_mut() = None);
    }
}

/// The main thread's view of the run.
#[derive(Default)]
struct Control {
    stop_received: bool,
    bye: bool,
    failure: Option<String>,
}

/// One node of the cluster.
pub(super) struct Node {
    pub me: NodeId,
    pub nodes: u16,
    pub vcpus: u32,
    pub memory: Arc<GuestMemory>,
    /// This node's copies of the guest's pages.
    pub pages: PageTable,
    /// Home directory of the pages this node is home to.
    pub(super) directory: Mutex<PageDirectory>,
    /// Pages this node's threads wait for.
    pub(super) waiting: Mutex<HashMap<u64, Waiting>>,
    /// Faults left that ask for one page, not a claim: a claim that got nothing (the
    /// memory was not fresh) costs an extra message, so claims pause for a while.
    pub(super) claim_backoff: AtomicU32,
    transport: OnceLock<Arc<dyn Transport>>,
    pub slots: Vec<Arc<Slot>>,
    echo: Arc<Slot>,
    pub policy: Mutex<Box<dyn Policy>>,
    pub stop: AtomicBool,
    pub pause: PauseGate,
    pub resident: AtomicU32,
    /// vCPUs running on each node as this node last heard (its own entry unused: see
    /// `resident`). Starts from the initial placement; a vCPU sent to a node counts
    /// there at once, and every `VcpuMove` tells what its sender has left. A hint for
    /// policies: a node's vCPUs that finished count until it next sends one away.
    pub loads: Vec<AtomicU32>,
    /// CPUs this node may run on (its affinity mask), taken to be every node's.
    pub cpus: u32,
    pub threads: Mutex<Vec<Option<libc::pthread_t>>>,
    pub counters: Counters,
    pub samples: Mutex<SampleSet>,
    /// What remote faults cost here lately, for the policy.
    pub link: LinkEstimate,
    pub metrics: NodeMetrics,
    recorder: Option<Recorder>,
    health: HealthReader,
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
    pub(super) fn trace_page(
        &self,
        kind: EventKind,
        page: u64,
        peer: NodeId,
        want: Access,
        replicas: u16,
    ) {
        if self.tracing() {
            let mut e = self.event(kind, u32::MAX, page);
            e.peer = peer;
            e.access = want.code();
            e.replicas = replicas;
            self.record(e);
        }
    }

    /// Copies of the page the home counted when this node last got it (trace form).
    pub fn copies(&self, page: u64) -> u16 {
        self.pages.copies(page).map_or(NONE16, u16::from)
    }

    pub fn home(&self, page: u64) -> NodeId {
        self.pages.placement.home(page)
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
        self.link.observe(kind, d);
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(kind, d);
    }

    /// Bytes sent and received over the transport so far.
    pub fn traffic(&self) -> (u64, u64) {
        self.transport
            .get()
            .map_or((0, 0), |t| (t.bytes_sent(), t.bytes_received()))
    }

    /// The health signals now.
    pub fn health(&self) -> Vec<(String, f64)> {
        self.health.read()
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

    pub(super) fn transport(&self) -> &Arc<dyn Transport> {
        // Frames can arrive before `establish` has returned on this node; they wait here
        // the few microseconds until it has.
        self.transport.wait()
    }

    /// Sends `msg` to `to`; to this node itself through the loopback.
    pub fn send(&self, to: NodeId, msg: Message) {
        if to == self.me {
            self.loopback(msg);
            return;
        }
        if let Err(e) = self.transport().send(to, &msg) {
            self.link_failed(to, e);
        }
    }

    /// A message from this node to itself: handled now, on this thread, unless this
    /// thread is already handling one, in which case it is queued and handled, in order,
    /// once that one is done. So a handler never runs inside another (a page request to
    /// this node, which is the page's home and owner, is one request, one fetch and one
    /// install in turn, not three nested calls).
    fn loopback(&self, msg: Message) {
        let first = LOOPBACK.with(|q| match &mut *q.borrow_mut() {
            Some(queue) => {
                queue.push_back(msg);
                None
            }
            None => Some(msg),
        });
        let Some(first) = first else { return };
        let _draining = Draining::start();
        let mut next = Some(first);
        while let Some(msg) = next {
            self.handle(self.me, msg);
            next = LOOPBACK.with(|q| q.borrow_mut().as_mut().and_then(VecDeque::pop_front));
        }
    }

    pub(super) fn route(&self, out: Vec<Outgoing>) {
        for (to, msg) in out {
            self.send(to, msg);
        }
    }

    /// Sends to node 0, which keeps the run's outcome.
    pub fn to_leader(&self, msg: Message) {
        self.send(0, msg);
    }

    pub(super) fn directory(&self) -> MutexGuard<'_, PageDirectory> {
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
            Message::Claim { page, count, want } => {
                self.page_msg_check(page, from, name)?;
                self.serve_claim(from, page, count, want)?;
            }
            Message::Claimed { page, count, mask } => {
                self.page_msg_check(page, from, name)?;
                self.take_claimed(from, page, count, mask)?;
            }
            Message::ClaimDone { page, count, mask } => {
                self.page_msg_check(page, from, name)?;
                self.claim_done(from, page, count, mask)?;
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
                sender_vcpus,
                history,
                state,
            } => {
                let history = flotilla_placement::History::decode(&history)
                    .map_err(|e| protocol(format!("vCPU {vcpu}'s history: {e}")))?;
                let slot = self
                    .slots
                    .get(vcpu as usize)
                    .ok_or_else(|| protocol(format!("unknown vCPU {vcpu}")))?;
                if sender_vcpus > self.vcpus {
                    return Err(protocol(format!(
                        "a move from a node that says it runs {sender_vcpus} of {} vCPUs",
                        self.vcpus
                    )));
                }
                self.loads[from as usize].store(sender_vcpus, Ordering::Relaxed);
                slot.update(|i| {
                    i.arrival = Some(Arrival {
                        from,
                        page,
                        fault_ns,
                        clock_ns,
                        history,
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

    pub(super) fn link_failed(&self, peer: NodeId, why: TransportError) {
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

/// Where a node's guest clock starts.
pub(super) enum GuestClock {
    /// At 0 at this CLOCK_MONOTONIC time (nodes on one host share it); `None`: now.
    Epoch(Option<u64>),
    /// Where a snapshot left it.
    Continue(u64),
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
    /// Where the guest clock starts.
    pub clock: GuestClock,
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
            clock,
            leader,
        } = parts;
        let pages = PageTable::new(me, &spec, &layout, &memory, alone)?;
        let placement = &pages.placement;
        let all_nodes = if spec.nodes == 64 {
            u64::MAX
        } else {
            (1u64 << spec.nodes) - 1
        };
        let directory = PageDirectory::new(
            me,
            spec.nodes,
            pages.first,
            pages.end - pages.first,
            |page| {
                let home = placement.home(page);
                (home == me).then(|| {
                    if placement.image.contains(&page) {
                        (home, all_nodes)
                    } else {
                        (home, 1u64 << home)
                    }
                })
            },
        );
        Ok(Arc::new(Node {
            me,
            nodes: spec.nodes,
            vcpus: spec.vcpus,
            memory,
            pages,
            directory: Mutex::new(directory),
            waiting: Mutex::new(HashMap::new()),
            claim_backoff: AtomicU32::new(0),
            transport: OnceLock::new(),
            slots: (0..spec.vcpus).map(|_| Arc::new(Slot::default())).collect(),
            echo: Arc::new(Slot::default()),
            policy: Mutex::new(policy),
            stop: AtomicBool::new(false),
            pause: PauseGate::new(spec.vcpus),
            resident: AtomicU32::new(0),
            loads: (0..spec.nodes)
                .map(|n| AtomicU32::new(spec.vcpu_nodes.iter().filter(|&&v| v == n).count() as u32))
                .collect(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            threads: Mutex::new(vec![None; spec.vcpus as usize]),
            counters: Counters::default(),
            samples: Mutex::new(SampleSet::default()),
            link: LinkEstimate::default(),
            metrics: NodeMetrics::new(me),
            recorder,
            health,
            // Read together, so the guest clock is right from the first event.
            epoch: Instant::now(),
            epoch_offset_ns: match clock {
                GuestClock::Epoch(Some(e)) => monotonic_ns().saturating_sub(e),
                GuestClock::Epoch(None) => 0,
                GuestClock::Continue(ns) => ns,
            },
            clock_floor_ns: AtomicU64::new(0),
            leader,
            control: Mutex::new(Control::default()),
            control_changed: Condvar::new(),
        }))
    }
}

impl Node {
    pub fn stats(&self) -> NodeStats {
        let (c, m) = (&self.counters, &self.metrics);
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NodeStats {
            remote_faults: m.remote_faults(),
            page_moves: m.page_moves(Direction::In),
            replicas_made: l(&c.replicas_made),
            pages_claimed: l(&c.pages_claimed),
            invalidations: m.invalidations(),
            vcpu_moves: m.vcpu_moves(Direction::Out),
            bytes_sent: self.traffic().0,
            exits: l(&c.exits),
        }
    }

    /// Updates the metrics kept elsewhere and renders them (one scrape).
    pub fn scrape(&self) -> String {
        let pages_resident = self.pages.resident();
        let (bytes_sent, bytes_received) = self.traffic();
        self.metrics.refresh(&Snapshot {
            bytes_sent,
            bytes_received,
            pages_resident,
            vcpus_resident: self.resident.load(Ordering::Relaxed) as u64,
            health: self.health(),
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
}
