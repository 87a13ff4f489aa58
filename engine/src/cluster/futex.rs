//! Who runs the cluster's one futex table (`leader::FutexTable`): node 0's own vCPU
//! threads run their calls themselves; other nodes' calls arrive as messages, which a
//! transport thread hands to node 0's futex thread.
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
use flotilla_transport::Message;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::Instant;

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

/// Applies `op` to the futex table on this thread: node 0's futex thread, or one of node
/// 0's own vCPU threads (which may wait for the word's page; its futex calls then cost
/// no thread switch). `slot` is the calling thread's, for reading the word.
pub(super) fn run(node: &Node, op: FutexOp, slot: &Arc<Slot>) {
    let Some(leader) = &node.leader else { return };
    let view = CoherentView { node, slot };
    let word = |addr: u64| {
        if addr.is_multiple_of(4) {
            view.read_pod::<u32>(addr).ok()
        } else {
            None
        }
    };
    let reply = |to: NodeId, vcpu: u32, result: i32| {
        node.send(to, Message::FutexResult { vcpu, result });
    };
    // The word is read and the waiter queued under the table's lock, so no wake falls
    // between the two (see the module documentation).
    let mut table = leader.futex_table();
    let timed = table.apply(op, word, reply);
    let deadlock = table.deadlock(node.vcpus, leader.returned());
    drop(table);
    if timed {
        // The futex thread watches deadlines: make it look at this one.
        leader.futex_op(FutexOp::Recheck);
    }
    if let Some((vcpu, addr)) = deadlock {
        leader.finish(Err(Error::Deadlock { vcpu, addr }));
    }
}

fn futex_loop(node: &Node, rx: mpsc::Receiver<FutexOp>) {
    let Some(leader) = &node.leader else { return };
    let slot = Arc::new(Slot::default());
    loop {
        if node.stop.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        let wait = {
            let mut table = leader.futex_table();
            table.expire(now, |to, vcpu, result| {
                node.send(to, Message::FutexResult { vcpu, result })
            });
            table
                .next_deadline()
                .map_or(POLL, |d| d.saturating_duration_since(now).min(POLL))
        };
        match rx.recv_timeout(wait) {
            Ok(op) => run(node, op, &slot),
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}
