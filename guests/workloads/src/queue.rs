//! Producer/consumer queue: a bounded ring protected by a spin-lock, with atomic counters
//! for claiming and consuming items. Even threads produce, odd threads consume (a lone
//! thread does both), so every item crosses between threads through the same few lines:
//! fine-grained write sharing. Self-check: every item is consumed exactly once (count and
//! order-independent sum of the values).

use crate::args::{self, ArgError, Key};
use crate::runtime::{array_bytes, mix2, Ctx, SpinLock, Sys, CONTROL_BYTES};
use crate::Failure;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub const KEYS: [Key; 3] = [
    Key {
        name: "items",
        default: 2_000_000,
        min: 1,
        max: 1 << 40,
        help: "items passed through the queue",
    },
    Key {
        name: "capacity",
        default: 256,
        min: 1,
        max: 1 << 24,
        help: "ring slots",
    },
    Key {
        name: "seed",
        default: 1,
        min: 0,
        max: u64::MAX,
        help: "item seed",
    },
];
const NAMES: &[&str] = &["items", "capacity", "seed"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub items: u64,
    pub capacity: usize,
    pub seed: u64,
}

struct Queue<'a, S: Sys> {
    lock: SpinLock<'a, S>,
    ring: &'a [AtomicU64],
    head: &'a AtomicU64,
    tail: &'a AtomicU64,
}

impl<S: Sys> Queue<'_, S> {
    fn push(&self, value: u64) -> bool {
        self.lock.lock();
        let (head, tail) = (
            self.head.load(Ordering::Relaxed),
            self.tail.load(Ordering::Relaxed),
        );
        let ok = tail - head < self.ring.len() as u64;
        if ok {
            self.ring[(tail % self.ring.len() as u64) as usize].store(value, Ordering::Relaxed);
            self.tail.store(tail + 1, Ordering::Relaxed);
        }
        self.lock.unlock();
        ok
    }

    fn pop(&self) -> Option<u64> {
        self.lock.lock();
        let (head, tail) = (
            self.head.load(Ordering::Relaxed),
            self.tail.load(Ordering::Relaxed),
        );
        let value = (head < tail).then(|| {
            self.head.store(head + 1, Ordering::Relaxed);
            self.ring[(head % self.ring.len() as u64) as usize].load(Ordering::Relaxed)
        });
        self.lock.unlock();
        value
    }
}

impl Params {
    pub fn parse(args: &str) -> Result<Self, ArgError<'_>> {
        let [items, capacity, seed] = args::parse(args, &KEYS, NAMES)?;
        Ok(Params {
            items,
            capacity: capacity as usize,
            seed,
        })
    }

    pub fn mem_bytes(&self, _threads: usize) -> usize {
        CONTROL_BYTES + array_bytes::<u64>(self.capacity, 64) + 5 * array_bytes::<u64>(1, 64)
    }

    fn value(&self, i: u64) -> u64 {
        mix2(self.seed, i)
    }

    pub fn run<S: Sys>(&self, ctx: &Ctx<S>) -> Result<u64, Failure> {
        let mut alloc = ctx.alloc();
        let ring = alloc.array::<AtomicU64>(self.capacity, 64).atomics();
        let lock_word = &alloc.array::<AtomicU32>(1, 64).atomics()[0];
        let head = &alloc.array::<AtomicU64>(1, 64).atomics()[0];
        let tail = &alloc.array::<AtomicU64>(1, 64).atomics()[0];
        let claimed = &alloc.array::<AtomicU64>(1, 64).atomics()[0];
        let consumed = &alloc.array::<AtomicU64>(1, 64).atomics()[0];
        let queue = Queue {
            lock: SpinLock::new(lock_word, ctx.sys),
            ring,
            head,
            tail,
        };

        let backoff = |misses: &mut u32| {
            *misses += 1;
            if (*misses).is_multiple_of(64) {
                ctx.sys.relax();
            } else {
                core::hint::spin_loop();
            }
        };
        let (mut sum, mut count) = (0u64, 0u64);
        let mut consume_one = |misses: &mut u32| -> bool {
            match queue.pop() {
                Some(v) => {
                    sum = sum.wrapping_add(v);
                    count += 1;
                    consumed.fetch_add(1, Ordering::AcqRel);
                    true
                }
                None => {
                    backoff(misses);
                    false
                }
            }
        };
        let mut misses = 0u32;
        if ctx.threads == 1 {
            let mut next = 0;
            while next < self.items {
                while next < self.items && queue.push(self.value(next)) {
                    next += 1;
                }
                while consume_one(&mut misses) {}
            }
        } else if ctx.id.is_multiple_of(2) {
            loop {
                let i = claimed.fetch_add(1, Ordering::Relaxed);
                if i >= self.items {
                    break;
                }
                while !queue.push(self.value(i)) {
                    backoff(&mut misses);
                }
            }
        } else {
            while consumed.load(Ordering::Acquire) < self.items {
                consume_one(&mut misses);
            }
        }
        let mut expected = 0u64;
        for i in ctx.my_range(self.items as usize) {
            expected = expected.wrapping_add(self.value(i as u64));
        }
        let (sum, count, expected) = (ctx.sum(sum), ctx.sum(count), ctx.sum(expected));
        let failure = if count != self.items {
            Some(Failure::new("queue items consumed", 0, count, self.items))
        } else if sum != expected {
            Some(Failure::new("queue value sum", 0, sum, expected))
        } else {
            None
        };
        crate::agree(ctx, failure)?;
        Ok(mix2(sum, count))
    }
}
