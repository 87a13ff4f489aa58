//! Parallel merge sort with phase changes: first every thread sorts its own chunk (private
//! data), then log2(threads) merge rounds in which groups of threads merge pairs of runs
//! into the other buffer, each thread producing an equal share of the group's output
//! (merge-path co-ranking), so the sharing pattern changes every round.
//! Self-check: the output is sorted and is a permutation of the input (multiset hash).

use crate::args::{self, ArgError, Key};
use crate::runtime::{array_bytes, mix2, mix64, split, Ctx, Sys, CONTROL_BYTES};
use crate::Failure;

pub const KEYS: [Key; 2] = [
    Key {
        name: "n",
        default: 16_000_000,
        min: 1,
        max: 1 << 34,
        help: "keys to sort",
    },
    Key {
        name: "seed",
        default: 1,
        min: 0,
        max: u64::MAX,
        help: "key seed",
    },
];
const NAMES: &[&str] = &["n", "seed"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub n: usize,
    pub seed: u64,
}

impl Params {
    pub fn parse(args: &str) -> Result<Self, ArgError<'_>> {
        let [n, seed] = args::parse(args, &KEYS, NAMES)?;
        Ok(Params {
            n: n as usize,
            seed,
        })
    }

    pub fn mem_bytes(&self, _threads: usize) -> usize {
        CONTROL_BYTES + 2 * array_bytes::<u64>(self.n, 4096)
    }

    pub fn run<S: Sys>(&self, ctx: &Ctx<S>) -> Result<u64, Failure> {
        let (n, t) = (self.n, ctx.threads);
        let mut alloc = ctx.alloc();
        let bufs = [alloc.array::<u64>(n, 4096), alloc.array::<u64>(n, 4096)];
        let chunk = |c: usize| split(n, t, c);

        let mine = chunk(ctx.id);
        let mut input_hash = 0u64;
        {
            // SAFETY: each thread fills and sorts its own chunk.
            let keys = unsafe { bufs[0].write(mine.clone()) };
            for (k, i) in mine.clone().enumerate() {
                keys[k] = mix2(self.seed, i as u64);
                input_hash = input_hash.wrapping_add(mix64(keys[k]));
            }
            keys.sort_unstable();
        }
        ctx.barrier();

        let mut src = 0;
        let mut width = 1; // chunks per sorted run
        while width < t {
            let group = ctx.id / (2 * width);
            let first = group * 2 * width;
            let (mid, last) = ((first + width).min(t), (first + 2 * width).min(t));
            let (lo, split_at, hi) = (
                chunk(first).start,
                chunk(mid).start.min(n),
                chunk(last - 1).end,
            );
            // SAFETY: during a round every buffer `src` is only read; each thread writes a
            // disjoint part of `dst` (its share of its group's output range).
            let (from, to) = (unsafe { bufs[src].read() }, bufs[src ^ 1]);
            let (a, b) = (&from[lo..split_at], &from[split_at..hi]);
            let share = split(hi - lo, last - first, ctx.id - first);
            let (i0, i1) = (co_rank(share.start, a, b), co_rank(share.end, a, b));
            // SAFETY: see above; `share` ranges of one group tile its output exactly.
            let out = unsafe { to.write(lo + share.start..lo + share.end) };
            merge(&a[i0..i1], &b[share.start - i0..share.end - i1], out);
            ctx.barrier();
            src ^= 1;
            width *= 2;
        }

        // SAFETY: the final buffer is only read from here on.
        let sorted = unsafe { bufs[src].read() };
        let mut failure = None;
        let mut output_hash = 0u64;
        let mut local = 0u64;
        for i in mine {
            output_hash = output_hash.wrapping_add(mix64(sorted[i]));
            local = local.wrapping_add(mix2(sorted[i], i as u64));
            if i + 1 < n && sorted[i] > sorted[i + 1] && failure.is_none() {
                failure = Some(Failure::new(
                    "sort order",
                    i as u64,
                    sorted[i],
                    sorted[i + 1],
                ));
            }
        }
        let (input_hash, output_hash) = (ctx.sum(input_hash), ctx.sum(output_hash));
        if input_hash != output_hash && failure.is_none() {
            failure = Some(Failure::new(
                "sort permutation hash",
                0,
                output_hash,
                input_hash,
            ));
        }
        crate::agree(ctx, failure)?;
        Ok(ctx.sum(local))
    }
}

/// How many of the first `k` merged outputs come from `a` (ties taken from `a` first).
fn co_rank(k: usize, a: &[u64], b: &[u64]) -> usize {
    let (mut lo, mut hi) = (k.saturating_sub(b.len()), k.min(a.len()));
    loop {
        let i = (lo + hi) / 2;
        let j = k - i;
        if i > 0 && j < b.len() && a[i - 1] > b[j] {
            hi = i - 1;
        } else if j > 0 && i < a.len() && b[j - 1] >= a[i] {
            lo = i + 1;
        } else {
            return i;
        }
    }
}

fn merge(a: &[u64], b: &[u64], out: &mut [u64]) {
    let (mut i, mut j) = (0, 0);
    for slot in out.iter_mut() {
        if j == b.len() || (i < a.len() && a[i] <= b[j]) {
            *slot = a[i];
            i += 1;
        } else {
            *slot = b[j];
            j += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn co_rank_splits_merges_correctly() {
        let a = [1, 3, 3, 5, 9];
        let b = [2, 3, 4, 10];
        let mut all = [0u64; 9];
        for k0 in 0..=9 {
            for k1 in k0..=9 {
                let (i0, i1) = (co_rank(k0, &a, &b), co_rank(k1, &a, &b));
                merge(&a[i0..i1], &b[k0 - i0..k1 - i1], &mut all[k0..k1]);
            }
        }
        assert_eq!(all, [1, 2, 3, 3, 3, 4, 5, 9, 10]);
    }
}
