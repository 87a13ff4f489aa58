//! Partitioned stream/sum: no sharing. Each thread owns a contiguous slice of three
//! arrays and runs `reps` rounds of a triad (`a = b + 3c`, then `b = a ^ (c >> 1)`,
//! `c = c + 1`) over it, then the sum is reduced. Each element's final value has a short
//! closed-form replay, which the self-check uses on a sample.

use crate::args::{self, ArgError, Key};
use crate::runtime::{array_bytes, mix2, Ctx, Sys, CONTROL_BYTES};
use crate::Failure;

pub const KEYS: [Key; 3] = [
    Key {
        name: "n",
        default: 4_000_000,
        min: 1,
        max: 1_000_000_000,
        help: "elements per array",
    },
    Key {
        name: "reps",
        default: 60,
        min: 1,
        max: 1_000_000,
        help: "triad rounds",
    },
    Key {
        name: "seed",
        default: 1,
        min: 0,
        max: u64::MAX,
        help: "input seed",
    },
];
const NAMES: &[&str] = &["n", "reps", "seed"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub n: usize,
    pub reps: u64,
    pub seed: u64,
}

fn initial(seed: u64, i: usize) -> (u64, u64) {
    (mix2(seed, i as u64) & 0xFFFF, i as u64 & 0xFF)
}

/// Replays one element's rounds; the reference the sampled self-check compares with.
fn replay(seed: u64, i: usize, reps: u64) -> u64 {
    let (mut b, mut c) = initial(seed, i);
    let mut a = 0u64;
    for _ in 0..reps {
        a = b.wrapping_add(c.wrapping_mul(3));
        b = a ^ (c >> 1);
        c = c.wrapping_add(1);
    }
    a
}

impl Params {
    pub fn parse(args: &str) -> Result<Self, ArgError<'_>> {
        let [n, reps, seed] = args::parse(args, &KEYS, NAMES)?;
        Ok(Params {
            n: n as usize,
            reps,
            seed,
        })
    }

    pub fn mem_bytes(&self, _threads: usize) -> usize {
        CONTROL_BYTES + 3 * array_bytes::<u64>(self.n, 4096)
    }

    pub fn run<S: Sys>(&self, ctx: &Ctx<S>) -> Result<u64, Failure> {
        let mut alloc = ctx.alloc();
        let (a, b, c) = (
            alloc.array::<u64>(self.n, 4096),
            alloc.array::<u64>(self.n, 4096),
            alloc.array::<u64>(self.n, 4096),
        );
        let mine = ctx.my_range(self.n);
        // SAFETY: every thread writes and reads only its own range of each array.
        let (a, b, c) = unsafe {
            (
                a.write(mine.clone()),
                b.write(mine.clone()),
                c.write(mine.clone()),
            )
        };
        for (k, i) in mine.clone().enumerate() {
            let (bi, ci) = initial(self.seed, i);
            b[k] = bi;
            c[k] = ci;
        }
        for _ in 0..self.reps {
            for k in 0..a.len() {
                a[k] = b[k].wrapping_add(c[k].wrapping_mul(3));
            }
            for k in 0..a.len() {
                b[k] = a[k] ^ (c[k] >> 1);
                c[k] = c[k].wrapping_add(1);
            }
        }
        let mut local = 0u64;
        for (k, v) in a.iter().enumerate() {
            local = local.wrapping_add(mix2(*v, (mine.start + k) as u64));
        }
        // Self-check: replay a sample of this thread's elements.
        let mut failure = None;
        let step = (a.len() / 64).max(1);
        for k in (0..a.len()).step_by(step) {
            let expected = replay(self.seed, mine.start + k, self.reps);
            if a[k] != expected {
                failure = Some(Failure::new(
                    "stream element",
                    (mine.start + k) as u64,
                    a[k],
                    expected,
                ));
                break;
            }
        }
        crate::agree(ctx, failure)?;
        Ok(ctx.sum(local))
    }
}
