//! Where threads wait: a [`Slot`] per vCPU thread (for a page, a futex result or its own
//! arrival from another node) and the [`PauseGate`] of a node alone.

use super::POLL;
use crate::kvm::VcpuState;
use flotilla_transport::{Access, NodeId};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// What a vCPU that is not running here is waiting for.
pub(super) struct Arrival {
    pub from: NodeId,
    pub page: u64,
    pub fault_ns: u64,
    pub clock_ns: u64,
    /// The vCPU's fault history as its policy saw it on the sender.
    pub history: flotilla_placement::History,
    pub state: Vec<u8>,
}

#[derive(Default)]
pub(super) struct Inbox {
    pub woken: bool,
    /// With `woken`: the page came by a claim of fresh memory (no data travelled).
    pub claimed: bool,
    pub arrival: Option<Arrival>,
    pub futex: Option<i32>,
}

/// Where one thread waits: for a page, a futex result, or (vCPUs) its own arrival. A
/// waiter sleeps at once: polling first did not shorten a remote fault here (TCP or shm,
/// measured with 0, 50 and 200 µs of polling; 200 µs made it twice as slow on 2 cores),
/// and on a node pinned to one CPU it takes that CPU from the thread bringing the answer.
#[derive(Default)]
pub(super) struct Slot {
    inbox: Mutex<Inbox>,
    cond: Condvar,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn update(&self, f: impl FnOnce(&mut Inbox)) {
        f(&mut self.lock());
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

/// Pausing a node alone: its vCPUs park at their next exit with their state captured.
pub(super) struct PauseGate {
    requested: AtomicBool,
    parked: Mutex<Vec<Option<VcpuState>>>,
    changed: Condvar,
}

impl PauseGate {
    pub fn new(vcpus: u32) -> Self {
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

/// The threads waiting for one page, and the access asked of its home.
#[derive(Default)]
pub(super) struct Waiting {
    pub in_flight: Option<Access>,
    /// The thread that asked does not hold the page: whoever installs it tells the home.
    pub done_at_install: bool,
    pub slots: Vec<Arc<Slot>>,
}
