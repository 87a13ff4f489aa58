//! This node's side of page coherence (docs/protocol.md): a thread that needs a page
//! [`Node::acquire`]s it (a request to the page's home, then a wait for the page or a
//! grant), and the handlers for what the home and other nodes send: send a page we own
//! ([`Node::serve_fetch`]), install one that arrived, take a grant, drop a copy on
//! invalidation. [`CoherentView`] is guest RAM as the engine's own threads see it.

use super::node::Node;
use super::pages::{Local, PageState};
use super::uffd::PAGE;
use super::wait::{Slot, Waiting};
use crate::memory::{GuestRead, MemoryError};
use crate::Error;
use flotilla_telemetry::metrics::Direction;
use flotilla_telemetry::trace::{EventKind, NONE16};
use flotilla_transport::directory::{CLAIM_BACKOFF, CLAIM_EXTENT};
use flotilla_transport::{Access, Message, NodeId};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

/// A page held for use: its lock, and the home to tell once done.
pub(super) struct Held<'a> {
    _guard: MutexGuard<'a, ()>,
    done_to: Option<NodeId>,
    /// The page came by a claim of fresh memory.
    pub claimed: bool,
}

impl Node {
    /// Waits until this node may use `page` for `want`, fetching it if needed. Returns
    /// with the page's lock held; [`Node::release`] ends the use.
    pub fn acquire(&self, page: u64, want: Access, slot: &Arc<Slot>) -> Result<Held<'_>, Error> {
        self.fetch(page, want, slot, true)?.0.ok_or(Error::Page {
            page,
            what: "a held fetch returned without the page".into(),
        })
    }

    /// Brings `page` here for `want` without holding it: for an instruction that runs
    /// again once the page is here (nothing pending to complete under its lock). The
    /// thread that installs the page tells the home it is done at once, so the vCPU
    /// thread does not send that on its way back to the guest. (Holding it would not keep
    /// the page either: it could leave again before the instruction re-runs, as it can
    /// after [`Node::release`]; the instruction then faults again.) Returns whether the
    /// page came by a claim of fresh memory (no data travelled).
    pub fn bring(&self, page: u64, want: Access, slot: &Arc<Slot>) -> Result<bool, Error> {
        self.fetch(page, want, slot, false)
            .map(|(_, claimed)| claimed)
    }

    /// [`Node::acquire`] (`hold`) or [`Node::bring`] (not); and whether the page came by
    /// a claim.
    fn fetch(
        &self,
        page: u64,
        want: Access,
        slot: &Arc<Slot>,
        hold: bool,
    ) -> Result<(Option<Held<'_>>, bool), Error> {
        let mut done_to = None;
        let mut claimed = false;
        loop {
            match self.pages.local(page, want)? {
                Local::Ready { guard, .. } if hold => {
                    return Ok((
                        Some(Held {
                            _guard: guard,
                            done_to,
                            claimed,
                        }),
                        claimed,
                    ))
                }
                Local::Ready { .. } => return Ok((None, claimed)),
                Local::Missing(state) => {
                    if let Some(home) = done_to {
                        self.send(home, Message::Done { page });
                        return Err(Error::Page {
                            page,
                            what: format!("arrived as {state:?}, not usable for {want:?}"),
                        });
                    }
                }
            }
            let home = self.home(page);
            let (issue, claim) = {
                let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
                let entry = w.entry(page).or_default();
                let issue = entry.in_flight.is_none();
                if issue {
                    entry.in_flight = Some(want);
                    entry.done_at_install = !hold;
                }
                entry.slots.push(Arc::clone(slot));
                // Nothing to complete under the page's lock: ask for the pages after it
                // too, should they be fresh memory (see `serve_claim`).
                let claim = if issue && !hold && home != self.me && !self.claims_paused() {
                    self.claim_extent(&mut w, page, home)
                } else {
                    1
                };
                (issue, claim)
            };
            if issue {
                let msg = if claim > 1 {
                    Message::Claim {
                        page,
                        count: claim,
                        want,
                    }
                } else {
                    Message::PageRequest {
                        page,
                        want,
                        requester: self.me,
                    }
                };
                self.send(home, msg);
            }
            let since = Instant::now();
            let mut warned = false;
            let woken = slot.wait(&self.stop, |i| {
                if !warned && since.elapsed() > Duration::from_secs(2) {
                    warned = true;
                    tracing::warn!(
                        node = self.me,
                        page = format_args!("{page:#x}"),
                        ?want,
                        home,
                        issued = issue,
                        "still waiting for a page after 2 s"
                    );
                }
                std::mem::take(&mut i.woken).then(|| std::mem::take(&mut i.claimed))
            });
            match woken {
                None => return Err(Error::Stopped),
                Some(c) => claimed = c,
            }
            if issue && hold {
                done_to = Some(home);
            }
        }
    }

    /// Whether claims pause after one that got nothing (counts this fault down).
    fn claims_paused(&self) -> bool {
        self.claim_backoff
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    /// How many pages from `page` on to claim along with it (at least 1): the run of
    /// pages after it with the same home that this node does not hold and is not already
    /// waiting for. Each gets a waiting entry (`w` is the waiting map, locked).
    fn claim_extent(&self, w: &mut HashMap<u64, Waiting>, page: u64, home: NodeId) -> u8 {
        let mut count = 1u8;
        while count < CLAIM_EXTENT {
            let next = page + count as u64;
            // The state is read without the page's lock: a hint, the home decides.
            if !self.pages.coherent(next)
                || self.home(next) != home
                || w.contains_key(&next)
                || self.pages.state(next).0 != PageState::Invalid
            {
                break;
            }
            w.insert(
                next,
                Waiting {
                    in_flight: Some(Access::Write),
                    done_at_install: true,
                    slots: Vec::new(),
                },
            );
            count += 1;
        }
        count
    }

    /// Home: `from` claims `page` and the `count - 1` pages after it. Each that this node
    /// owns alone, with no transaction on it, and has never used (held, not mapped, not
    /// armed by the sampler) becomes `from`'s with no data sent: it is all zeros, and
    /// `from` installs zeros. `page` itself, if it does not qualify, is requested the
    /// usual way. One round trip for a run of fresh memory instead of one per page,
    /// and no 4 KiB of zeros on the wire for each.
    pub(super) fn serve_claim(
        &self,
        from: NodeId,
        page: u64,
        count: u8,
        want: Access,
    ) -> Result<(), Error> {
        let mut mask = 0u64;
        for i in 0..count as u64 {
            let p = page + i;
            if !self.pages.coherent(p) || self.home(p) != self.me {
                if i == 0 {
                    return Err(Error::Protocol {
                        from,
                        what: format!("a claim of page {p:#x}, which is not homed here"),
                    });
                }
                break;
            }
            let _g = self.pages.lock(p);
            let fresh = self.pages.state(p) == (PageState::Owned, false) && !self.pages.is_armed(p);
            // The page's lock keeps local threads from mapping it meanwhile; the
            // directory's lock is never held while taking a page's.
            if fresh
                && self
                    .directory()
                    .claim(p, from)
                    .map_err(|e| Error::Protocol {
                        from,
                        what: e.to_string(),
                    })?
            {
                self.pages.set_state(p, PageState::Invalid, false);
                self.pages.set_hint(p, from);
                mask |= 1 << i;
            }
        }
        // `page` itself, if not granted, is served first: its data is what the faulting
        // vCPU waits for (the requester takes the two answers in either order).
        if mask & 1 == 0 {
            let out = self.directory().request(page, from, want);
            self.route(out.map_err(|e| Error::Protocol {
                from,
                what: e.to_string(),
            })?);
        }
        self.send(from, Message::Claimed { page, count, mask });
        Ok(())
    }

    /// Requester: the home's answer to a claim. Pages granted get zeros and are owned
    /// here, the threads waiting for them wake, and the home hears they are installed
    /// (one `ClaimDone` for them all). The other pages after `page` were only asked for on spec: their
    /// waiters wake and ask again if they still need them. `page` itself, if not granted,
    /// comes the usual way.
    pub(super) fn take_claimed(
        &self,
        from: NodeId,
        page: u64,
        count: u8,
        mask: u64,
    ) -> Result<(), Error> {
        let end = page + count as u64;
        if !self.pages.coherent(end - 1) {
            return Err(Error::Protocol {
                from,
                what: format!(
                    "a claim answer for pages {page:#x}..{end:#x}, past coherent guest RAM"
                ),
            });
        }
        let granted = |p: u64| mask & (1 << (p - page)) != 0;
        if mask == 0 {
            self.claim_backoff.store(CLAIM_BACKOFF, Ordering::Relaxed);
        }
        {
            // Every granted page locked (in ascending order; at most 64 stripes, all
            // different), then zeros installed for each run of them in one call.
            let guards: Vec<_> = (page..end)
                .filter(|&p| granted(p))
                .map(|p| self.pages.lock(p))
                .collect();
            for p in (page..end).filter(|&p| granted(p)) {
                if self.pages.state(p) != (PageState::Invalid, false) {
                    return Err(Error::Page {
                        page: p,
                        what: format!("granted by node {from}'s claim while held here"),
                    });
                }
            }
            let mut p = page;
            while p < end {
                if !granted(p) {
                    p += 1;
                    continue;
                }
                let run = (p..end).take_while(|&q| granted(q)).count() as u64;
                self.pages
                    .uffd()?
                    .install_zeros(p * PAGE, run * PAGE, false)?;
                for q in p..p + run {
                    self.pages.set_state(q, PageState::Owned, true);
                    self.pages.set_hint(q, self.me);
                }
                p += run;
            }
            self.counters
                .pages_claimed
                .fetch_add(mask.count_ones() as u64, Ordering::Relaxed);
            drop(guards);
        }
        // Wake whoever waits: for a granted page, it is here; for a page asked for on
        // spec and not granted, ask again if still needed. `page` itself, if not
        // granted, is still coming.
        let woken: Vec<(bool, Waiting)> = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            (page..end)
                .filter(|&p| granted(p) || p != page)
                .filter_map(|p| waiting.remove(&p).map(|w| (granted(p), w)))
                .collect()
        };
        for (granted, entry) in &woken {
            for slot in &entry.slots {
                slot.update(|i| {
                    i.woken = true;
                    i.claimed = *granted;
                });
            }
        }
        if mask != 0 {
            self.send(from, Message::ClaimDone { page, count, mask });
        }
        Ok(())
    }

    /// Home: the requester installed the pages it claimed; their transactions end.
    pub(super) fn claim_done(
        &self,
        from: NodeId,
        page: u64,
        count: u8,
        mask: u64,
    ) -> Result<(), Error> {
        for i in (0..count as u64).filter(|i| mask & (1 << i) != 0) {
            let out = self.directory().done(page + i, from);
            self.route(out.map_err(|e| Error::Protocol {
                from,
                what: e.to_string(),
            })?);
        }
        Ok(())
    }

    /// Ends the use of a page from [`Node::acquire`].
    pub fn release(&self, held: Held<'_>, page: u64) {
        let done_to = held.done_to;
        drop(held);
        if let Some(home) = done_to {
            self.send(home, Message::Done { page });
        }
    }

    /// Wakes the threads waiting for `page`, which is now here; tells the home the
    /// transaction is done if the thread that asked does not hold the page. Returns the
    /// access that was asked, `None` if nobody asked.
    pub(super) fn wake_waiters(&self, page: u64) -> Option<Access> {
        let entry = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&page)?;
        for slot in &entry.slots {
            slot.wake();
        }
        if entry.done_at_install {
            self.send(self.home(page), Message::Done { page });
        }
        entry.in_flight
    }

    pub(super) fn page_msg_check(&self, page: u64, from: NodeId, what: &str) -> Result<(), Error> {
        if page < self.pages.first || page >= self.pages.end {
            return Err(Error::Protocol {
                from,
                what: format!("{what} for page {page:#x}, outside coherent guest RAM"),
            });
        }
        Ok(())
    }

    /// Home → this node (the owner): send the page to `requester`.
    pub(super) fn serve_fetch(
        &self,
        page: u64,
        want: Access,
        requester: NodeId,
        copies: u8,
    ) -> Result<(), Error> {
        let mut data = Box::new([0u8; PAGE as usize]);
        {
            let _g = self.pages.lock(page);
            let (state, populated) = self.pages.state(page);
            if state == PageState::Invalid {
                return Err(Error::Page {
                    page,
                    what: "asked to send it, but this node does not hold it".into(),
                });
            }
            let gpa = page * PAGE;
            if populated {
                if state == PageState::Owned {
                    // Stop local writers before copying.
                    self.pages.uffd()?.protect(gpa, PAGE, true)?;
                }
                self.memory.read(gpa, &mut data[..])?;
            } else {
                // Not mapped: the sampler's copy, or a page never touched (zeros).
                self.pages.copy_armed(page, &mut data);
            }
            match want {
                Access::Read | Access::Execute => {
                    self.pages.set_state(page, PageState::Shared, populated)
                }
                Access::Write => {
                    if populated {
                        self.pages.uffd()?.drop_pages(gpa, PAGE)?;
                    }
                    self.pages.take_armed(page);
                    self.pages.set_state(page, PageState::Invalid, false);
                    self.pages.set_hint(page, requester);
                    self.pages.bump_heat(page);
                }
            }
        }
        self.metrics.page_move(Direction::Out);
        self.trace_page(EventKind::PageOut, page, requester, want, copies as u16);
        self.send(
            requester,
            Message::PageData {
                page,
                want,
                data,
                copies,
            },
        );
        Ok(())
    }

    pub(super) fn install(
        &self,
        page: u64,
        want: Access,
        data: &[u8; PAGE as usize],
        copies: u8,
        from: NodeId,
    ) -> Result<(), Error> {
        let me = self.me;
        {
            let _g = self.pages.lock(page);
            let (state, populated) = self.pages.state(page);
            if state != PageState::Invalid || populated {
                return Err(Error::Page {
                    page,
                    what: format!("arrived from node {from} while this node holds it ({state:?})"),
                });
            }
            let read_only = want == Access::Read;
            self.pages.uffd()?.install(page * PAGE, data, read_only)?;
            let state = if read_only {
                PageState::Shared
            } else {
                PageState::Owned
            };
            self.pages.set_state(page, state, true);
            if !read_only {
                self.pages.set_hint(page, me);
            }
            self.pages.set_copies(page, copies);
            self.pages.bump_heat(page);
        }
        self.metrics.page_move(Direction::In);
        self.trace_page(EventKind::PageIn, page, from, want, copies as u16);
        if want == Access::Read {
            self.counters.replicas_made.fetch_add(1, Ordering::Relaxed);
        }
        if self.wake_waiters(page).is_none() {
            return Err(Error::Protocol {
                from,
                what: format!("page {page:#x}, which this node did not request"),
            });
        }
        Ok(())
    }

    pub(super) fn grant(&self, page: u64, copies: u8, from: NodeId) -> Result<(), Error> {
        let me = self.me;
        let want = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&page)
            .and_then(|w| w.in_flight)
            .ok_or_else(|| Error::Protocol {
                from,
                what: format!("a grant of page {page:#x}, which this node did not request"),
            })?;
        {
            let _g = self.pages.lock(page);
            let (state, populated) = self.pages.state(page);
            if state == PageState::Invalid {
                return Err(Error::Page {
                    page,
                    what: format!("granted by node {from}, but this node does not hold it"),
                });
            }
            if want == Access::Write {
                if state == PageState::Shared && populated {
                    self.pages.uffd()?.protect(page * PAGE, PAGE, false)?;
                }
                self.pages.set_state(page, PageState::Owned, populated);
                self.pages.set_hint(page, me);
            }
            self.pages.set_copies(page, copies);
        }
        self.wake_waiters(page);
        Ok(())
    }

    pub(super) fn invalidate(&self, page: u64, owner: NodeId, from: NodeId) -> Result<(), Error> {
        {
            let _g = self.pages.lock(page);
            let (_, populated) = self.pages.state(page);
            if populated {
                self.pages.uffd()?.drop_pages(page * PAGE, PAGE)?;
            }
            self.pages.set_state(page, PageState::Invalid, false);
            self.pages.take_armed(page);
            self.pages.set_hint(page, owner);
            self.pages.bump_heat(page);
        }
        self.metrics.invalidation();
        self.trace_page(EventKind::Invalidate, page, owner, Access::Read, NONE16);
        self.send(from, Message::InvalidateAck { page });
        Ok(())
    }
}

/// Guest RAM as a vCPU thread (or the futex thread) sees it: pages come here first.
pub(super) struct CoherentView<'a> {
    pub node: &'a Node,
    pub slot: &'a Arc<Slot>,
}

impl CoherentView<'_> {
    fn each_page(
        &self,
        addr: u64,
        len: usize,
        want: Access,
        mut f: impl FnMut(u64, std::ops::Range<usize>) -> Result<(), MemoryError>,
    ) -> Result<(), MemoryError> {
        self.check(addr, len as u64)?;
        let mut done = 0usize;
        while done < len {
            let at = addr + done as u64;
            let page = at / PAGE;
            let n = ((PAGE - at % PAGE) as usize).min(len - done);
            if page < self.node.pages.first {
                if want == Access::Write {
                    return Err(MemoryError::OutOfRange {
                        addr: at,
                        len: n as u64,
                        size: self.node.memory.size(),
                    });
                }
                f(at, done..done + n)?;
            } else {
                let held = self.node.acquire(page, want, self.slot).map_err(|e| {
                    MemoryError::Unavailable {
                        page,
                        reason: e.to_string(),
                    }
                })?;
                let r = f(at, done..done + n);
                self.node.release(held, page);
                r?;
            }
            done += n;
        }
        Ok(())
    }

    pub fn write_bytes(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        let mem = &self.node.memory;
        self.each_page(addr, data.len(), Access::Write, |at, r| {
            mem.write(at, &data[r])
        })
    }
}

impl GuestRead for CoherentView<'_> {
    fn ram_bytes(&self) -> u64 {
        self.node.memory.size()
    }

    fn read_bytes(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let mem = &self.node.memory;
        let len = buf.len();
        self.each_page(addr, len, Access::Read, |at, r| mem.read(at, &mut buf[r]))
    }
}
