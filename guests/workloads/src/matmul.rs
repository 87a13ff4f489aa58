//! Dense matrix multiply, C = A·B in f64, rows of C split across threads: A and B are
//! read-shared by every thread. Entries are small integers, so every sum is exact and
//! the result does not depend on how rows are split. Self-check: Freivalds' test,
//! C·x = A·(B·x) for an integer vector x, row by row.

use crate::args::{self, ArgError, Key};
use crate::runtime::{array_bytes, mix2, Ctx, Sys, CONTROL_BYTES};
use crate::Failure;

pub const KEYS: [Key; 2] = [
    Key {
        name: "n",
        default: 1000,
        min: 1,
        max: 16_384,
        help: "matrix dimension",
    },
    Key {
        name: "seed",
        default: 1,
        min: 0,
        max: u64::MAX,
        help: "input seed",
    },
];
const NAMES: &[&str] = &["n", "seed"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub n: usize,
    pub seed: u64,
}

fn entry(seed: u64, matrix: u64, i: usize, j: usize) -> f64 {
    (mix2(seed ^ matrix, (i as u64) << 32 | j as u64) % 7) as f64 - 3.0
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
        CONTROL_BYTES
            + 3 * array_bytes::<f64>(self.n * self.n, 4096)
            + 3 * array_bytes::<f64>(self.n, 64)
    }

    pub fn run<S: Sys>(&self, ctx: &Ctx<S>) -> Result<u64, Failure> {
        let n = self.n;
        let mut alloc = ctx.alloc();
        let (a, b, c) = (
            alloc.array::<f64>(n * n, 4096),
            alloc.array::<f64>(n * n, 4096),
            alloc.array::<f64>(n * n, 4096),
        );
        let (x, bx) = (alloc.array::<f64>(n, 64), alloc.array::<f64>(n, 64));
        let rows = ctx.my_range(n);
        {
            // SAFETY: each thread initialises its own rows of A, B and C and its part of x.
            let (ar, br) = unsafe {
                (
                    a.write(rows.start * n..rows.end * n),
                    b.write(rows.start * n..rows.end * n),
                )
            };
            for (r, i) in rows.clone().enumerate() {
                for j in 0..n {
                    ar[r * n + j] = entry(self.seed, 1, i, j);
                    br[r * n + j] = entry(self.seed, 2, i, j);
                }
            }
            // SAFETY: as above, for x.
            let xr = unsafe { x.write(rows.clone()) };
            for (r, i) in rows.clone().enumerate() {
                xr[r] = entry(self.seed, 3, i, 0);
            }
        }
        ctx.barrier();
        // SAFETY: A, B and x are only read from here on.
        let (a, b, x) = unsafe { (a.read(), b.read(), x.read()) };
        // SAFETY: each thread writes only its own rows of C.
        let cr = unsafe { c.write(rows.start * n..rows.end * n) };
        for (r, i) in rows.clone().enumerate() {
            let crow = &mut cr[r * n..(r + 1) * n];
            for k in 0..n {
                let aik = a[i * n + k];
                let brow = &b[k * n..(k + 1) * n];
                for (cj, bj) in crow.iter_mut().zip(brow) {
                    *cj += aik * bj;
                }
            }
        }
        // Freivalds: bx = B·x (rows split), then compare (C·x)_i with (A·bx)_i.
        // SAFETY: each thread writes its own part of bx.
        let bxr = unsafe { bx.write(rows.clone()) };
        for (r, i) in rows.clone().enumerate() {
            bxr[r] = (0..n).map(|k| b[i * n + k] * x[k]).sum();
        }
        ctx.barrier();
        // SAFETY: bx is only read from here on.
        let bx = unsafe { bx.read() };
        let mut failure = None;
        let mut local = 0u64;
        for (r, i) in rows.clone().enumerate() {
            let crow = &cr[r * n..(r + 1) * n];
            let cx: f64 = crow.iter().zip(x).map(|(c, x)| c * x).sum();
            let abx: f64 = (0..n).map(|k| a[i * n + k] * bx[k]).sum();
            if cx != abx && failure.is_none() {
                failure = Some(Failure::new(
                    "matmul Freivalds row",
                    i as u64,
                    cx as i64 as u64,
                    abx as i64 as u64,
                ));
            }
            for (j, v) in crow.iter().enumerate() {
                local = local.wrapping_add(mix2(v.to_bits(), (i * n + j) as u64));
            }
        }
        crate::agree(ctx, failure)?;
        Ok(ctx.sum(local))
    }
}
