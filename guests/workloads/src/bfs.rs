//! Level-synchronous BFS on a generated random graph (fixed out-degree, CSR). Threads take
//! chunks of the frontier dynamically and claim vertices with compare-and-swap on a shared
//! level array: irregular, data-dependent sharing. Levels are deterministic (BFS
//! distance), so the checksum is too; parents are racy and only self-checked.
//! Self-check: the source has level 0; every reached vertex's parent has an edge to it
//! and is one level closer; no edge skips a level.

use crate::args::{self, ArgError, Key};
use crate::runtime::{array_bytes, mix2, Ctx, Sys, CONTROL_BYTES};
use crate::Failure;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub const KEYS: [Key; 3] = [
    Key {
        name: "vertices",
        default: 3_000_000,
        min: 2,
        max: 1 << 30,
        help: "graph vertices",
    },
    Key {
        name: "degree",
        default: 8,
        min: 1,
        max: 64,
        help: "out-edges per vertex",
    },
    Key {
        name: "seed",
        default: 1,
        min: 0,
        max: u64::MAX,
        help: "graph seed",
    },
];
const NAMES: &[&str] = &["vertices", "degree", "seed"];

const UNREACHED: u32 = u32::MAX;
const CHUNK: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub vertices: usize,
    pub degree: usize,
    pub seed: u64,
}

impl Params {
    pub fn parse(args: &str) -> Result<Self, ArgError<'_>> {
        let [vertices, degree, seed] = args::parse(args, &KEYS, NAMES)?;
        Ok(Params {
            vertices: vertices as usize,
            degree: degree as usize,
            seed,
        })
    }

    pub fn mem_bytes(&self, _threads: usize) -> usize {
        let v = self.vertices;
        CONTROL_BYTES
            + array_bytes::<u32>(v * self.degree, 4096)
            + 4 * array_bytes::<u32>(v, 4096)
            + 4 * array_bytes::<u64>(1, 64)
    }

    pub fn run<S: Sys>(&self, ctx: &Ctx<S>) -> Result<u64, Failure> {
        let (v, d) = (self.vertices, self.degree);
        let mut alloc = ctx.alloc();
        let adj = alloc.array::<u32>(v * d, 4096);
        let level = alloc.array::<AtomicU32>(v, 4096).atomics();
        let parent = alloc.array::<AtomicU32>(v, 4096).atomics();
        let frontiers = [
            alloc.array::<AtomicU32>(v, 4096).atomics(),
            alloc.array::<AtomicU32>(v, 4096).atomics(),
        ];
        let lens = [
            alloc.array::<AtomicU64>(1, 64).atomics(),
            alloc.array::<AtomicU64>(1, 64).atomics(),
        ];
        let cursor = alloc.array::<AtomicU64>(1, 64).atomics();

        let mine = ctx.my_range(v);
        {
            // SAFETY: each thread writes the edges of its own vertices.
            let edges = unsafe { adj.write(mine.start * d..mine.end * d) };
            for (k, u) in mine.clone().enumerate() {
                for j in 0..d {
                    edges[k * d + j] = (mix2(self.seed, (u * d + j) as u64) % v as u64) as u32;
                }
                level[u].store(UNREACHED, Ordering::Relaxed);
            }
        }
        if ctx.id == 0 {
            level[0].store(0, Ordering::Relaxed);
            parent[0].store(0, Ordering::Relaxed);
            frontiers[0][0].store(0, Ordering::Relaxed);
            lens[0][0].store(1, Ordering::Relaxed);
        }
        ctx.barrier();
        // SAFETY: the adjacency array is only read from here on.
        let adj = unsafe { adj.read() };

        let mut depth = 0u32;
        let mut cur = 0;
        loop {
            let len = lens[cur][0].load(Ordering::Acquire) as usize;
            if len == 0 {
                break;
            }
            let (frontier, next, next_len) =
                (frontiers[cur], frontiers[cur ^ 1], &lens[cur ^ 1][0]);
            let mut out = [0u32; 64];
            let mut out_len = 0;
            loop {
                let start = cursor[0].fetch_add(CHUNK as u64, Ordering::Relaxed) as usize;
                if start >= len {
                    break;
                }
                for slot in &frontier[start..(start + CHUNK).min(len)] {
                    let u = slot.load(Ordering::Relaxed) as usize;
                    for &w in &adj[u * d..(u + 1) * d] {
                        let w = w as usize;
                        if level[w].load(Ordering::Relaxed) == UNREACHED
                            && level[w]
                                .compare_exchange(
                                    UNREACHED,
                                    depth + 1,
                                    Ordering::Relaxed,
                                    Ordering::Relaxed,
                                )
                                .is_ok()
                        {
                            parent[w].store(u as u32, Ordering::Relaxed);
                            out[out_len] = w as u32;
                            out_len += 1;
                            if out_len == out.len() {
                                flush(next, next_len, &out[..out_len]);
                                out_len = 0;
                            }
                        }
                    }
                }
            }
            flush(next, next_len, &out[..out_len]);
            ctx.barrier();
            if ctx.id == 0 {
                cursor[0].store(0, Ordering::Relaxed);
                lens[cur][0].store(0, Ordering::Relaxed);
            }
            ctx.barrier();
            cur ^= 1;
            depth += 1;
        }

        let mut failure = None;
        let mut local = 0u64;
        for u in mine {
            let lu = level[u].load(Ordering::Relaxed);
            local = local.wrapping_add(mix2(u as u64, lu as u64));
            if failure.is_some() {
                continue;
            }
            if u == 0 && lu != 0 {
                failure = Some(Failure::new("bfs source level", 0, lu as u64, 0));
            } else if u != 0 && lu != UNREACHED {
                let p = parent[u].load(Ordering::Relaxed) as usize;
                let lp = level[p].load(Ordering::Relaxed);
                if lp.wrapping_add(1) != lu || !adj[p * d..(p + 1) * d].contains(&(u as u32)) {
                    failure = Some(Failure::new(
                        "bfs parent",
                        u as u64,
                        lp as u64,
                        lu as u64 - 1,
                    ));
                }
            }
            if lu != UNREACHED {
                for &w in &adj[u * d..(u + 1) * d] {
                    let lw = level[w as usize].load(Ordering::Relaxed);
                    if lw == UNREACHED || lw > lu + 1 {
                        failure = Some(Failure::new(
                            "bfs edge skips a level",
                            w as u64,
                            lw as u64,
                            lu as u64 + 1,
                        ));
                    }
                }
            }
        }
        crate::agree(ctx, failure)?;
        Ok(ctx.sum(local))
    }
}

fn flush(next: &[AtomicU32], next_len: &AtomicU64, items: &[u32]) {
    if items.is_empty() {
        return;
    }
    let at = next_len.fetch_add(items.len() as u64, Ordering::Relaxed) as usize;
    for (slot, &w) in next[at..at + items.len()].iter().zip(items) {
        slot.store(w, Ordering::Relaxed);
    }
}
