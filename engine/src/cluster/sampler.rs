//! Sampled access tracking, after Linux NUMA balancing's hinting faults.
//!
//! A remote fault only shows the accesses the recording policy happened to make remote.
//! To replay a trace under another policy we also need what each vCPU touches locally.
//! Every [`TICK`] the sampler walks on through this node's pages (round-robin, as NUMA
//! balancing's scanner walks an address space) and *arms* the next `rate × TICK` pages
//! it holds and has mapped (the first ticks are shorter, 1 ms doubling up to `TICK`): it saves the contents, unmaps the page (userfaultfd makes it
//! missing again) and remembers it. The next guest access to an armed page traps like
//! any missing page; the fault path finds the saved copy, maps it back, and records an
//! `access_sample` event (vCPU, page, read or write, RIP, time since armed). Pages not
//! touched within a tick are mapped back at the start of the next one.
//!
//! Captured: the first access by any vCPU of this node to each armed page, per tick.
//! Not captured: later accesses in the same tick, instruction fetches (code pages are
//! never armed), pages this node does not hold (those show up as remote faults), pages
//! below the coherent range (boot structures), and the engine's own accesses (hypercall
//! buffers). Cost: arming one page is a write-protect (owned pages), a 4 KiB copy and
//! an unmap; a hit is one trap plus a map (the `bench trace-overhead` numbers).

use super::node::{monotonic_ns, Node};
use super::pages::{Armed, PageState};
use crate::cluster::uffd::PAGE;
use crate::Error;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How often the sampler arms a new batch of pages.
pub(super) const TICK: Duration = Duration::from_millis(10);
/// Pages examined per page armed, at most, so a node holding few pages does not spin.
const SCAN_PER_ARMED: u64 = 64;

impl Node {
    /// Arms `page` if this node holds and maps it.
    fn arm(&self, page: u64) -> Result<bool, Error> {
        let _g = self.pages.lock(page);
        let (state, populated) = self.pages.state(page);
        if state == PageState::Invalid || !populated {
            return Ok(false);
        }
        let gpa = page * PAGE;
        if state == PageState::Owned {
            // Stop local writers before copying; they trap and wait for the page lock.
            self.pages.uffd()?.protect(gpa, PAGE, true)?;
        }
        let mut data = Box::new([0u8; PAGE as usize]);
        self.memory.read(gpa, &mut data[..])?;
        self.pages.uffd()?.drop_pages(gpa, PAGE)?;
        self.pages.set_state(page, state, false);
        let at_ns = monotonic_ns();
        self.pages.put_armed(page, Armed { data, at_ns });
        Ok(true)
    }

    /// Maps back every page armed before `before_ns` that no access claimed.
    fn disarm_older(&self, before_ns: u64) -> Result<(), Error> {
        for page in self.pages.armed_before(before_ns) {
            let _g = self.pages.lock(page);
            let (state, populated) = self.pages.state(page);
            if state != PageState::Invalid && !populated {
                self.pages.populate(page, state)?;
            }
        }
        Ok(())
    }
}

/// What the sampler thread does.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// Arm about this many pages a second, round-robin (sampled access tracking).
    Rate(u32),
    /// Reference-stream recording: at the start of every epoch, arm every page this node
    /// holds and has mapped (pages still armed from an epoch in which nothing touched
    /// them stay armed). So each page's first touch by a vCPU of this node in each epoch
    /// is recorded, whatever the policy did. An epoch lasts at least its length, and at
    /// least one sweep of the pages touched in the last one.
    Sweep(Duration),
}

/// The sampler thread, until the run stops; then it maps every armed page back.
pub(super) fn sampler_thread(node: Arc<Node>, mode: Mode) {
    let rate = match mode {
        Mode::Rate(rate) => rate,
        Mode::Sweep(epoch) => return sweep_thread(node, epoch),
    };
    let (first, end) = (node.pages.first, node.pages.end);
    let mut cursor = first;
    // Pages owed, fractions carried from tick to tick, so low rates are kept too.
    let mut budget = 0.0f64;
    // The first ticks are short (1 ms, doubling up to TICK), so a run of a few
    // milliseconds is sampled too.
    let mut tick = Duration::from_millis(1);
    let result = (|| -> Result<(), Error> {
        while !node.stop.load(Ordering::SeqCst) {
            std::thread::sleep(tick);
            node.disarm_older(monotonic_ns())?;
            budget += rate as f64 * tick.as_secs_f64();
            tick = (tick * 2).min(TICK);
            let per_tick = budget.floor() as u64;
            budget -= per_tick as f64;
            if per_tick == 0 {
                continue;
            }
            let (mut armed, mut scanned) = (0, 0);
            while armed < per_tick && scanned < per_tick * SCAN_PER_ARMED && scanned < end - first {
                let page = cursor;
                cursor = if cursor + 1 >= end { first } else { cursor + 1 };
                scanned += 1;
                if node.pages.placement.image.contains(&page) {
                    continue;
                }
                if node.arm(page)? {
                    armed += 1;
                }
            }
        }
        node.disarm_older(u64::MAX)
    })();
    if let Err(e) = result {
        node.fail(e);
    }
}

/// [`Mode::Sweep`].
fn sweep_thread(node: Arc<Node>, epoch: Duration) {
    let (first, end) = (node.pages.first, node.pages.end);
    let result = (|| -> Result<(), Error> {
        while !node.stop.load(Ordering::SeqCst) {
            let started = std::time::Instant::now();
            for page in first..end {
                if node.stop.load(Ordering::SeqCst) {
                    break;
                }
                if !node.pages.placement.image.contains(&page) {
                    node.arm(page)?;
                }
            }
            std::thread::sleep(epoch.saturating_sub(started.elapsed()));
        }
        node.disarm_older(u64::MAX)
    })();
    if let Err(e) = result {
        node.fail(e);
    }
}
