//! Futex-style wait/wake on guest-physical addresses, for the FUTEX_WAIT and FUTEX_WAKE
//! hypercalls. A waiting vCPU blocks its host thread (not the guest in `hlt`), so the
//! engine can always interrupt it: for a pause, for the end of the run, or because
//! every live vCPU is waiting with no timeout, which is a guest deadlock.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// Woken by a FUTEX_WAKE.
    Woken,
    /// The word no longer held the expected value; the vCPU did not sleep.
    ValueChanged,
    TimedOut,
    /// The engine interrupted the wait (pause or end of run); the guest sees a spurious
    /// wake-up, which futex semantics allow.
    Interrupted,
    /// Every live vCPU is now waiting without a timeout: nobody can ever wake them.
    Deadlock,
}

struct Table {
    queues: HashMap<u64, VecDeque<u32>>,
    woken: Vec<bool>,
    /// Per vCPU: waiting without a timeout and not yet woken or interrupted.
    forever: Vec<bool>,
    /// Number of `true` entries in `forever`. A woken vCPU stops counting at once, not
    /// when its thread next runs, or a waker that waits right after would see a
    /// deadlock that is not there.
    waiting_forever: u32,
    /// vCPUs still running guest code (not returned).
    live: u32,
    /// Bumped by `interrupt_all`; a waiter that sees it change stops waiting.
    epoch: u64,
    /// Set from `interrupt_all` until `release`: new waits return at once.
    held: bool,
}

impl Table {
    fn stop_counting(&mut self, vcpu: u32) {
        if std::mem::take(&mut self.forever[vcpu as usize]) {
            self.waiting_forever -= 1;
        }
    }
}

/// The futex wait queues of one guest.
pub struct FutexTable {
    table: Mutex<Table>,
    wakeups: Vec<Condvar>,
}

impl FutexTable {
    pub fn new(vcpus: u32) -> Self {
        FutexTable {
            table: Mutex::new(Table {
                queues: HashMap::new(),
                woken: vec![false; vcpus as usize],
                forever: vec![false; vcpus as usize],
                waiting_forever: 0,
                live: vcpus,
                epoch: 0,
                held: false,
            }),
            wakeups: (0..vcpus).map(|_| Condvar::new()).collect(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Blocks `vcpu` on `addr` while `still_expected()` holds (checked under the table
    /// lock, so a wake that follows the guest's store cannot be missed).
    pub fn wait(
        &self,
        vcpu: u32,
        addr: u64,
        still_expected: impl FnOnce() -> bool,
        timeout: Option<Duration>,
    ) -> WaitOutcome {
        let mut t = self.lock();
        if !still_expected() {
            return WaitOutcome::ValueChanged;
        }
        if t.held {
            return WaitOutcome::Interrupted;
        }
        let deadline = timeout.map(|d| Instant::now() + d);
        if deadline.is_none() {
            if t.waiting_forever + 1 >= t.live {
                return WaitOutcome::Deadlock;
            }
            t.waiting_forever += 1;
            t.forever[vcpu as usize] = true;
        }
        let epoch = t.epoch;
        t.woken[vcpu as usize] = false;
        t.queues.entry(addr).or_default().push_back(vcpu);
        let outcome = loop {
            if t.woken[vcpu as usize] {
                break WaitOutcome::Woken;
            }
            if t.epoch != epoch {
                break WaitOutcome::Interrupted;
            }
            t = match deadline {
                None => self.wakeups[vcpu as usize]
                    .wait(t)
                    .unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break WaitOutcome::TimedOut;
                    }
                    self.wakeups[vcpu as usize]
                        .wait_timeout(t, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        };
        if outcome != WaitOutcome::Woken {
            if let Some(q) = t.queues.get_mut(&addr) {
                q.retain(|&v| v != vcpu);
                if q.is_empty() {
                    t.queues.remove(&addr);
                }
            }
        }
        t.stop_counting(vcpu);
        outcome
    }

    /// Wakes at most `count` vCPUs waiting on `addr`, oldest first; returns how many.
    pub fn wake(&self, addr: u64, count: u32) -> u32 {
        let mut t = self.lock();
        let mut woken = 0;
        while woken < count {
            let Some(vcpu) = t.queues.get_mut(&addr).and_then(|q| q.pop_front()) else {
                break;
            };
            t.woken[vcpu as usize] = true;
            t.stop_counting(vcpu);
            self.wakeups[vcpu as usize].notify_one();
            woken += 1;
        }
        if t.queues.get(&addr).is_some_and(|q| q.is_empty()) {
            t.queues.remove(&addr);
        }
        woken
    }

    /// Interrupts every current wait, and makes new waits return at once until
    /// [`FutexTable::release`] (pause, end of run).
    pub fn interrupt_all(&self) {
        let mut t = self.lock();
        t.epoch += 1;
        t.held = true;
        for vcpu in 0..t.forever.len() as u32 {
            t.stop_counting(vcpu);
        }
        for cv in &self.wakeups {
            cv.notify_all();
        }
    }

    /// Lets waits block again after [`FutexTable::interrupt_all`].
    pub fn release(&self) {
        self.lock().held = false;
    }

    /// A vCPU finished; returns true if every remaining live vCPU now waits forever.
    pub fn vcpu_finished(&self) -> bool {
        let mut t = self.lock();
        t.live = t.live.saturating_sub(1);
        t.live > 0 && t.waiting_forever >= t.live
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn wake_releases_a_waiter_and_value_changes_are_seen() {
        let table = Arc::new(FutexTable::new(2));
        let word = Arc::new(AtomicU32::new(0));
        let (t2, w2) = (Arc::clone(&table), Arc::clone(&word));
        let waiter =
            std::thread::spawn(move || t2.wait(1, 0x1000, || w2.load(Ordering::SeqCst) == 0, None));
        while table.wake(0x1000, 1) == 0 {
            std::thread::yield_now();
        }
        assert_eq!(waiter.join().unwrap(), WaitOutcome::Woken);
        word.store(1, Ordering::SeqCst);
        assert_eq!(
            table.wait(0, 0x1000, || word.load(Ordering::SeqCst) == 0, None),
            WaitOutcome::ValueChanged
        );
        assert_eq!(
            table.wait(0, 0x1000, || true, Some(Duration::from_millis(5))),
            WaitOutcome::TimedOut
        );
    }

    #[test]
    fn everyone_waiting_forever_is_a_deadlock() {
        let table = FutexTable::new(1);
        assert_eq!(table.wait(0, 0x40, || true, None), WaitOutcome::Deadlock);
        let table = FutexTable::new(2);
        assert!(!table.vcpu_finished());
        assert_eq!(table.wait(1, 0x40, || true, None), WaitOutcome::Deadlock);
    }

    #[test]
    fn a_woken_waiter_no_longer_counts_as_blocked() {
        let table = Arc::new(FutexTable::new(2));
        let t1 = Arc::clone(&table);
        let first = std::thread::spawn(move || t1.wait(1, 0x40, || true, None));
        while table.wake(0x40, 1) == 0 {
            std::thread::yield_now();
        }
        // vCPU 1 is woken but its thread may not have run yet: vCPU 0 waiting now is
        // not a deadlock.
        let t0 = Arc::clone(&table);
        let second = std::thread::spawn(move || t0.wait(0, 0x80, || true, None));
        assert_eq!(first.join().unwrap(), WaitOutcome::Woken);
        while table.wake(0x80, 1) == 0 && !second.is_finished() {
            std::thread::yield_now();
        }
        assert_eq!(second.join().unwrap(), WaitOutcome::Woken);
    }

    #[test]
    fn interrupt_releases_waiters() {
        let table = Arc::new(FutexTable::new(2));
        let t2 = Arc::clone(&table);
        let waiter =
            std::thread::spawn(move || t2.wait(1, 0x80, || true, Some(Duration::from_secs(30))));
        while !waiter.is_finished() {
            table.interrupt_all();
            table.release();
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(waiter.join().unwrap(), WaitOutcome::Interrupted);
        table.interrupt_all();
        assert_eq!(
            table.wait(0, 0x80, || true, None),
            WaitOutcome::Interrupted,
            "held: no new waits"
        );
    }
}
