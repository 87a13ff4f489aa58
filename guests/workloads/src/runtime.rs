//! What a workload thread sees: its id, the thread count, a shared memory region, and a
//! few synchronisation primitives built on atomics plus a futex-like [`Sys`] interface.
//!
//! The same code runs in two places: as a guest (the [`Sys`] calls are hypercalls and the
//! region is the guest's free memory) and natively on host threads (for the host-computed
//! reference checksum and for the overhead benchmark). Every thread calls the workload
//! with the same arguments and carves the region the same way, so no allocator
//! coordination is needed.

use core::marker::PhantomData;
use core::ops::Range;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The platform under a workload: futex-style wait/wake and a way to give up the CPU.
pub trait Sys: Sync {
    /// Sleeps while `word` holds `expected`. May return early (callers re-check).
    fn wait(&self, word: &AtomicU32, expected: u32);
    /// Wakes every thread sleeping on `word`.
    fn wake_all(&self, word: &AtomicU32);
    /// Lets another thread of this host run (used by spin loops that wait too long).
    fn relax(&self);
}

/// Most threads a workload supports (matches the engine's vCPU limit).
pub const MAX_THREADS: usize = 64;

/// Bytes at the start of the region used by the runtime itself (barrier, reduce slots).
pub const CONTROL_BYTES: usize = 64 * (MAX_THREADS + 2);

#[repr(C, align(64))]
struct Padded<T>(T);

#[repr(C)]
struct Control {
    barrier_count: Padded<AtomicU32>,
    barrier_generation: Padded<AtomicU32>,
    slots: [Padded<AtomicU64>; MAX_THREADS],
}

const _: () = assert!(core::mem::size_of::<Control>() <= CONTROL_BYTES);

/// Spin iterations before a waiter falls back to [`Sys::wait`] or [`Sys::relax`].
const SPINS_BEFORE_SLEEP: u32 = 2_000;

/// One thread's view of a running workload.
pub struct Ctx<'a, S: Sys> {
    /// This thread's id, `0..threads`.
    pub id: usize,
    /// Number of threads running the workload.
    pub threads: usize,
    pub sys: &'a S,
    base: *mut u8,
    len: usize,
}

impl<'a, S: Sys> Ctx<'a, S> {
    /// # Safety
    /// `base..base+len` must be valid, writable memory shared by exactly the `threads`
    /// threads that run this workload, zero-filled before any of them starts, aligned to
    /// 64 bytes, and not used by anything else while they run.
    pub unsafe fn new(id: usize, threads: usize, sys: &'a S, base: *mut u8, len: usize) -> Self {
        debug_assert!((1..=MAX_THREADS).contains(&threads) && id < threads);
        debug_assert!(len >= CONTROL_BYTES && (base as usize).is_multiple_of(64));
        Ctx {
            id,
            threads,
            sys,
            base,
            len,
        }
    }

    fn control(&self) -> &Control {
        // SAFETY: `new`'s contract: the region starts with CONTROL_BYTES of zeroed,
        // shared memory, and Control is made only of atomics, for which zero is valid.
        unsafe { &*(self.base as *const Control) }
    }

    /// The part of `0..len` this thread owns when work is split evenly.
    pub fn my_range(&self, len: usize) -> Range<usize> {
        split(len, self.threads, self.id)
    }

    /// A bump allocator over the shared region; every thread gets the same layout.
    pub fn alloc(&self) -> Alloc<'_> {
        Alloc {
            base: self.base,
            len: self.len,
            next: CONTROL_BYTES,
            _region: PhantomData,
        }
    }

    /// Waits until every thread has called `barrier` (generation-counting barrier).
    pub fn barrier(&self) {
        let c = self.control();
        let generation = c.barrier_generation.0.load(Ordering::Acquire);
        if c.barrier_count.0.fetch_add(1, Ordering::AcqRel) + 1 == self.threads as u32 {
            c.barrier_count.0.store(0, Ordering::Relaxed);
            c.barrier_generation
                .0
                .store(generation.wrapping_add(1), Ordering::Release);
            self.sys.wake_all(&c.barrier_generation.0);
            return;
        }
        let mut spins = 0;
        while c.barrier_generation.0.load(Ordering::Acquire) == generation {
            if spins < SPINS_BEFORE_SLEEP {
                spins += 1;
                core::hint::spin_loop();
            } else {
                self.sys.wait(&c.barrier_generation.0, generation);
            }
        }
    }

    /// Combines one value from every thread with `op`, in thread order; every thread
    /// gets the result.
    pub fn reduce(&self, value: u64, op: impl Fn(u64, u64) -> u64) -> u64 {
        let c = self.control();
        c.slots[self.id].0.store(value, Ordering::Relaxed);
        self.barrier();
        let mut acc = c.slots[0].0.load(Ordering::Relaxed);
        for slot in &c.slots[1..self.threads] {
            acc = op(acc, slot.0.load(Ordering::Relaxed));
        }
        self.barrier();
        acc
    }

    /// Wrapping sum over all threads.
    pub fn sum(&self, value: u64) -> u64 {
        self.reduce(value, u64::wrapping_add)
    }

    /// Logical AND over all threads (true if every thread passed).
    pub fn all(&self, ok: bool) -> bool {
        self.reduce(ok as u64, |a, b| a & b) == 1
    }
}

/// Splits `0..len` into `parts` near-equal ranges and returns range `index`.
pub fn split(len: usize, parts: usize, index: usize) -> Range<usize> {
    let base = len / parts;
    let extra = len % parts;
    let start = index * base + index.min(extra);
    start..start + base + usize::from(index < extra)
}

/// Deterministic bump allocator over the shared region.
pub struct Alloc<'a> {
    base: *mut u8,
    len: usize,
    next: usize,
    _region: PhantomData<&'a ()>,
}

/// Element types a workload may allocate: plain integers, floats and atomics, for which
/// the all-zero bit pattern is a valid value.
///
/// # Safety
/// Implementors must be valid when zero-filled and have no drop glue.
pub unsafe trait Zeroable: Sized {}
// SAFETY: all-zero is a valid value for each of these.
unsafe impl Zeroable for u32 {}
// SAFETY: as above.
unsafe impl Zeroable for u64 {}
// SAFETY: as above.
unsafe impl Zeroable for f64 {}
// SAFETY: as above.
unsafe impl Zeroable for AtomicU32 {}
// SAFETY: as above.
unsafe impl Zeroable for AtomicU64 {}

impl<'a> Alloc<'a> {
    /// Reserves an array of `count` elements aligned to `align` bytes (at least 64).
    /// Panics if the region is too small; callers size the region with `mem_bytes` first.
    pub fn array<T: Zeroable>(&mut self, count: usize, align: usize) -> Shared<'a, T> {
        let align = align.max(64).max(core::mem::align_of::<T>());
        let start = self.next.next_multiple_of(align);
        let bytes = count * core::mem::size_of::<T>();
        assert!(start + bytes <= self.len, "workload region too small");
        self.next = start + bytes;
        Shared {
            // SAFETY: start + bytes <= len, so the pointer stays inside the region.
            ptr: unsafe { self.base.add(start) } as *mut T,
            len: count,
            _region: PhantomData,
        }
    }
}

/// Bytes an allocation sequence needs: `CONTROL_BYTES` plus each array rounded to `align`.
pub const fn array_bytes<T>(count: usize, align: usize) -> usize {
    let align = if align < 64 { 64 } else { align };
    count * core::mem::size_of::<T>() + align
}

/// An array in the shared region. Plain-data arrays are accessed by phase: while a
/// phase writes, each thread writes only the part it owns; reads of parts others wrote
/// happen only after a barrier. Atomic arrays are shared freely.
pub struct Shared<'a, T> {
    ptr: *mut T,
    len: usize,
    _region: PhantomData<&'a T>,
}

impl<T> Clone for Shared<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Shared<'_, T> {}

impl<'a, T> Shared<'a, T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole array, read-only.
    ///
    /// # Safety
    /// No thread may write any element while the returned slice is in use.
    pub unsafe fn read(&self) -> &'a [T] {
        // SAFETY: the array lies in the region (Alloc::array); the caller rules out
        // concurrent writers.
        unsafe { core::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Elements `range`, writable.
    ///
    /// # Safety
    /// No other thread may read or write `range` while the returned slice is in use.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn write(&self, range: Range<usize>) -> &'a mut [T] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (checked above); the caller guarantees exclusivity.
        unsafe { core::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

impl<'a> Shared<'a, AtomicU32> {
    pub fn atomics(&self) -> &'a [AtomicU32] {
        // SAFETY: atomics may be shared between threads; the memory is in the region.
        unsafe { core::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<'a> Shared<'a, AtomicU64> {
    pub fn atomics(&self) -> &'a [AtomicU64] {
        // SAFETY: as above.
        unsafe { core::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// A test-and-test-and-set spin-lock word in shared memory. Waiters spin with `pause`
/// and give up the host CPU after a while, so an over-subscribed host still progresses.
pub struct SpinLock<'a, S: Sys> {
    word: &'a AtomicU32,
    sys: &'a S,
}

impl<'a, S: Sys> SpinLock<'a, S> {
    pub fn new(word: &'a AtomicU32, sys: &'a S) -> Self {
        SpinLock { word, sys }
    }

    pub fn lock(&self) {
        let mut spins = 0u32;
        loop {
            if self.word.load(Ordering::Relaxed) == 0
                && self
                    .word
                    .compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return;
            }
            spins += 1;
            if spins.is_multiple_of(SPINS_BEFORE_SLEEP) {
                self.sys.relax();
            } else {
                core::hint::spin_loop();
            }
        }
    }

    pub fn unlock(&self) {
        self.word.store(0, Ordering::Release);
    }
}

/// SplitMix64's finaliser: a cheap, well-mixed 64-bit hash.
pub const fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Hash of two values.
pub const fn mix2(a: u64, b: u64) -> u64 {
    mix64(a ^ mix64(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_everything_once() {
        for len in [0, 1, 7, 64, 1000] {
            for parts in 1..9 {
                let mut next = 0;
                for i in 0..parts {
                    let r = split(len, parts, i);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, len);
            }
        }
    }
}
