//! A vCPU thread of a cluster node. Each node has a KVM vCPU object for every vCPU of
//! the guest; a vCPU runs on exactly one node at a time and its thread elsewhere waits
//! for it to arrive.
//!
//! Each exit is classified in [`step`]: hypercalls are executed here (futex calls and
//! console output go to node 0, the leader); the four kinds of fault exit go to the one
//! fault path (`fault`), which brings the page or sends the vCPU to it; a vCPU that
//! arrives from another node is restored in [`arrive`]. A node alone can pause: each
//! vCPU then parks at its next exit with its state captured.

use super::coherence::CoherentView;
use super::fault::{self, nanos, Ctx, Detected, Served};
use super::futex;
use super::leader::FutexOp;
use super::node::{monotonic_ns, Node};
use super::stats::Sample;
use super::wait::{Arrival, Slot};
use crate::hypercall::{self, result_offset, Hypercall};
use crate::hypercall::{le_value, HypercallError};
use crate::kvm::{Exit, Vcpu, VcpuState};
use crate::memory::GuestRead;
use crate::Error;
use flotilla_abi::errno;
use flotilla_placement::History;
use flotilla_telemetry::metrics::Direction;
use flotilla_telemetry::trace::EventKind;
use flotilla_transport::{wire::CONSOLE_CHUNK_BYTES, Message};
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

pub(super) fn vcpu_thread(node: Arc<Node>, mut vcpu: Vcpu, here: bool, cpu: Option<usize>) {
    let id = vcpu.id();
    if let Some(cpu) = cpu {
        if let Err(source) = crate::affinity::confine_thread(&[cpu]) {
            node.fail(Error::Thread {
                what: "vCPU (pinning it)",
                source,
            });
            return;
        }
    }
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
        loads: vec![0; node.nodes as usize],
        policy: node.policy.lock().unwrap_or_else(|p| p.into_inner()).fork(),
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
            // The policy sees the vCPU as it was on the sender, not as it last was here.
            ctx.history = arrival.history.clone();
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
        Fault(Detected),
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
            let at = hypercall::Whereabouts {
                vcpu: id,
                vcpus: node.vcpus,
                node: u32::from(node.me),
                nodes: u32::from(node.nodes),
            };
            if hypercall::answer_in(port, data, at) {
                What::Nothing
            } else {
                What::In(port)
            }
        }
        // The four ways a fault comes back on this host (docs/host-kvm.md).
        Exit::Mmio { addr, write, len } => What::Fault(Detected::Mmio { addr, write, len }),
        Exit::MemoryFault { addr, .. } => What::Fault(Detected::MemoryFault { addr }),
        Exit::WriteFault => What::Fault(Detected::Efault),
        Exit::InternalError { suberror: 1 } => What::Fault(Detected::Fetch),
        Exit::Interrupted => What::Nothing,
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
        What::Fault(how) => Ok(match fault::serve(node, vcpu, ctx, slot, how)? {
            Served::Continue => Flow::Continue,
            Served::Moved => Flow::Moved,
        }),
        What::Shutdown => Err(triple_fault(node, vcpu)),
        What::Unhandled(exit) => Err(Error::UnhandledExit {
            vcpu: id,
            rip: rip(vcpu),
            exit,
        }),
    }
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
                futex_wait(node, slot, id, addr, expected, timeout_ns);
                slot.wait_futex(&node.stop).ok_or_else(stopped)?
            };
            view.write_bytes(block + result_offset::FUTEX_WAIT, &result.to_le_bytes())
                .map_err(mem_err)?;
        }
        Hypercall::FutexWake { block, addr, count } => {
            let result = if !hypercall::futex_word_ok(addr) {
                -errno::EINVAL
            } else {
                futex_wake(node, slot, id, addr, count);
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

/// FUTEX_WAIT: on node 0 applied here, elsewhere sent to node 0. The result comes to the
/// vCPU's slot either way.
fn futex_wait(node: &Node, slot: &Arc<Slot>, vcpu: u32, addr: u64, expected: u32, timeout_ns: u64) {
    if node.leader.is_none() {
        node.to_leader(Message::FutexWait {
            vcpu,
            addr,
            expected,
            timeout_ns,
        });
        return;
    }
    let op = FutexOp::Wait {
        from: node.me,
        vcpu,
        addr,
        expected,
        timeout_ns,
    };
    futex::run(node, op, slot);
}

/// FUTEX_WAKE, the same way.
fn futex_wake(node: &Node, slot: &Arc<Slot>, vcpu: u32, addr: u64, count: u32) {
    if node.leader.is_none() {
        node.to_leader(Message::FutexWake { vcpu, addr, count });
        return;
    }
    let op = FutexOp::Wake {
        from: node.me,
        vcpu,
        addr,
        count,
    };
    futex::run(node, op, slot);
}

/// A triple fault: a stack overflow if the guest's last page fault was on a guard page.
fn triple_fault(node: &Node, vcpu: &Vcpu) -> Error {
    let (id, rip) = (vcpu.id(), vcpu.rip().unwrap_or(0));
    let placement = &node.pages.placement;
    match vcpu.cr2() {
        Ok(addr) => match placement.guard_of(addr / crate::cluster::uffd::PAGE) {
            Some(owner) => Error::StackOverflow {
                vcpu: id,
                whose: if owner == id {
                    "its".into()
                } else {
                    format!("vCPU {owner}'s")
                },
                addr,
                rip,
                stack_bytes: placement.stack_bytes(),
            },
            None => Error::TripleFault { vcpu: id, rip },
        },
        Err(_) => Error::TripleFault { vcpu: id, rip },
    }
}
