//! Hash-table key-value store with random keys: every thread performs upserts
//! (insert-or-add) on a shared open-addressing table, so writes land on random cache
//! lines and pages. Keys come from a global sequence split across threads, and values
//! are combined by addition, so the final table contents do not depend on interleaving.
//! Self-check: the values in the table add up to the total added, and every stored key
//! is found again at its own slot (no key stored twice).

use crate::args::{self, ArgError, Key};
use crate::runtime::{array_bytes, mix2, mix64, Ctx, Sys, CONTROL_BYTES};
use crate::Failure;
use core::sync::atomic::{AtomicU64, Ordering};

pub const KEYS: [Key; 3] = [
    Key {
        name: "ops",
        default: 20_000_000,
        min: 1,
        max: 1 << 40,
        help: "upserts in total",
    },
    Key {
        name: "keys",
        default: 2_000_000,
        min: 1,
        max: 1 << 30,
        help: "distinct key space",
    },
    Key {
        name: "seed",
        default: 1,
        min: 0,
        max: u64::MAX,
        help: "key seed",
    },
];
const NAMES: &[&str] = &["ops", "keys", "seed"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub ops: u64,
    pub keys: u64,
    pub seed: u64,
}

impl Params {
    pub fn parse(args: &str) -> Result<Self, ArgError<'_>> {
        let [ops, keys, seed] = args::parse(args, &KEYS, NAMES)?;
        Ok(Params { ops, keys, seed })
    }

    fn capacity(&self) -> usize {
        (2 * self.keys as usize).next_power_of_two()
    }

    pub fn mem_bytes(&self, _threads: usize) -> usize {
        CONTROL_BYTES + 2 * array_bytes::<u64>(self.capacity(), 4096)
    }

    fn op(&self, i: u64) -> (u64, u64) {
        (mix2(self.seed, i) % self.keys + 1, (i & 0xFF) + 1)
    }

    pub fn run<S: Sys>(&self, ctx: &Ctx<S>) -> Result<u64, Failure> {
        let cap = self.capacity();
        let mask = cap - 1;
        let mut alloc = ctx.alloc();
        let keys = alloc.array::<AtomicU64>(cap, 4096).atomics();
        let values = alloc.array::<AtomicU64>(cap, 4096).atomics();
        // Fresh memory is zero, and zero means "empty slot"; clear anyway so the region
        // may be reused.
        for slot in ctx.my_range(cap) {
            keys[slot].store(0, Ordering::Relaxed);
            values[slot].store(0, Ordering::Relaxed);
        }
        ctx.barrier();

        let ops = ctx.my_range(self.ops as usize);
        let mut added = 0u64;
        for i in ops {
            let (key, value) = self.op(i as u64);
            let mut slot = mix64(key) as usize & mask;
            loop {
                let k = keys[slot].load(Ordering::Acquire);
                if k == key {
                    break;
                }
                if k == 0 {
                    match keys[slot].compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire) {
                        Ok(_) => break,
                        Err(other) if other == key => break,
                        Err(_) => {}
                    }
                }
                slot = (slot + 1) & mask;
            }
            values[slot].fetch_add(value, Ordering::Relaxed);
            added = added.wrapping_add(value);
        }
        ctx.barrier();

        let mut failure = None;
        let mut local = 0u64;
        let mut stored = 0u64;
        for slot in ctx.my_range(cap) {
            let key = keys[slot].load(Ordering::Relaxed);
            if key == 0 {
                continue;
            }
            let value = values[slot].load(Ordering::Relaxed);
            stored = stored.wrapping_add(value);
            local = local.wrapping_add(mix2(key, value));
            // The first slot holding `key` along its probe sequence must be this one.
            let mut probe = mix64(key) as usize & mask;
            while keys[probe].load(Ordering::Relaxed) != key {
                probe = (probe + 1) & mask;
            }
            if probe != slot && failure.is_none() {
                failure = Some(Failure::new(
                    "kvstore key stored twice",
                    key,
                    slot as u64,
                    probe as u64,
                ));
            }
        }
        let (stored, added) = (ctx.sum(stored), ctx.sum(added));
        if stored != added && failure.is_none() {
            failure = Some(Failure::new("kvstore value total", 0, stored, added));
        }
        crate::agree(ctx, failure)?;
        Ok(ctx.sum(local))
    }
}
