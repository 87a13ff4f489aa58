//! The cluster's one futex table, on node 0's futex thread.
//!
//! FUTEX_WAIT reads the guest's futex word coherently on that thread before queueing the
//! waiter, and wakes are handled in arrival order on the same thread, so a wake that
//! follows the guest's store to the word can never be lost between the check and the
//! sleep (the guest's store is ordered before its wake message, and the coherent read
//! sees every store before it). A thread of its own, because the coherent read may have
//! to fetch the page, which a transport thread must never wait for.

use super::coherence::CoherentView;
use super::leader::{FutexOp, Leader};
use super::node::Node;
use super::wait::Slot;
use super::{NodeId, POLL};
use crate::memory::GuestRead;
use crate::Error;
use flotilla_abi::errno;
use flotilla_transport::Message;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A vCPU asleep in FUTEX_WAIT.
struct Waiter {
    vcpu: u32,
    node: NodeId,
    addr: u64,
    deadline: Option<Instant>,
}

/// Starts node 0's futex thread.
pub(super) fn start(
    leader: &Leader,
    node: Arc<Node>,
) -> Result<std::thread::JoinHandle<()>, Error> {
    let rx = leader
        .futex_rx
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
        .ok_or_else(|| Error::Config("the futex thread started twice".into()))?;
    std::thread::Builder::new()
        .name("futex".into())
        .spawn(move || futex_loop(&node, rx))
        .map_err(|source| Error::Thread {
            what: "futex",
            source,
        })
}

fn futex_loop(node: &Node, rx: mpsc::Receiver<FutexOp>) {
    let Some(leader) = &node.leader else { return };
    let slot = Arc::new(Slot::default());
    let view = CoherentView { node, slot: &slot };
    let mut waiters: Vec<Waiter> = Vec::new();
    let mut held = false;
    let reply = |to: NodeId, vcpu: u32, result: i32| {
        node.send(to, Message::FutexResult { vcpu, result });
    };
    loop {
        if node.stop.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        // Expire timed waits.
        waiters.retain(|w| match w.deadline {
            Some(d) if d <= now => {
                reply(w.node, w.vcpu, -errno::ETIMEDOUT);
                false
            }
            _ => true,
        });
        let wait = waiters
            .iter()
            .filter_map(|w| w.deadline)
            .min()
            .map_or(POLL, |d| d.saturating_duration_since(now).min(POLL));
        let op = match rx.recv_timeout(wait) {
            Ok(op) => op,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        match op {
            FutexOp::Wait {
                from,
                vcpu,
                addr,
                expected,
                timeout_ns,
            } => {
                let word = if addr % 4 == 0 {
                    view.read_pod::<u32>(addr)
                } else {
                    Err(crate::memory::MemoryError::Misaligned { addr, align: 4 })
                };
                match word {
                    Err(_) => reply(from, vcpu, -errno::EINVAL),
                    Ok(w) if w != expected => reply(from, vcpu, -errno::EAGAIN),
                    Ok(_) if held => reply(from, vcpu, 0),
                    Ok(_) => {
                        let deadline = (timeout_ns > 0)
                            .then(|| Instant::now() + Duration::from_nanos(timeout_ns));
                        waiters.push(Waiter {
                            vcpu,
                            node: from,
                            addr,
                            deadline,
                        });
                    }
                }
            }
            FutexOp::Wake {
                from,
                vcpu,
                addr,
                count,
            } => {
                let mut woken = 0u32;
                waiters.retain(|w| {
                    if woken < count && w.addr == addr {
                        reply(w.node, w.vcpu, 0);
                        woken += 1;
                        false
                    } else {
                        true
                    }
                });
                reply(from, vcpu, woken.min(i32::MAX as u32) as i32);
            }
            FutexOp::Recheck => {}
            FutexOp::Hold(on) => {
                held = on;
                if on {
                    for w in waiters.drain(..) {
                        reply(w.node, w.vcpu, 0);
                    }
                }
            }
        }
        let forever = waiters.iter().filter(|w| w.deadline.is_none()).count() as u32;
        if forever > 0 && forever + leader.returned() == node.vcpus {
            let (vcpu, addr) = waiters.last().map_or((0, 0), |w| (w.vcpu, w.addr));
            leader.finish(Err(Error::Deadlock { vcpu, addr }));
        }
    }
}
