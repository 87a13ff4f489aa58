//! Pointer chasing: one random cycle through `nodes` cache-line-sized nodes (Sattolo's
//! shuffle), read-shared by every thread; each thread follows it for `steps` hops from
//! its own starting node. Every hop is a dependent load: latency-bound.
//! Self-check: the permutation is one cycle of length `nodes`.

use crate::args::{self, ArgError, Key};
use crate::runtime::{array_bytes, mix2, split, Ctx, Sys, CONTROL_BYTES};
use crate::Failure;

pub const KEYS: [Key; 3] = [
    Key {
        name: "nodes",
        default: 1_000_000,
        min: 2,
        max: 1 << 30,
        help: "nodes in the cycle (64 bytes each)",
    },
    Key {
        name: "steps",
        default: 2_000_000,
        min: 1,
        max: 1 << 40,
        help: "hops per thread",
    },
    Key {
        name: "seed",
        default: 1,
        min: 0,
        max: u64::MAX,
        help: "shuffle seed",
    },
];
const NAMES: &[&str] = &["nodes", "steps", "seed"];

/// u64 words per node: one cache line.
const STRIDE: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub nodes: usize,
    pub steps: u64,
    pub seed: u64,
}

impl Params {
    pub fn parse(args: &str) -> Result<Self, ArgError<'_>> {
        let [nodes, steps, seed] = args::parse(args, &KEYS, NAMES)?;
        Ok(Params {
            nodes: nodes as usize,
            steps,
            seed,
        })
    }

    pub fn mem_bytes(&self, _threads: usize) -> usize {
        CONTROL_BYTES + array_bytes::<u64>(self.nodes * STRIDE, 4096)
    }

    pub fn run<S: Sys>(&self, ctx: &Ctx<S>) -> Result<u64, Failure> {
        let n = self.nodes;
        let mut alloc = ctx.alloc();
        let next = alloc.array::<u64>(n * STRIDE, 4096);
        if ctx.id == 0 {
            // SAFETY: only thread 0 touches the array until the barrier below.
            let next = unsafe { next.write(0..n * STRIDE) };
            for i in 0..n {
                next[i * STRIDE] = i as u64;
            }
            let mut state = self.seed;
            for i in (1..n).rev() {
                state = mix2(state, i as u64);
                let j = (state % i as u64) as usize;
                next.swap(i * STRIDE, j * STRIDE);
            }
        }
        ctx.barrier();
        // SAFETY: read-only from here on.
        let next = unsafe { next.read() };

        let mut at = split(n, ctx.threads, ctx.id).start as u64;
        let mut acc = 0u64;
        for _ in 0..self.steps {
            at = next[at as usize * STRIDE];
            acc = acc.wrapping_add(at);
        }
        let mut failure = None;
        if ctx.id == 0 {
            let (mut at, mut len) = (next[0], 1usize);
            while at != 0 && len <= n {
                at = next[at as usize * STRIDE];
                len += 1;
            }
            if len != n {
                failure = Some(Failure::new("chase cycle length", 0, len as u64, n as u64));
            }
        }
        crate::agree(ctx, failure)?;
        Ok(ctx.sum(mix2(acc, at)))
    }
}
