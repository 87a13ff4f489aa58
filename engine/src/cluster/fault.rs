//! The fault path: one fault, from the exit that reported it to the page used here or
//! the vCPU sent to the page.
//!
//! On this host a missing or read-only page reaches the engine as one of four exits
//! (docs/host-kvm.md), each a [`Detected`]: an MMIO exit at the faulting instruction with
//! the access pending, a memory-fault exit, `KVM_RUN` failing with `EFAULT` (the pages
//! come from decoding the instruction), or an instruction fetch KVM could not do. [`serve`]
//! handles all four the same way:
//!
//! 1. the pages the instruction needs, with the access it makes ([`needs`]);
//! 2. for each, under its lock, what this node has ([`Node::local`]): usable (mapped
//!    now if it was held but never touched) or missing, which is a remote fault;
//! 3. for a remote fault the policy is asked once ([`decide`]), unless a progress rule
//!    decides; then the page is brought ([`Node::acquire`], which sends the request to
//!    the page's home and waits for the page) or the vCPU's state is captured and sent to
//!    the page's holder ([`ship`]);
//! 4. an MMIO access is completed against the page while it is held, and KVM finishes
//!    the instruction (`immediate_exit`); a later fragment of the same instruction goes
//!    round again. The other kinds run the instruction again.
//!
//! Two rules guarantee progress whatever the policy says: a vCPU that arrives for a page
//! and faults again at the same instruction brings the page, and a second MMIO fragment
//! of one instruction always brings its page. A vCPU's own stack always comes to it.

use super::coherence::CoherentView;
use super::decode;
use super::node::{monotonic_ns, Node};
use super::pages::{Local, PageState, Populated};
use super::stats::Sample;
use super::uffd::PAGE;
use super::wait::Slot;
use crate::kvm::{Flushed, Vcpu, VcpuState};
use crate::memory::GuestRead;
use crate::Error;
use flotilla_placement::{Access, Decision, FaultContext, FaultRecord, History};
use flotilla_telemetry::metrics::Direction;
use flotilla_telemetry::trace::{self, flags, EventKind};
use flotilla_transport::{Message, NodeId};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Consecutive faults at one instruction with all its pages present before giving up.
const SPURIOUS_LIMIT: u32 = 10_000;

/// How a fault exit ended.
pub(super) enum Served {
    /// The vCPU goes on here.
    Continue,
    /// The vCPU was sent to another node.
    Moved,
}

/// What a vCPU thread remembers from fault to fault.
pub(super) struct Ctx {
    pub history: History,
    /// The last fault that found nothing missing: its rip and how often in a row.
    pub spurious: (u64, u32),
    /// The instruction the vCPU arrived to re-execute, until its first fault here.
    pub arrived_rip: Option<u64>,
    /// vCPUs on each node, as this node knows them (refreshed for each decision).
    pub loads: Vec<u32>,
    /// This thread's own copy of the node's policy, when it keeps no shared state
    /// ([`Policy::fork`](flotilla_placement::Policy::fork)): decisions then take no lock.
    pub policy: Option<Box<dyn flotilla_placement::Policy>>,
}

/// How a fault reached the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Detected {
    /// An MMIO exit: the access is pending in `kvm_run`, RIP at the instruction.
    Mmio { addr: u64, write: bool, len: usize },
    /// A memory-fault exit (newer kernels): the page, nothing pending.
    MemoryFault { addr: u64 },
    /// `KVM_RUN` failed with `EFAULT` (on this host: a write or an SSE read to a missing
    /// page), RIP at the instruction, nothing pending.
    Efault,
    /// KVM could not fetch the instruction at RIP (internal error, suberror 1).
    Fetch,
}

impl Detected {
    fn pending(self) -> Option<(u64, bool)> {
        match self {
            Detected::Mmio { addr, write, .. } => Some((addr, write)),
            _ => None,
        }
    }

    /// Trace flags for faults detected this way.
    fn flags(self) -> u8 {
        match self {
            Detected::Efault => flags::DECODED,
            _ => 0,
        }
    }
}

/// Serves one fault exit of `vcpu`.
pub(super) fn serve(
    node: &Node,
    vcpu: &mut Vcpu,
    ctx: &mut Ctx,
    slot: &Arc<Slot>,
    detected: Detected,
) -> Result<Served, Error> {
    let id = vcpu.id();
    let t0 = Instant::now();
    let fault_ns = monotonic_ns();
    let mut how = detected;
    let mut fragment = 0u32;
    'fault: loop {
        let (rip, needs) = needs(node, vcpu, slot, how)?;
        // The first page the instruction cannot use as this node holds it.
        let mut target = None;
        let mut installed = false;
        for &(page, want) in &needs {
            match node.pages.local(page, want)? {
                Local::Ready { guard, mapped } => {
                    installed |= mapped.is_some();
                    let Some((addr, write)) = how.pending() else {
                        drop(guard);
                        note_install(node, id, page, want, rip, mapped, t0);
                        continue;
                    };
                    // RIP before completing the access moves it on (an ioctl: only if
                    // the sample is traced).
                    let rip = match mapped {
                        Some(Populated::Sampled { .. }) if node.tracing() => {
                            vcpu.rip().unwrap_or(0)
                        }
                        _ => 0,
                    };
                    let flushed = complete(node, vcpu, addr, write)?;
                    drop(guard);
                    note_install(node, id, page, want, rip, mapped, t0);
                    match after(id, flushed)? {
                        Some(next) => {
                            how = next;
                            fragment += 1;
                            continue 'fault;
                        }
                        None => return Ok(Served::Continue),
                    }
                }
                Local::Missing(state) => {
                    target = Some((page, want, state));
                    break;
                }
            }
        }
        let Some((page, want, state)) = target else {
            if installed {
                return Ok(Served::Continue);
            }
            // Another thread brought the page meanwhile: run the instruction again. A
            // fault that keeps coming back with every page present is a bug, not a race.
            let rip = match rip {
                Some(r) => r,
                None => read_rip(vcpu)?,
            };
            ctx.spurious = match ctx.spurious {
                (r, n) if r == rip => (rip, n + 1),
                _ => (rip, 1),
            };
            if ctx.spurious.1 > SPURIOUS_LIMIT {
                return Err(Error::Emulation {
                    vcpu: id,
                    rip,
                    what: format!(
                        "{how:?} keeps coming back, though every page the instruction uses is here"
                    ),
                });
            }
            return Ok(Served::Continue);
        };
        // A remote fault.
        let forced = match ctx.arrived_rip.take() {
            Some(arrived) => match rip {
                Some(r) => r == arrived,
                None => read_rip(vcpu)? == arrived,
            },
            None => false,
        } || fragment > 0;
        let mut remote = Remote::new(node, page, want, state, rip.unwrap_or(0), how.flags());
        match decide(node, ctx, id, &mut remote, forced) {
            Decision::MovePage => {
                if node.tracing() && remote.rip == 0 {
                    remote.rip = vcpu.rip().unwrap_or(0);
                }
                let Some((addr, write)) = how.pending() else {
                    // Nothing pending: the instruction runs again once the page is here.
                    let claimed = node.bring(page, want, slot)?;
                    served(node, id, &remote, t0.elapsed(), claimed);
                    return Ok(Served::Continue);
                };
                // Complete the pending access while the page is held.
                let held = node.acquire(page, want, slot)?;
                let claimed = held.claimed;
                let flushed = complete(node, vcpu, addr, write);
                node.release(held, page);
                served(node, id, &remote, t0.elapsed(), claimed);
                match after(id, flushed?)? {
                    Some(next) => {
                        how = next;
                        fragment += 1;
                    }
                    None => return Ok(Served::Continue),
                }
            }
            Decision::MoveVcpu => {
                let guard = node.pages.lock(page);
                if node.pages.state(page).0.allows(want) {
                    // It arrived meanwhile (another thread brought it): the fault is
                    // served by that page move; go round and use it here.
                    drop(guard);
                    served(node, id, &remote, t0.elapsed(), false);
                    continue;
                }
                let t = Instant::now();
                let state = vcpu.capture().map_err(|source| Error::VcpuCall {
                    vcpu: id,
                    call: "capturing its state",
                    source,
                })?;
                node.sample(Sample::Capture, t.elapsed());
                remote.rip = state.regs.rip;
                shipped(node, id, &remote, t0.elapsed(), t.elapsed());
                if how.pending().is_some() {
                    // Flush the stale access while the page cannot arrive here.
                    flush_stale(vcpu, state.regs.rip)?;
                }
                drop(guard);
                ship(node, id, page, remote.holder, fault_ns, &ctx.history, state);
                return Ok(Served::Moved);
            }
        }
    }
}

/// Pages with the access an instruction makes to each.
type Needs = Vec<(u64, Access)>;

/// The pages (in coherent guest RAM) the faulting instruction needs, in order, with the
/// access it makes to each; and its RIP where finding them needed it.
fn needs(
    node: &Node,
    vcpu: &Vcpu,
    slot: &Arc<Slot>,
    how: Detected,
) -> Result<(Option<u64>, Needs), Error> {
    let id = vcpu.id();
    let coherent = |page: u64| node.pages.coherent(page);
    Ok(match how {
        Detected::Mmio { addr, write, len } => {
            let page = check_page(node, id, addr, len)?;
            let want = if write { Access::Write } else { Access::Read };
            (None, vec![(page, want)])
        }
        Detected::MemoryFault { addr } => {
            // The exit does not say which access: a page held but not mapped (never
            // touched, or armed by the sampler) is mapped back as it is held; anything
            // else is taken as a write, which needs the most (a read would not fault).
            let page = check_page(node, id, addr, 1)?;
            let want = {
                let _g = node.pages.lock(page);
                match node.pages.state(page) {
                    (state, false) if state != PageState::Invalid => Access::Read,
                    _ => Access::Write,
                }
            };
            (None, vec![(page, want)])
        }
        Detected::Fetch => {
            let rip = read_rip(vcpu)?;
            let mut pages = vec![rip / PAGE];
            if (rip + 15) / PAGE != rip / PAGE {
                pages.push((rip + 15) / PAGE);
            }
            let pages = pages
                .into_iter()
                .filter(|&p| coherent(p))
                .map(|p| (p, Access::Execute))
                .collect();
            (Some(rip), pages)
        }
        Detected::Efault => {
            let regs = vcpu.exit_regs().map_err(|source| Error::VcpuCall {
                vcpu: id,
                call: "reading its registers",
                source,
            })?;
            let view = CoherentView { node, slot };
            let mut code = [0u8; 15];
            let n = (node.memory.size().saturating_sub(regs.rip)).min(15) as usize;
            view.read_bytes(regs.rip, &mut code[..n])
                .map_err(|source| Error::GuestMemory { vcpu: id, source })?;
            let accesses =
                decode::memory_accesses(&code[..n], &regs).map_err(|what| Error::Emulation {
                    vcpu: id,
                    rip: regs.rip,
                    what: format!("decoding a faulting instruction: {what}"),
                })?;
            let mut pages = Vec::new();
            for a in &accesses {
                let want = if a.write { Access::Write } else { Access::Read };
                for page in [a.addr / PAGE, (a.addr + a.len - 1) / PAGE] {
                    if coherent(page) && !pages.contains(&(page, want)) {
                        pages.push((page, want));
                    }
                }
            }
            (Some(regs.rip), pages)
        }
    })
}

/// RIP at the exit being served (from the run page where KVM can copy it, see
/// [`Vcpu::exit_regs`]).
fn read_rip(vcpu: &Vcpu) -> Result<u64, Error> {
    vcpu.exit_regs()
        .map(|r| r.rip)
        .map_err(|source| Error::VcpuCall {
            vcpu: vcpu.id(),
            call: "reading its registers",
            source,
        })
}

fn check_page(node: &Node, id: u32, addr: u64, len: usize) -> Result<u64, Error> {
    let page = addr / PAGE;
    if page < node.pages.first
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

/// A page this node held but had not mapped was mapped for the fault: a sample if the
/// sampler had armed it. The install is timed when it mapped one page (a sampled page's
/// 4 KiB copy, or a lone page of zeros): what a remote fault's requester does once the
/// page is here, trap to re-entry. First touches mapping a run of pages are not.
fn note_install(
    node: &Node,
    id: u32,
    page: u64,
    want: Access,
    rip: impl Into<Option<u64>>,
    mapped: Option<Populated>,
    t0: Instant,
) {
    match mapped {
        Some(Populated::Sampled { armed_ns }) => {
            node.sample(Sample::Install, t0.elapsed());
            note_sample(node, id, page, want, rip.into().unwrap_or(0), armed_ns)
        }
        Some(Populated::Zeros { pages: 1 }) => node.sample(Sample::Install, t0.elapsed()),
        Some(Populated::Zeros { .. }) | None => {}
    }
}

/// A remote fault: what the policy is told, and what the trace records.
struct Remote {
    page: u64,
    want: Access,
    /// The node believed to hold the page.
    holder: NodeId,
    rip: u64,
    /// Trace flags (`flags::*`).
    flags: u8,
}

impl Remote {
    /// Counts a remote fault on `page`, which this node holds as `state`.
    fn new(node: &Node, page: u64, want: Access, state: PageState, rip: u64, flags: u8) -> Self {
        node.metrics.remote_fault(want == Access::Write);
        let replica = if state == PageState::Shared {
            flags::HAD_REPLICA
        } else {
            0
        };
        Remote {
            page,
            want,
            holder: node.pages.hint(page),
            rip,
            flags: flags | replica,
        }
    }
}

pub(super) fn nanos(d: Duration) -> u32 {
    d.as_nanos().min(u32::MAX as u128) as u32
}

fn fault_event(node: &Node, id: u32, f: &Remote, decision: u8, service: Duration) {
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

/// A remote fault served by bringing the page (`claimed`: by a claim of fresh memory,
/// no data; sampled apart, as it costs a round trip without a page).
fn served(node: &Node, id: u32, f: &Remote, service: Duration, claimed: bool) {
    let kind = if claimed {
        Sample::Claim
    } else {
        Sample::FaultService
    };
    node.sample(kind, service);
    node.metrics.fault_service(service.as_secs_f64());
    if node.tracing() {
        fault_event(node, id, f, trace::DECISION_MOVE_PAGE, service);
    }
}

/// A remote fault served by sending the vCPU to the page: `service` from the fault exit
/// to the captured state, `capture` of which capturing it.
fn shipped(node: &Node, id: u32, f: &Remote, service: Duration, capture: Duration) {
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

/// Sends a captured vCPU to `holder`, the node the policy chose it to go to, with its
/// fault history (its policy's view of it goes along).
fn ship(
    node: &Node,
    id: u32,
    page: u64,
    holder: NodeId,
    fault_ns: u64,
    history: &History,
    state: VcpuState,
) {
    node.loads[holder as usize].fetch_add(1, Ordering::Relaxed);
    node.send(
        holder,
        Message::VcpuMove {
            vcpu: id,
            page,
            fault_ns,
            clock_ns: node.clock_ns(),
            // This vCPU still counts here until its thread sees it moved.
            sender_vcpus: node.resident.load(Ordering::Relaxed).saturating_sub(1),
            history: history.encode(),
            state: state.encode(),
        },
    );
}

/// Asks the policy, unless a rule decides (then the fault is flagged `FORCED`): `forced`
/// (a progress rule of the caller), the holder is this node, or the page is this vCPU's
/// own stack. A vCPU's stack is private to it, so it follows the vCPU: were it to stay
/// behind, a vCPU sent to its data would be sent back at its next push (under
/// `always-vcpu`, two moves per loop iteration, forever).
fn decide(node: &Node, ctx: &mut Ctx, id: u32, f: &mut Remote, forced: bool) -> Decision {
    let (page, holder) = (f.page, f.holder);
    let access = f.want;
    let ruled = forced || holder == node.me || node.pages.placement.stack_of(page) == Some(id);
    if ruled {
        f.flags |= flags::FORCED;
    }
    let decision = if ruled {
        Decision::MovePage
    } else {
        for (n, l) in ctx.loads.iter_mut().enumerate() {
            *l = if n == node.me as usize {
                node.resident.load(Ordering::Relaxed)
            } else {
                node.loads[n].load(Ordering::Relaxed)
            };
        }
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
            page_heat: node.pages.heat(page),
            history: &ctx.history,
            node_vcpus: &ctx.loads,
            cpus: node.cpus,
            link: node.link.get(),
        };
        let t = Instant::now();
        let d = match ctx.policy.as_mut() {
            Some(own) => own.decide(&fc),
            None => node
                .policy
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .decide(&fc),
        };
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

/// Lets KVM drop a pending access whose state was captured before it (the vCPU moves).
fn flush_stale(vcpu: &mut Vcpu, rip: u64) -> Result<(), Error> {
    for _ in 0..8 {
        match flush(vcpu)? {
            Flushed::Mmio { .. } => continue,
            Flushed::Done | Flushed::EmulationFailed => break,
            Flushed::Other(what) => {
                return Err(Error::Emulation {
                    vcpu: vcpu.id(),
                    rip,
                    what: format!("finishing a stale access ended with {what}"),
                })
            }
        }
    }
    Ok(())
}

/// What happens after an access was completed: done, or the instruction's next fragment.
fn after(id: u32, flushed: Flushed) -> Result<Option<Detected>, Error> {
    let failed = |what: String| Error::Emulation {
        vcpu: id,
        rip: 0,
        what,
    };
    match flushed {
        Flushed::Done => Ok(None),
        Flushed::Mmio { addr, write, len } => Ok(Some(Detected::Mmio { addr, write, len })),
        Flushed::EmulationFailed => Err(failed(
            "KVM could not finish an instruction whose page is present".into(),
        )),
        Flushed::Other(what) => Err(failed(format!("finishing an access ended with {what}"))),
    }
}
