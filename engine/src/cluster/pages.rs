//! This node's page table: for every page of coherent guest RAM, the state of this
//! node's copy and a hint of who holds the page, under striped locks, plus the fault trap
//! over guest RAM and the copies the access sampler took away.
//!
//! A page of this node's copy is in one of three [`PageState`]s, changed only under the
//! page's lock: `Invalid` (missing: any access traps), `Shared` (a write-protected
//! replica: writes trap) or `Owned` (the one writable copy); and it is mapped or not (held
//! but never touched, or armed by the sampler: the next access maps it, see
//! [`PageTable::local`]). Boot builds the same guest RAM on every node, then keeps only
//! the pages this node starts with ([`Placement`]); the rest are dropped.

use super::uffd::{Userfault, PAGE};
use super::{ClusterSpec, NodeId, RamPlacement};
use crate::boot::BootLayout;
use crate::memory::GuestMemory;
use crate::Error;
use flotilla_abi::IMAGE_MIN_ADDR;
use flotilla_transport::Access;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

const STRIPES: usize = 1024;
const STATE_MASK: u8 = 3;
const POPULATED: u8 = 4;
/// Most pages mapped by one first touch (see [`PageTable::populate`]).
use flotilla_transport::directory::FIRST_TOUCH_RUN;
/// This node's copy of one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    Invalid = 0,
    Shared = 1,
    Owned = 2,
}

impl PageState {
    fn from_bits(b: u8) -> Self {
        match b & STATE_MASK {
            1 => PageState::Shared,
            2 => PageState::Owned,
            _ => PageState::Invalid,
        }
    }

    pub fn allows(self, want: Access) -> bool {
        matches!(
            (self, want),
            (PageState::Owned, _) | (PageState::Shared, Access::Read | Access::Execute)
        )
    }
}

/// Where pages start: every node computes the same answer.
#[derive(Debug, Clone)]
pub(super) struct Placement {
    nodes: u16,
    ram: RamPlacement,
    first: u64,
    count: u64,
    stacks: std::ops::Range<u64>,
    stack_pages: u64,
    vcpu_nodes: Vec<NodeId>,
    pub image: std::ops::Range<u64>,
}

impl Placement {
    pub fn home(&self, page: u64) -> NodeId {
        if let Some(v) = self.stack_of(page) {
            return self.vcpu_nodes[v as usize];
        }
        let i = page - self.first;
        match self.ram {
            RamPlacement::Contiguous => (i * self.nodes as u64 / self.count) as NodeId,
            RamPlacement::Interleave => (page % self.nodes as u64) as NodeId,
        }
    }

    /// The vCPU whose stack's guard page (its lowest) `page` is, if any.
    pub fn guard_of(&self, page: u64) -> Option<u32> {
        self.stack_of(page)
            .filter(|_| (page - self.stacks.start).is_multiple_of(self.stack_pages))
    }

    /// Bytes of each vCPU's stack, its guard page included.
    pub fn stack_bytes(&self) -> u64 {
        self.stack_pages * PAGE
    }

    /// The vCPU whose stack `page` is part of, if any.
    pub fn stack_of(&self, page: u64) -> Option<u32> {
        self.stacks
            .contains(&page)
            .then(|| ((page - self.stacks.start) / self.stack_pages) as u32)
    }
}

/// How a page held here but not mapped was just mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Populated {
    /// The sampler's copy put back: the sampler had armed the page at `armed_ns`.
    Sampled { armed_ns: u64 },
    /// Zeros for a page never touched, and for `pages - 1` more after it.
    Zeros { pages: u64 },
}

/// What this node can do with a page for one access, found under the page's lock.
pub(super) enum Local<'a> {
    /// Usable here; the lock stays held. `mapped`: it was held but not mapped and has
    /// just been, and how.
    Ready {
        guard: MutexGuard<'a, ()>,
        mapped: Option<Populated>,
    },
    /// Not held well enough for the access: a remote fault. How it is held.
    Missing(PageState),
}

/// A page the sampler took away: its contents, and when (CLOCK_MONOTONIC ns: unlike
/// the guest clock, a vCPU arriving from another node cannot move it forward).
pub(super) struct Armed {
    pub data: Box<[u8; PAGE as usize]>,
    pub at_ns: u64,
}

/// See the module documentation.
pub(super) struct PageTable {
    /// First page under coherence (everything below is the engine's, private per node).
    pub first: u64,
    /// One past the last page of guest RAM.
    pub end: u64,
    /// `None` for a node that runs alone without the access sampler: it holds every
    /// page, so nothing ever has to trap, and first touches stay the kernel's.
    uffd: Option<Userfault>,
    states: Vec<AtomicU8>,
    locks: Vec<Mutex<()>>,
    hints: Vec<AtomicU16>,
    /// Copies of the page the home counted when this node last got it (`u8::MAX`: not
    /// known yet).
    copies: Vec<AtomicU8>,
    heat: Vec<AtomicU8>,
    pub placement: Placement,
    /// Pages the access sampler took away, with their contents (see `sampler`).
    armed: Mutex<HashMap<u64, Armed>>,
    armed_count: AtomicUsize,
}

impl PageTable {
    /// The table of node `me` over guest RAM (already loaded): the pages it starts with
    /// are kept, the others dropped. `alone`: every page is this node's for good, and
    /// there is no fault trap.
    pub fn new(
        me: NodeId,
        spec: &ClusterSpec,
        layout: &BootLayout,
        memory: &GuestMemory,
        alone: bool,
    ) -> Result<PageTable, Error> {
        let first = IMAGE_MIN_ADDR / PAGE;
        let end = spec.mem_bytes / PAGE;
        let placement = Placement {
            nodes: spec.nodes,
            ram: spec.ram,
            first,
            count: end - first,
            stacks: layout.stacks_start / PAGE
                ..(layout.stacks_start / PAGE) + spec.vcpus as u64 * (layout.stack_bytes / PAGE),
            stack_pages: layout.stack_bytes / PAGE,
            vcpu_nodes: spec.vcpu_nodes.clone(),
            image: layout.image_start / PAGE..layout.image_end.div_ceil(PAGE),
        };
        let uffd = if alone {
            None
        } else {
            Some(Userfault::register(memory, IMAGE_MIN_ADDR, spec.mem_bytes)?)
        };
        let count = (end - first) as usize;
        let resident = match &uffd {
            Some(u) => u.resident(IMAGE_MIN_ADDR, spec.mem_bytes - IMAGE_MIN_ADDR)?,
            None => vec![true; count],
        };
        let mut states = Vec::with_capacity(count);
        let mut hints = Vec::with_capacity(count);
        let mut run_start: Option<u64> = None;
        for (i, &was_resident) in resident.iter().enumerate().take(count) {
            let page = first + i as u64;
            let home = placement.home(page);
            let replicated = placement.image.contains(&page) && !alone;
            let state = if replicated {
                PageState::Shared
            } else if home == me {
                PageState::Owned
            } else {
                PageState::Invalid
            };
            let populated = was_resident && state != PageState::Invalid;
            states.push(AtomicU8::new(
                state as u8 | if populated { POPULATED } else { 0 },
            ));
            hints.push(AtomicU16::new(home));
            // Drop runs of pages this node does not start with (never alone: it has them all).
            if let Some(uffd) = &uffd {
                match (state == PageState::Invalid, run_start) {
                    (true, None) => run_start = Some(page),
                    (false, Some(s)) => {
                        uffd.drop_pages(s * PAGE, (page - s) * PAGE)?;
                        run_start = None;
                    }
                    _ => {}
                }
            }
        }
        if let (Some(uffd), Some(s)) = (&uffd, run_start) {
            uffd.drop_pages(s * PAGE, (end - s) * PAGE)?;
        }
        // The image is a read-only replica everywhere; writes upgrade through its home.
        if let (Some(uffd), false) = (&uffd, placement.image.is_empty()) {
            let start = placement.image.start.max(first);
            for page in start..placement.image.end {
                if resident[(page - first) as usize] {
                    uffd.protect(page * PAGE, PAGE, true)?;
                }
            }
        }
        Ok(PageTable {
            first,
            end,
            uffd,
            states,
            locks: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            hints,
            copies: (0..count).map(|_| AtomicU8::new(u8::MAX)).collect(),
            heat: (0..4096).map(|_| AtomicU8::new(0)).collect(),
            placement,
            armed: Mutex::new(HashMap::new()),
            armed_count: AtomicUsize::new(0),
        })
    }

    fn index(&self, page: u64) -> usize {
        (page - self.first) as usize
    }

    /// Whether `page` is under coherence.
    pub fn coherent(&self, page: u64) -> bool {
        page >= self.first && page < self.end
    }

    /// Pages of this node's copy that are not `Invalid`.
    pub fn resident(&self) -> u64 {
        self.states
            .iter()
            .filter(|s| PageState::from_bits(s.load(Ordering::Relaxed)) != PageState::Invalid)
            .count() as u64
    }

    pub fn lock(&self, page: u64) -> MutexGuard<'_, ()> {
        self.locks[page as usize % STRIPES]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The page's state and whether it is physically installed. Call under its lock.
    pub fn state(&self, page: u64) -> (PageState, bool) {
        let b = self.states[self.index(page)].load(Ordering::Acquire);
        (PageState::from_bits(b), b & POPULATED != 0)
    }

    pub fn set_state(&self, page: u64, state: PageState, populated: bool) {
        let b = state as u8 | if populated { POPULATED } else { 0 };
        self.states[self.index(page)].store(b, Ordering::Release);
    }

    /// The node that probably holds the page's current copy.
    pub fn hint(&self, page: u64) -> NodeId {
        self.hints[self.index(page)].load(Ordering::Relaxed)
    }

    pub fn set_hint(&self, page: u64, node: NodeId) {
        self.hints[self.index(page)].store(node, Ordering::Relaxed);
    }

    pub fn heat(&self, page: u64) -> u32 {
        self.heat[page as usize % self.heat.len()].load(Ordering::Relaxed) as u32
    }

    pub fn bump_heat(&self, page: u64) {
        let h = &self.heat[page as usize % self.heat.len()];
        let v = h.load(Ordering::Relaxed);
        h.store(if v >= 32 { v / 2 } else { v + 1 }, Ordering::Relaxed);
    }

    /// Copies of the page the home counted when this node last got it, if known.
    pub fn copies(&self, page: u64) -> Option<u8> {
        match self.copies[self.index(page)].load(Ordering::Relaxed) {
            u8::MAX => None,
            c => Some(c),
        }
    }

    pub fn set_copies(&self, page: u64, copies: u8) {
        self.copies[self.index(page)].store(copies, Ordering::Relaxed);
    }

    /// The fault trap; only a node that runs alone (and does not sample) has none, and
    /// such a node never moves, drops or protects a page.
    pub fn uffd(&self) -> Result<&Userfault, Error> {
        self.uffd
            .as_ref()
            .ok_or_else(|| Error::Config("this node runs alone, without userfaultfd".into()))
    }

    /// Locks `page` and looks at what this node has of it for `want`; a page held but not
    /// mapped (never touched, or armed by the sampler) is mapped on the way.
    pub fn local(&self, page: u64, want: Access) -> Result<Local<'_>, Error> {
        let guard = self.lock(page);
        let (state, populated) = self.state(page);
        if !state.allows(want) {
            return Ok(Local::Missing(state));
        }
        let mapped = if populated {
            None
        } else {
            Some(self.populate(page, state)?)
        };
        Ok(Local::Ready { guard, mapped })
    }

    /// Installs a page this node holds but has not mapped: the contents the access
    /// sampler took away, or zeros for a page never touched. Under its lock.
    pub fn populate(&self, page: u64, state: PageState) -> Result<Populated, Error> {
        let read_only = state == PageState::Shared;
        if let Some(armed) = self.take_armed(page) {
            self.uffd()?.install(page * PAGE, &armed.data, read_only)?;
            self.set_state(page, state, true);
            return Ok(Populated::Sampled {
                armed_ns: armed.at_ns,
            });
        }
        // Never touched: zeros, and the same for the pages after it that this node holds
        // the same way and has never touched either (a guest touching fresh memory goes
        // on to the next page), up to `FIRST_TOUCH_RUN` in one call. A neighbour whose
        // lock is taken ends the run: it is busy, and waiting for it could deadlock.
        let mut guards = Vec::new();
        while (guards.len() as u64) + 1 < FIRST_TOUCH_RUN {
            let next = page + guards.len() as u64 + 1;
            if next >= self.end || next as usize % STRIPES == page as usize % STRIPES {
                break;
            }
            let Ok(guard) = self.locks[next as usize % STRIPES].try_lock() else {
                break;
            };
            if self.state(next) != (state, false) || self.is_armed(next) {
                break;
            }
            guards.push(guard);
        }
        let run = guards.len() as u64 + 1;
        self.uffd()?
            .install_zeros(page * PAGE, run * PAGE, read_only)?;
        for p in page..page + run {
            self.set_state(p, state, true);
        }
        Ok(Populated::Zeros { pages: run })
    }

    pub fn is_armed(&self, page: u64) -> bool {
        self.armed_count.load(Ordering::Acquire) != 0
            && self
                .armed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&page)
    }

    /// Keeps the sampler's copy of a page it unmapped. Under its lock.
    pub fn put_armed(&self, page: u64, armed: Armed) {
        let old = self
            .armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(page, armed);
        if old.is_none() {
            self.armed_count.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Pages the sampler armed before `before_ns`.
    pub fn armed_before(&self, before_ns: u64) -> Vec<u64> {
        self.armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, a)| a.at_ns < before_ns)
            .map(|(&p, _)| p)
            .collect()
    }

    /// Removes the sampler's copy of a page. Under its lock.
    pub fn take_armed(&self, page: u64) -> Option<Armed> {
        if self.armed_count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let a = self
            .armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&page)?;
        self.armed_count.fetch_sub(1, Ordering::AcqRel);
        Some(a)
    }

    /// Copies the sampler's copy of a page into `out`, if it has one. Under its lock.
    pub fn copy_armed(&self, page: u64, out: &mut [u8; PAGE as usize]) -> bool {
        if self.armed_count.load(Ordering::Acquire) == 0 {
            return false;
        }
        let armed = self.armed.lock().unwrap_or_else(|p| p.into_inner());
        match armed.get(&page) {
            Some(a) => {
                out.copy_from_slice(&a.data[..]);
                true
            }
            None => false,
        }
    }
}
