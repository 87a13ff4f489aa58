//! Node 0's part of a run: it gathers what makes the outcome (console output, the
//! reported value, returned vCPUs, EXIT, the first error from any node), hands futex
//! calls to the cluster's one futex table (`futex`), and at the end collects every
//! node's counters.

use super::POLL;
use super::{ClusterOutcome, NodeId};
use crate::Error;
use flotilla_abi::errno;
use flotilla_transport::{Message, NodeStats, Samples};
use std::io::Write as _;

/// Most console output kept in a run's outcome.
pub const CONSOLE_MAX_BYTES: usize = 1 << 20;
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// An operation on the futex table.
pub(super) enum FutexOp {
    Wait {
        from: NodeId,
        vcpu: u32,
        addr: u64,
        expected: u32,
        timeout_ns: u64,
    },
    Wake {
        from: NodeId,
        vcpu: u32,
        addr: u64,
        count: u32,
    },
    /// A vCPU returned: maybe every other one is asleep for good.
    Recheck,
    /// While held (a pause), waits return at once as if woken; holding wakes every waiter.
    Hold(bool),
}

/// A vCPU asleep in FUTEX_WAIT.
struct Waiter {
    vcpu: u32,
    node: NodeId,
    addr: u64,
    deadline: Option<Instant>,
}

/// The cluster's one futex table. Pure: whoever applies an op (node 0's futex thread for
/// other nodes' vCPUs, or one of node 0's own vCPU threads; see `futex`) reads the word
/// and sends the replies, under the table's lock.
#[derive(Default)]
pub(super) struct FutexTable {
    waiters: Vec<Waiter>,
    /// A pause: waits return at once, as if woken.
    held: bool,
}

impl FutexTable {
    /// Applies `op`. `word(addr)` reads the futex word coherently (`None`: it cannot be
    /// read); `reply(node, vcpu, result)` answers a vCPU. Returns whether `op` queued a
    /// waiter with a deadline (the futex thread must then watch it).
    pub fn apply(
        &mut self,
        op: FutexOp,
        word: impl FnOnce(u64) -> Option<u32>,
        mut reply: impl FnMut(NodeId, u32, i32),
    ) -> bool {
        match op {
            FutexOp::Wait {
                from,
                vcpu,
                addr,
                expected,
                timeout_ns,
            } => match word(addr) {
                None => reply(from, vcpu, -errno::EINVAL),
                Some(w) if w != expected => reply(from, vcpu, -errno::EAGAIN),
                Some(_) if self.held => reply(from, vcpu, 0),
                Some(_) => {
                    let deadline =
                        (timeout_ns > 0).then(|| Instant::now() + Duration::from_nanos(timeout_ns));
                    self.waiters.push(Waiter {
                        vcpu,
                        node: from,
                        addr,
                        deadline,
                    });
                    return deadline.is_some();
                }
            },
            FutexOp::Wake {
                from,
                vcpu,
                addr,
                count,
            } => {
                let mut woken = 0u32;
                self.waiters.retain(|w| {
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
                self.held = on;
                if on {
                    for w in self.waiters.drain(..) {
                        reply(w.node, w.vcpu, 0);
                    }
                }
            }
        }
        false
    }

    /// Answers the timed waits whose deadline has passed.
    pub fn expire(&mut self, now: Instant, mut reply: impl FnMut(NodeId, u32, i32)) {
        self.waiters.retain(|w| match w.deadline {
            Some(d) if d <= now => {
                reply(w.node, w.vcpu, -errno::ETIMEDOUT);
                false
            }
            _ => true,
        });
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.waiters.iter().filter_map(|w| w.deadline).min()
    }

    /// The last waiter, if every one of `vcpus` that has not returned waits forever.
    pub fn deadlock(&self, vcpus: u32, returned: u32) -> Option<(u32, u64)> {
        let forever = self.waiters.iter().filter(|w| w.deadline.is_none()).count() as u32;
        (forever > 0 && forever + returned == vcpus)
            .then(|| self.waiters.last().map_or((0, 0), |w| (w.vcpu, w.addr)))
    }
}

#[derive(Default)]
struct State {
    result: Option<Result<i32, Error>>,
    ended: Option<Instant>,
    returned: Vec<Option<i32>>,
    report: Option<u64>,
    console: Vec<u8>,
    console_truncated: bool,
    stats: Vec<Option<(NodeStats, Samples)>>,
    /// Nodes whose link was lost: their counters will not come.
    lost: Vec<bool>,
}

pub(super) struct Leader {
    state: Mutex<State>,
    changed: Condvar,
    futex_table: Mutex<FutexTable>,
    /// Ops for the futex thread (from other nodes' vCPUs).
    futex: Mutex<mpsc::Sender<FutexOp>>,
    /// Taken by the futex thread; ops sent before it starts wait in the channel.
    pub(super) futex_rx: Mutex<Option<mpsc::Receiver<FutexOp>>>,
    /// Also write the guest's fd 1 to stdout and fd 2 to stderr as they arrive.
    forward_console: bool,
}

impl Leader {
    pub fn new(vcpus: u32, nodes: u16, forward_console: bool) -> Self {
        let (tx, rx) = mpsc::channel();
        Leader {
            state: Mutex::new(State {
                returned: vec![None; vcpus as usize],
                stats: vec![None; nodes as usize],
                lost: vec![false; nodes as usize],
                ..Default::default()
            }),
            changed: Condvar::new(),
            futex_table: Mutex::new(FutexTable::default()),
            futex: Mutex::new(tx),
            futex_rx: Mutex::new(Some(rx)),
            forward_console,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the run with `result` unless it already ended.
    pub fn finish(&self, result: Result<i32, Error>) {
        let mut s = self.state();
        if s.result.is_none() {
            if let Err(e) = &result {
                tracing::debug!(error = %e, "run ends with an error");
            }
            s.result = Some(result);
            s.ended = Some(Instant::now());
        }
        drop(s);
        self.changed.notify_all();
    }

    pub fn ended(&self) -> bool {
        self.state().result.is_some()
    }

    /// Starts from a snapshot's progress: vCPUs that had returned, the reported value.
    pub fn resume(&self, returned: &[Option<i32>], report: Option<u64>) {
        let mut s = self.state();
        s.returned = returned.to_vec();
        s.report = report;
    }

    /// Ends the run if every vCPU has returned already (a restored snapshot).
    pub fn all_returned(&self) {
        let s = self.state();
        if s.returned.iter().all(Option::is_some) {
            let code = s.returned.first().copied().flatten().unwrap_or(0);
            drop(s);
            self.finish(Ok(code));
        }
    }

    pub fn returned_list(&self) -> Vec<Option<i32>> {
        self.state().returned.clone()
    }

    pub fn report(&self) -> Option<u64> {
        self.state().report
    }

    pub fn futex_table(&self) -> MutexGuard<'_, FutexTable> {
        self.futex_table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `op` to the futex thread.
    pub fn futex_op(&self, op: FutexOp) {
        let _ = self
            .futex
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(op);
    }

    pub fn handle(&self, from: NodeId, msg: Message) -> Result<(), Error> {
        match msg {
            Message::Console { fd, bytes } => {
                if self.forward_console {
                    let _ = if fd == 2 {
                        std::io::stderr().lock().write_all(&bytes)
                    } else {
                        std::io::stdout().lock().write_all(&bytes)
                    };
                }
                let mut s = self.state();
                let room = CONSOLE_MAX_BYTES.saturating_sub(s.console.len());
                let n = bytes.len().min(room);
                s.console.extend_from_slice(&bytes[..n]);
                s.console_truncated |= n < bytes.len();
            }
            Message::Report { value } => self.state().report = Some(value),
            Message::VcpuReturned { vcpu, code } => {
                let mut s = self.state();
                let slot = s
                    .returned
                    .get_mut(vcpu as usize)
                    .ok_or_else(|| Error::Protocol {
                        from,
                        what: format!("the return of vCPU {vcpu}; there is no such vCPU"),
                    })?;
                *slot = Some(code);
                if s.returned.iter().all(Option::is_some) {
                    let code = s.returned[0].unwrap_or(code);
                    drop(s);
                    self.finish(Ok(code));
                } else {
                    drop(s);
                    self.futex_op(FutexOp::Recheck);
                }
            }
            Message::Exit { code } => self.finish(Ok(code)),
            Message::Fatal { text } => self.finish(Err(Error::Remote(text))),
            Message::Stats { stats, samples } => self.record_stats(from, stats, samples),
            Message::FutexWait {
                vcpu,
                addr,
                expected,
                timeout_ns,
            } => self.futex_op(FutexOp::Wait {
                from,
                vcpu,
                addr,
                expected,
                timeout_ns,
            }),
            Message::FutexWake { vcpu, addr, count } => self.futex_op(FutexOp::Wake {
                from,
                vcpu,
                addr,
                count,
            }),
            other => {
                return Err(Error::Protocol {
                    from,
                    what: format!("{} to node 0, which does not take it", other.name()),
                })
            }
        }
        Ok(())
    }

    /// Waits for the end of the run (or the timeout, which ends it).
    pub fn wait_end(&self, timeout: Option<Duration>, started: Instant) {
        let mut s = self.state();
        loop {
            if s.result.is_some() {
                return;
            }
            match timeout {
                Some(limit) if started.elapsed() >= limit => {
                    drop(s);
                    self.finish(Err(Error::Timeout(limit)));
                    s = self.state();
                }
                _ => {
                    s = self
                        .changed
                        .wait_timeout(s, POLL)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            }
        }
    }

    pub fn record_stats(&self, from: NodeId, stats: NodeStats, samples: Samples) {
        let mut s = self.state();
        if let Some(slot) = s.stats.get_mut(from as usize) {
            *slot = Some((stats, samples));
        }
        drop(s);
        self.changed.notify_all();
    }

    /// Notes that the link to `node` is gone, so its counters will not arrive.
    pub fn lost(&self, node: NodeId) {
        if let Some(l) = self.state().lost.get_mut(node as usize) {
            *l = true;
        }
        self.changed.notify_all();
    }

    /// Waits until every node that is still connected sent its stats, at most `limit`.
    pub fn wait_stats(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut s = self.state();
        let pending = |s: &State| (0..s.stats.len()).any(|n| s.stats[n].is_none() && !s.lost[n]);
        while pending(&s) && Instant::now() < deadline {
            s = self
                .changed
                .wait_timeout(s, POLL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub fn wall(&self, started: Instant) -> Duration {
        self.state().ended.unwrap_or_else(Instant::now) - started
    }

    /// The run's outcome, once it has ended (taken: the next call has no result).
    pub fn outcome(&self, wall: Duration) -> ClusterOutcome {
        let mut s = self.state();
        let result = s.result.take().unwrap_or(Ok(0));
        let mut totals = NodeStats::default();
        let mut samples = Samples::default();
        let mut per_node = Vec::new();
        for (node, entry) in s.stats.iter().enumerate() {
            let Some((st, sm)) = entry else {
                tracing::warn!(node, "no counters from node");
                per_node.push(None);
                continue;
            };
            totals.add(st);
            samples.extend(sm);
            per_node.push(Some(*st));
        }
        ClusterOutcome {
            result,
            report: s.report,
            console: std::mem::take(&mut s.console),
            console_truncated: s.console_truncated,
            wall,
            totals,
            per_node,
            samples,
        }
    }

    pub(super) fn returned(&self) -> u32 {
        self.state().returned.iter().filter(|r| r.is_some()).count() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(from: NodeId, vcpu: u32, addr: u64, expected: u32, timeout_ns: u64) -> FutexOp {
        FutexOp::Wait {
            from,
            vcpu,
            addr,
            expected,
            timeout_ns,
        }
    }

    /// Applies `op` with the word reading `word`; returns the replies.
    fn apply(t: &mut FutexTable, op: FutexOp, word: Option<u32>) -> Vec<(NodeId, u32, i32)> {
        let mut out = Vec::new();
        t.apply(op, |_| word, |n, v, r| out.push((n, v, r)));
        out
    }

    #[test]
    fn waits_check_the_word_and_wakes_take_waiters_in_order() {
        let mut t = FutexTable::default();
        assert_eq!(
            apply(&mut t, wait(1, 0, 64, 7, 0), Some(8)),
            [(1, 0, -errno::EAGAIN)]
        );
        assert_eq!(
            apply(&mut t, wait(1, 0, 64, 7, 0), None),
            [(1, 0, -errno::EINVAL)]
        );
        assert!(apply(&mut t, wait(1, 0, 64, 7, 0), Some(7)).is_empty());
        assert!(apply(&mut t, wait(0, 1, 64, 7, 0), Some(7)).is_empty());
        assert!(apply(&mut t, wait(2, 2, 128, 7, 0), Some(7)).is_empty());
        let wake = FutexOp::Wake {
            from: 0,
            vcpu: 3,
            addr: 64,
            count: 1,
        };
        // The first waiter on the word, then the waker's own count.
        assert_eq!(apply(&mut t, wake, None), [(1, 0, 0), (0, 3, 1)]);
        let wake_all = FutexOp::Wake {
            from: 0,
            vcpu: 3,
            addr: 64,
            count: u32::MAX,
        };
        assert_eq!(apply(&mut t, wake_all, None), [(0, 1, 0), (0, 3, 1)]);
        // vCPU 2 still waits on another word: with 3 of 4 vCPUs returned, a deadlock.
        assert_eq!(t.deadlock(4, 2), None);
        assert_eq!(t.deadlock(4, 3), Some((2, 128)));
    }

    #[test]
    fn timed_waits_expire_and_a_hold_wakes_everyone() {
        let mut t = FutexTable::default();
        let mut none = |_: NodeId, _: u32, _: i32| {};
        assert!(t.apply(wait(1, 0, 64, 0, 1_000_000), |_| Some(0), &mut none));
        assert!(!t.apply(wait(1, 1, 64, 0, 0), |_| Some(0), &mut none));
        assert_eq!(t.deadlock(2, 0), None, "a timed waiter can still wake");
        let mut out = Vec::new();
        t.expire(Instant::now() + Duration::from_secs(1), |n, v, r| {
            out.push((n, v, r))
        });
        assert_eq!(out, [(1, 0, -errno::ETIMEDOUT)]);
        assert!(t.next_deadline().is_none());
        assert_eq!(apply(&mut t, FutexOp::Hold(true), None), [(1, 1, 0)]);
        // Held: a wait returns at once, as if woken.
        assert_eq!(apply(&mut t, wait(1, 1, 64, 0, 0), Some(0)), [(1, 1, 0)]);
        apply(&mut t, FutexOp::Hold(false), None);
        assert!(apply(&mut t, wait(1, 1, 64, 0, 0), Some(0)).is_empty());
    }
}
