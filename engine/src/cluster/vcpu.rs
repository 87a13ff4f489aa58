//! A vCPU thread of a cluster node. Each node has a KVM vCPU object for every vCPU of
//! the guest; a vCPU runs on exactly one node at a time and its thread elsewhere waits
//! for it to arrive.
//!
//! A fault comes back as an MMIO exit at the faulting instruction (docs/host-kvm.md). If
//! this node can satisfy it (a page held but not yet touched), the page is installed and
//! the MMIO completed. Otherwise the policy chooses: bring the page (acquire it, complete
//! the pending access against it, flush the instruction with `immediate_exit` while the
//! page is held, tell the home we are done) or send the vCPU to the page's holder (capture
//! its state, which is the state before the instruction, flush the stale access while the
//! page cannot arrive here, ship the state). Two rules guarantee progress whatever the
//! policy says: a vCPU that arrives for a page and faults again at the same instruction
//! brings the page, and a second MMIO fragment of one instruction always brings its page.

use super::decode;
use super::node::{monotonic_ns, Arrival, CoherentView, Node, PageState, Sample, Slot};
use super::uffd::PAGE;
use crate::hypercall::{self, result_offset, Hypercall};
use crate::hypercall::{le_value, HypercallError};
use crate::kvm::{Exit, Flushed, Vcpu, VcpuState};
use crate::memory::GuestRead;
use crate::Error;
use flotilla_abi::errno;
use flotilla_placement::{Access, Decision, FaultContext, FaultRecord, History};
use flotilla_telemetry::metrics::Direction;
use flotilla_telemetry::trace::{self, flags, EventKind};
use flotilla_transport::{wire::CONSOLE_CHUNK_BYTES, Message, NodeId};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

enum Flow {
    Continue,
    /// The vCPU now runs on another node.
    Moved,
    /// The vCPU returned or called EXIT: it waits for the end of the run.
    Parked,
}

/// Consecutive EFAULTs at one instruction with all its pages present before giving up.
const SPURIOUS_LIMIT: u32 = 10_000;

struct Ctx {
    history: History,
    /// The last EFAULT that found nothing missing: its rip and how often in a row.
    spurious: (u64, u32),
    /// The instruction the vCPU arrived to re-execute, until its first fault here.
    arrived_rip: Option<u64>,
}

pub(super) fn vcpu_thread(node: Arc<Node>, mut vcpu: Vcpu, here: bool) {
    let id = vcpu.id();
    vcpu.bind_to_thread();
    // SAFETY: pthread_self has no preconditions.
    node.threads.lock().unwrap_or_else(|p| p.into_inner())[id as usize] =
        Some(unsafe { libc::pthread_self() });
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        vcpu_loop(&node, &mut vcpu, here)
    }));
    node.threads.lock().unwrap_or_else(|p| p.into_inner())[id as usize] = None;
    vcpu.unbind_from_thread();
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => node.fail(e),
        Err(_) => node.fail(Error::ThreadPanicked(id)),
    }
}

fn vcpu_loop(node: &Node, vcpu: &mut Vcpu, mut here: bool) -> Result<(), Error> {
    let id = vcpu.id();
    let slot = Arc::clone(&node.slots[id as usize]);
    let mut ctx = Ctx {
        history: History::default(),
        arrived_rip: None,
        spurious: (0, 0),
    };
    if here {
        node.resident.fetch_add(1, Ordering::Relaxed);
    }
    loop {
        if node.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        if here && node.pause.requested() {
            // Finish the instruction in progress, so the state is complete on its own.
            let state = vcpu
                .complete_pending_io()
                .and_then(|()| vcpu.capture())
                .map_err(|source| Error::VcpuCall {
                    vcpu: id,
                    call: "capturing its state for a pause",
                    source,
                })?;
            node.pause.park(id, state, &node.stop);
            continue;
        }
        if !here {
            let Some(arrival) = slot.wait_arrival(&node.stop) else {
                return Ok(());
            };
            ctx.arrived_rip = Some(arrive(node, vcpu, arrival)?);
            here = true;
            node.resident.fetch_add(1, Ordering::Relaxed);
        }
        match step(node, vcpu, &mut ctx, &slot)? {
            Flow::Continue => {}
            Flow::Moved => {
                here = false;
                node.resident.fetch_sub(1, Ordering::Relaxed);
            }
            Flow::Parked => {
                node.resident.fetch_sub(1, Ordering::Relaxed);
                while !node.stop.load(Ordering::SeqCst) {
                    slot.wait_woken(&node.stop);
                }
                return Ok(());
            }
        }
    }
}

/// Restores a vCPU that moved here; returns the instruction it re-executes.
fn arrive(node: &Node, vcpu: &mut Vcpu, a: Arrival) -> Result<u64, Error> {
    let (me, id) = (node.me, vcpu.id());
    let t = Instant::now();
    let state =
        VcpuState::decode(&a.state).map_err(|source| Error::BadState { vcpu: id, source })?;
    if state.id != id {
        return Err(Error::Protocol {
            from: a.from,
            what: format!("the state of vCPU {} for vCPU {id}", state.id),
        });
    }
    vcpu.restore(&state).map_err(|source| Error::VcpuCall {
        vcpu: id,
        call: "restoring its state",
        source,
    })?;
    node.sample(Sample::Restore, t.elapsed());
    let now = monotonic_ns();
    let moved = Duration::from_nanos(now.saturating_sub(a.fault_ns));
    if a.fault_ns <= now {
        node.sample(Sample::VcpuMove, moved);
        node.metrics.vcpu_move_time(moved.as_secs_f64());
    }
    node.metrics.vcpu_move(Direction::In);
    node.raise_clock(a.clock_ns);
    if node.tracing() {
        let mut e = node.event(EventKind::VcpuIn, id, a.page);
        e.peer = a.from;
        e.rip = state.regs.rip;
        e.service_ns = nanos(moved);
        node.record(e);
    }
    tracing::trace!(node = me, vcpu = id, page = a.page, "vCPU arrived");
    Ok(state.regs.rip)
}

fn step(node: &Node, vcpu: &mut Vcpu, ctx: &mut Ctx, slot: &Arc<Slot>) -> Result<Flow, Error> {
    let id = vcpu.id();
    node.counters.exits.fetch_add(1, Ordering::Relaxed);
    let rip = |vcpu: &Vcpu| vcpu.rip().unwrap_or(0);
    enum What {
        Out(u16, u32),
        In(u16),
        Fault(u64, bool, usize),
        Whole(u64),
        WriteFault,
        Fetch,
        Nothing,
        Shutdown,
        Unhandled(String),
    }
    let exit = match vcpu.run() {
        Ok(exit) => exit,
        Err(source) => {
            return Err(Error::VcpuCall {
                vcpu: id,
                call: "KVM_RUN",
                source,
            })
        }
    };
    let what = match exit {
        Exit::IoOut { port, data } => What::Out(port, le_value(data)),
        Exit::IoIn { port, data } => {
            if hypercall::answer_in(port, data, id, node.vcpus) {
                What::Nothing
            } else {
                What::In(port)
            }
        }
        Exit::Mmio { addr, write, len } => What::Fault(addr, write, len),
        Exit::MemoryFault { addr, .. } => What::Whole(addr),
        Exit::WriteFault => What::WriteFault,
        Exit::Interrupted => What::Nothing,
        Exit::InternalError { suberror: 1 } => What::Fetch,
        Exit::Shutdown => What::Shutdown,
        Exit::Halt => What::Unhandled("hlt".into()),
        Exit::FailEntry { reason } => {
            What::Unhandled(format!("VM entry failed (reason {reason:#x})"))
        }
        Exit::InternalError { suberror } => {
            What::Unhandled(format!("KVM internal error (suberror {suberror})"))
        }
        Exit::Other(what) => What::Unhandled(what),
    };
    match what {
        What::Nothing => Ok(Flow::Continue),
        What::Out(port, value) => hypercall(node, vcpu, port, value, slot),
        What::In(port) => Err(Error::BadHypercall {
            vcpu: id,
            rip: rip(vcpu),
            source: HypercallError::UnknownPort { port, dir: "in" },
        }),
        What::Fault(addr, write, len) => fault(node, vcpu, ctx, slot, addr, write, len),
        What::Whole(addr) => {
            // Newer kernels: no pending access; bring the page and re-run. A page held
            // here but unmapped (never touched, or armed by the sampler) is mapped back
            // as it is, not upgraded.
            let page = check_page(node, id, addr, 1)?;
            {
                let g = node.lock(page);
                let (state, populated) = node.state(page);
                if state != PageState::Invalid && !populated {
                    let armed = node.populate(page, state)?;
                    drop(g);
                    if let Some(armed_ns) = armed {
                        note_sample(node, id, page, Access::Read, 0, armed_ns);
                    }
                    return Ok(Flow::Continue);
                }
            }
            let held = node.acquire(page, Access::Write, slot)?;
            node.release(held, page);
            Ok(Flow::Continue)
        }
        What::WriteFault => write_fault(node, vcpu, ctx, slot),
        What::Fetch => {
            // An instruction fetch from a page that is not here cannot be emulated:
            // bring the code and try again.
            let r = rip(vcpu);
            let mut fetched = false;
            for page in [r / PAGE, (r + 15) / PAGE] {
                if page < node.first_page || page >= node.pages() {
                    continue;
                }
                let present = {
                    let _g = node.lock(page);
                    let (state, populated) = node.state(page);
                    if state != PageState::Invalid && !populated {
                        node.populate(page, state)?;
                        fetched = true;
                    }
                    state != PageState::Invalid
                };
                if !present {
                    let held = node.acquire(page, Access::Execute, slot)?;
                    node.release(held, page);
                    fetched = true;
                }
            }
            if fetched {
                Ok(Flow::Continue)
            } else {
                Err(Error::Emulation {
                    vcpu: id,
                    rip: r,
                    what: "KVM could not emulate the instruction".into(),
                })
            }
        }
        What::Shutdown => Err(Error::TripleFault {
            vcpu: id,
            rip: rip(vcpu),
        }),
        What::Unhandled(exit) => Err(Error::UnhandledExit {
            vcpu: id,
            rip: rip(vcpu),
            exit,
        }),
    }
}

fn check_page(node: &Node, id: u32, addr: u64, len: usize) -> Result<u64, Error> {
    let page = addr / PAGE;
    if page < node.first_page
        || addr + len as u64 > node.memory.size()
        || addr % PAGE + len as u64 > PAGE
    {
        return Err(Error::OutsideRam {
            vcpu: id,
            addr,
            len: len as u64,
            ram: node.memory.size(),
        });
    }
    Ok(page)
}

/// An access KVM could not turn into an MMIO exit (on this host: any write, or an SSE
/// read, to a missing page ends `KVM_RUN` with `EFAULT`, RIP at the instruction, nothing
/// pending): find the page from the instruction, then bring it (and re-run) or send the
/// vCPU to it (its state needs no flush).
fn write_fault(
    node: &Node,
    vcpu: &mut Vcpu,
    ctx: &mut Ctx,
    slot: &Arc<Slot>,
) -> Result<Flow, Error> {
    let id = vcpu.id();
    let t0 = Instant::now();
    let fault_ns = monotonic_ns();
    let regs = vcpu.regs().map_err(|source| Error::VcpuCall {
        vcpu: id,
        call: "reading its registers",
        source,
    })?;
    let view = CoherentView { node, slot };
    let mut code = [0u8; 15];
    let n = (node.memory.size().saturating_sub(regs.rip)).min(15) as usize;
    view.read_bytes(regs.rip, &mut code[..n])
        .map_err(|source| Error::GuestMemory { vcpu: id, source })?;
    let accesses = decode::memory_accesses(&code[..n], &regs).map_err(|what| Error::Emulation {
        vcpu: id,
        rip: regs.rip,
        what: format!("decoding a faulting instruction: {what}"),
    })?;
    // The first page the instruction cannot use as it is: held but never touched
    // (install it here) or not held well enough (a remote fault).
    let mut target = None;
    'find: for a in &accesses {
        let want = if a.write { Access::Write } else { Access::Read };
        for page in [a.addr / PAGE, (a.addr + a.len - 1) / PAGE] {
            if page < node.first_page || page >= node.pages() {
                continue;
            }
            let _g = node.lock(page);
            let (state, populated) = node.state(page);
            if !state.allows(want) {
                target = Some((page, want, state));
                break 'find;
            }
            if !populated {
                let armed = node.populate(page, state)?;
                drop(_g);
                match armed {
                    Some(armed_ns) => note_sample(node, id, page, want, regs.rip, armed_ns),
                    None => node.sample(Sample::Install, t0.elapsed()),
                }
                return Ok(Flow::Continue);
            }
        }
    }
    let Some((page, want, state)) = target else {
        // Another thread brought the page meanwhile: run the instruction again. A fault
        // that keeps coming back with every page present is a bug, not a race.
        ctx.spurious = if ctx.spurious.0 == regs.rip {
            (regs.rip, ctx.spurious.1 + 1)
        } else {
            (regs.rip, 1)
        };
        if ctx.spurious.1 > SPURIOUS_LIMIT {
            return Err(Error::Emulation {
                vcpu: id,
                rip: regs.rip,
                what: "KVM_RUN keeps failing with EFAULT, though every page the instruction uses is here".into(),
            });
        }
        return Ok(Flow::Continue);
    };
    let forced = ctx.arrived_rip.take() == Some(regs.rip);
    let mut fault = Fault::new(node, page, want, state, regs.rip, flags::DECODED);
    let holder = fault.holder;
    match decide(node, ctx, id, &mut fault, forced) {
        Decision::MovePage => {
            let held = node.acquire(page, want, slot)?;
            node.release(held, page);
            served(node, id, &fault, t0.elapsed());
            Ok(Flow::Continue)
        }
        Decision::MoveVcpu => {
            let t = Instant::now();
            let state = vcpu.capture().map_err(|source| Error::VcpuCall {
                vcpu: id,
                call: "capturing its state",
                source,
            })?;
            node.sample(Sample::Capture, t.elapsed());
            fault.rip = state.regs.rip;
            shipped(node, id, &fault, t0.elapsed(), t.elapsed());
            ship(node, id, page, holder, fault_ns, state);
            Ok(Flow::Moved)
        }
    }
}

/// A remote fault: what the policy is told, and what the trace records.
struct Fault {
    page: u64,
    want: Access,
    /// The node believed to hold the page.
    holder: NodeId,
    rip: u64,
    /// Trace flags (`flags::*`).
    flags: u8,
}

impl Fault {
    /// Counts a remote fault on `page`, which this node holds as `state`.
    fn new(node: &Node, page: u64, want: Access, state: PageState, rip: u64, flags: u8) -> Self {
        node.metrics.remote_fault(want == Access::Write);
        let replica = if state == PageState::Shared {
            flags::HAD_REPLICA
        } else {
            0
        };
        Fault {
            page,
            want,
            holder: node.hint(page),
            rip,
            flags: flags | replica,
        }
    }
}

fn nanos(d: Duration) -> u32 {
    d.as_nanos().min(u32::MAX as u128) as u32
}

fn fault_event(node: &Node, id: u32, f: &Fault, decision: u8, service: Duration) {
    let mut e = node.event(EventKind::RemoteFault, id, f.page);
    // Stamped when served: the fault was `service` earlier.
    e.t_ns = e.t_ns.saturating_sub(service.as_nanos() as u64);
    e.rip = f.rip;
    e.peer = f.holder;
    e.access = f.want.code();
    e.decision = decision;
    e.flags = f.flags;
    e.service_ns = nanos(service);
    if decision == trace::DECISION_MOVE_PAGE {
        e.replicas = node.copies(f.page);
    }
    node.record(e);
}

/// A remote fault served by bringing the page.
fn served(node: &Node, id: u32, f: &Fault, service: Duration) {
    node.sample(Sample::FaultService, service);
    node.metrics.fault_service(service.as_secs_f64());
    if node.tracing() {
        fault_event(node, id, f, trace::DECISION_MOVE_PAGE, service);
    }
}

/// A remote fault served by sending the vCPU to the page: `service` from the fault exit
/// to the captured state, `capture` of which capturing it.
fn shipped(node: &Node, id: u32, f: &Fault, service: Duration, capture: Duration) {
    node.metrics.vcpu_move(Direction::Out);
    if node.tracing() {
        fault_event(node, id, f, trace::DECISION_MOVE_VCPU, service);
        let mut e = node.event(EventKind::VcpuOut, id, f.page);
        e.peer = f.holder;
        e.rip = f.rip;
        e.access = f.want.code();
        e.service_ns = nanos(capture);
        node.record(e);
    }
}

/// A sampled access (the page was armed by the sampler at `armed_ns`).
fn note_sample(node: &Node, id: u32, page: u64, want: Access, rip: u64, armed_ns: u64) {
    node.metrics.access_sample();
    if node.tracing() {
        let mut e = node.event(EventKind::AccessSample, id, page);
        e.rip = rip;
        e.access = want.code();
        e.service_ns = nanos(Duration::from_nanos(
            monotonic_ns().saturating_sub(armed_ns),
        ));
        node.record(e);
    }
}

/// Sends a captured vCPU to `holder`, the node the policy chose it to go to.
fn ship(node: &Node, id: u32, page: u64, holder: NodeId, fault_ns: u64, state: VcpuState) {
    node.send(
        holder,
        Message::VcpuMove {
            vcpu: id,
            page,
            fault_ns,
            clock_ns: node.clock_ns(),
            state: state.encode(),
        },
    );
}

/// Asks the policy, unless a rule decides (then the fault is flagged `FORCED`): `forced`
/// (a progress rule of the caller), the holder is this node, or the page is this vCPU's
/// own stack. A vCPU's stack is private to it, so it follows the vCPU: were it to stay
/// behind, a vCPU sent to its data would be sent back at its next push (under
/// `always-vcpu`, two moves per loop iteration, forever).
fn decide(node: &Node, ctx: &mut Ctx, id: u32, f: &mut Fault, forced: bool) -> Decision {
    let (page, holder) = (f.page, f.holder);
    let access = f.want;
    let ruled = forced || holder == node.me || node.placement.stack_of(page) == Some(id);
    if ruled {
        f.flags |= flags::FORCED;
    }
    let decision = if ruled {
        Decision::MovePage
    } else {
        let fc = FaultContext {
            vcpu: id,
            node: node.me,
            nodes: node.nodes,
            page,
            access,
            holder,
            home: node.home(page),
            have_replica: f.flags & flags::HAD_REPLICA != 0,
            local_vcpus: node.resident.load(Ordering::Relaxed),
            page_heat: node.heat(page),
            history: &ctx.history,
        };
        let t = Instant::now();
        let d = node
            .policy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .decide(&fc);
        node.metrics.policy_decision(t.elapsed().as_secs_f64());
        d
    };
    ctx.history.push(FaultRecord {
        page,
        access,
        holder,
        decision,
    });
    decision
}

/// Completes the pending access against the page (held by the caller) and flushes it.
fn complete(node: &Node, vcpu: &mut Vcpu, addr: u64, write: bool) -> Result<Flushed, Error> {
    let id = vcpu.id();
    let data = vcpu.mmio_data().ok_or(Error::Emulation {
        vcpu: id,
        rip: 0,
        what: "no pending access to complete".into(),
    })?;
    let r = if write {
        node.memory.write(addr, data)
    } else {
        node.memory.read(addr, data)
    };
    r.map_err(|source| Error::GuestMemory { vcpu: id, source })?;
    flush(vcpu)
}

/// Finishes the instruction KVM left pending (`immediate_exit`).
fn flush(vcpu: &mut Vcpu) -> Result<Flushed, Error> {
    vcpu.flush().map_err(|source| Error::VcpuCall {
        vcpu: vcpu.id(),
        call: "finishing an access",
        source,
    })
}

/// What the loop in `fault` does after completing an access.
fn after(id: u32, flushed: Flushed) -> Result<Option<(u64, bool, usize)>, Error> {
    let failed = |what: String| Error::Emulation {
        vcpu: id,
        rip: 0,
        what,
    };
    match flushed {
        Flushed::Done => Ok(None),
        Flushed::Mmio { addr, write, len } => Ok(Some((addr, write, len))),
        Flushed::EmulationFailed => Err(failed(
            "KVM could not finish an instruction whose page is present".into(),
        )),
        Flushed::Other(what) => Err(failed(format!("finishing an access ended with {what}"))),
    }
}

#[allow(clippy::too_many_arguments)]
fn fault(
    node: &Node,
    vcpu: &mut Vcpu,
    ctx: &mut Ctx,
    slot: &Arc<Slot>,
    addr: u64,
    write: bool,
    len: usize,
) -> Result<Flow, Error> {
    let id = vcpu.id();
    let t0 = Instant::now();
    let fault_ns = monotonic_ns();
    let mut next = Some((addr, write, len));
    let mut first = true;
    while let Some((addr, write, len)) = next {
        let page = check_page(node, id, addr, len)?;
        let want = if write { Access::Write } else { Access::Read };
        // This node holds the page but never touched it: install and go on.
        let state = {
            let guard = node.lock(page);
            let (state, populated) = node.state(page);
            if state.allows(want) {
                let armed = if populated {
                    None
                } else {
                    node.populate(page, state)?
                };
                // RIP before completing the access moves it on (an ioctl: only if traced).
                let rip = if armed.is_some() && node.tracing() {
                    vcpu.rip().unwrap_or(0)
                } else {
                    0
                };
                let flushed = complete(node, vcpu, addr, write)?;
                drop(guard);
                match armed {
                    Some(armed_ns) => note_sample(node, id, page, want, rip, armed_ns),
                    None if !populated => node.sample(Sample::Install, t0.elapsed()),
                    None => {}
                }
                next = after(id, flushed)?;
                first = false;
                continue;
            }
            state
        };
        let forced = match ctx.arrived_rip.take() {
            Some(rip) => {
                vcpu.rip().map_err(|source| Error::VcpuCall {
                    vcpu: id,
                    call: "reading its registers",
                    source,
                })? == rip
            }
            None => false,
        };
        let mut fault = Fault::new(node, page, want, state, 0, 0);
        let holder = fault.holder;
        // A later fragment of one instruction always brings its page.
        let decision = decide(node, ctx, id, &mut fault, forced || !first);
        first = false;
        match decision {
            Decision::MovePage => {
                if node.tracing() {
                    fault.rip = vcpu.rip().unwrap_or(0);
                }
                let held = node.acquire(page, want, slot)?;
                let flushed = complete(node, vcpu, addr, write);
                node.release(held, page);
                served(node, id, &fault, t0.elapsed());
                next = after(id, flushed?)?;
            }
            Decision::MoveVcpu => {
                let guard = node.lock(page);
                if node.state(page).0.allows(want) {
                    // It arrived meanwhile (another thread brought it): the fault is
                    // served by that page move; the loop completes the access here.
                    drop(guard);
                    served(node, id, &fault, t0.elapsed());
                    next = Some((addr, write, len));
                    continue;
                }
                let t = Instant::now();
                let state = vcpu.capture().map_err(|source| Error::VcpuCall {
                    vcpu: id,
                    call: "capturing its state",
                    source,
                })?;
                node.sample(Sample::Capture, t.elapsed());
                fault.rip = state.regs.rip;
                shipped(node, id, &fault, t0.elapsed(), t.elapsed());
                // Flush the stale access while the page cannot arrive here.
                for _ in 0..8 {
                    match flush(vcpu)? {
                        Flushed::Mmio { .. } => continue,
                        Flushed::Done | Flushed::EmulationFailed => break,
                        Flushed::Other(what) => {
                            return Err(Error::Emulation {
                                vcpu: id,
                                rip: state.regs.rip,
                                what: format!("finishing a stale access ended with {what}"),
                            })
                        }
                    }
                }
                drop(guard);
                ship(node, id, page, holder, fault_ns, state);
                return Ok(Flow::Moved);
            }
        }
    }
    Ok(Flow::Continue)
}

fn hypercall(
    node: &Node,
    vcpu: &Vcpu,
    port: u16,
    value: u32,
    slot: &Arc<Slot>,
) -> Result<Flow, Error> {
    let id = vcpu.id();
    let view = CoherentView { node, slot };
    let call = hypercall::decode_out(&view, port, value).map_err(|source| Error::BadHypercall {
        vcpu: id,
        rip: vcpu.rip().unwrap_or(0),
        source,
    })?;
    let mem_err = |source| Error::GuestMemory { vcpu: id, source };
    let stopped = || Error::Stopped;
    match call {
        Hypercall::Exit(code) => {
            node.to_leader(Message::Exit { code });
            return Ok(Flow::Parked);
        }
        Hypercall::Return(code) => {
            node.to_leader(Message::VcpuReturned { vcpu: id, code });
            return Ok(Flow::Parked);
        }
        Hypercall::Write {
            block,
            fd,
            buf,
            len,
        } => {
            let result = if !hypercall::write_accepted(fd, len) {
                -(errno::EINVAL as i64)
            } else {
                let mut bytes = vec![0u8; len as usize];
                view.read_bytes(buf, &mut bytes).map_err(mem_err)?;
                for chunk in bytes.chunks(CONSOLE_CHUNK_BYTES) {
                    node.to_leader(Message::Console {
                        fd: fd as u8,
                        bytes: chunk.to_vec(),
                    });
                }
                len as i64
            };
            view.write_bytes(block + result_offset::WRITE, &(result as u64).to_le_bytes())
                .map_err(mem_err)?;
        }
        Hypercall::Clock { block, clock_id } => {
            let (result, nanos) = hypercall::clock(clock_id, || node.clock_ns());
            view.write_bytes(block + result_offset::CLOCK_RESULT, &result.to_le_bytes())
                .map_err(mem_err)?;
            view.write_bytes(block + result_offset::CLOCK_NANOS, &nanos.to_le_bytes())
                .map_err(mem_err)?;
        }
        Hypercall::FutexWait {
            block,
            addr,
            expected,
            flags,
            timeout_ns,
        } => {
            let result = if flags != 0 || !hypercall::futex_word_ok(addr) {
                -errno::EINVAL
            } else {
                node.to_leader(Message::FutexWait {
                    vcpu: id,
                    addr,
                    expected,
                    timeout_ns,
                });
                slot.wait_futex(&node.stop).ok_or_else(stopped)?
            };
            view.write_bytes(block + result_offset::FUTEX_WAIT, &result.to_le_bytes())
                .map_err(mem_err)?;
        }
        Hypercall::FutexWake { block, addr, count } => {
            let result = if !hypercall::futex_word_ok(addr) {
                -errno::EINVAL
            } else {
                node.to_leader(Message::FutexWake {
                    vcpu: id,
                    addr,
                    count,
                });
                slot.wait_futex(&node.stop).ok_or_else(stopped)?
            };
            view.write_bytes(block + result_offset::FUTEX_WAKE, &result.to_le_bytes())
                .map_err(mem_err)?;
        }
        Hypercall::Yield => std::thread::yield_now(),
        Hypercall::Report(value) => node.to_leader(Message::Report { value }),
    }
    Ok(Flow::Continue)
}
