//! Flotilla's workload suite: seven SMP programs with different sharing patterns, each
//! self-verifying and each producing a checksum that depends only on its arguments and
//! thread count.
//!
//! The crate is `no_std` and dependency-free, so the very same code is compiled into
//! guest images (`flotilla-guest-images`) and into host programs that compute reference
//! checksums and native timings. A workload is run by calling [`Prepared::run`] on every
//! thread with a [`Ctx`] over one shared, zero-filled region of [`Prepared::mem_bytes`].
#![cfg_attr(not(feature = "native"), no_std)]

pub mod args;
pub mod bfs;
pub mod chase;
pub mod kvstore;
pub mod matmul;
pub mod queue;
pub mod runtime;
pub mod sort;
pub mod stream;

use core::fmt;
pub use runtime::{Ctx, Sys};

/// A workload of the suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    Stream,
    Matmul,
    Bfs,
    Kvstore,
    Sort,
    Queue,
    Chase,
}

impl Workload {
    pub const ALL: [Workload; 7] = [
        Workload::Stream,
        Workload::Matmul,
        Workload::Bfs,
        Workload::Kvstore,
        Workload::Sort,
        Workload::Queue,
        Workload::Chase,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Workload::Stream => "stream",
            Workload::Matmul => "matmul",
            Workload::Bfs => "bfs",
            Workload::Kvstore => "kvstore",
            Workload::Sort => "sort",
            Workload::Queue => "queue",
            Workload::Chase => "chase",
        }
    }

    pub fn from_name(name: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == name)
    }

    /// One line on the sharing pattern.
    pub const fn summary(self) -> &'static str {
        match self {
            Workload::Stream => "partitioned stream/sum, no sharing",
            Workload::Matmul => "dense matrix multiply, read-shared inputs",
            Workload::Bfs => "BFS on a generated graph, irregular sharing",
            Workload::Kvstore => "hash-table key-value upserts, random writes",
            Workload::Sort => "parallel merge sort, phase changes",
            Workload::Queue => "producer/consumer queue, spin-lock and atomics",
            Workload::Chase => "pointer chasing, latency-bound",
        }
    }

    /// The keys this workload's argument string takes.
    pub fn keys(self) -> &'static [args::Key] {
        match self {
            Workload::Stream => &stream::KEYS,
            Workload::Matmul => &matmul::KEYS,
            Workload::Bfs => &bfs::KEYS,
            Workload::Kvstore => &kvstore::KEYS,
            Workload::Sort => &sort::KEYS,
            Workload::Queue => &queue::KEYS,
            Workload::Chase => &chase::KEYS,
        }
    }

    /// Parses the argument string.
    pub fn prepare(self, args: &str) -> Result<Prepared, args::ArgError<'_>> {
        Ok(match self {
            Workload::Stream => Prepared::Stream(stream::Params::parse(args)?),
            Workload::Matmul => Prepared::Matmul(matmul::Params::parse(args)?),
            Workload::Bfs => Prepared::Bfs(bfs::Params::parse(args)?),
            Workload::Kvstore => Prepared::Kvstore(kvstore::Params::parse(args)?),
            Workload::Sort => Prepared::Sort(sort::Params::parse(args)?),
            Workload::Queue => Prepared::Queue(queue::Params::parse(args)?),
            Workload::Chase => Prepared::Chase(chase::Params::parse(args)?),
        })
    }
}

/// A workload with parsed parameters, ready to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prepared {
    Stream(stream::Params),
    Matmul(matmul::Params),
    Bfs(bfs::Params),
    Kvstore(kvstore::Params),
    Sort(sort::Params),
    Queue(queue::Params),
    Chase(chase::Params),
}

impl Prepared {
    /// Bytes of shared memory the workload needs with `threads` threads.
    pub fn mem_bytes(&self, threads: usize) -> usize {
        match self {
            Prepared::Stream(p) => p.mem_bytes(threads),
            Prepared::Matmul(p) => p.mem_bytes(threads),
            Prepared::Bfs(p) => p.mem_bytes(threads),
            Prepared::Kvstore(p) => p.mem_bytes(threads),
            Prepared::Sort(p) => p.mem_bytes(threads),
            Prepared::Queue(p) => p.mem_bytes(threads),
            Prepared::Chase(p) => p.mem_bytes(threads),
        }
    }

    /// Runs the workload on this thread; every thread returns the same checksum.
    pub fn run<S: Sys>(&self, ctx: &Ctx<S>) -> Result<u64, Failure> {
        match self {
            Prepared::Stream(p) => p.run(ctx),
            Prepared::Matmul(p) => p.run(ctx),
            Prepared::Bfs(p) => p.run(ctx),
            Prepared::Kvstore(p) => p.run(ctx),
            Prepared::Sort(p) => p.run(ctx),
            Prepared::Queue(p) => p.run(ctx),
            Prepared::Chase(p) => p.run(ctx),
        }
    }
}

/// A failed self-check: which check, at which index, what was found and expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    pub check: &'static str,
    pub index: u64,
    pub got: u64,
    pub expected: u64,
}

impl Failure {
    pub const fn new(check: &'static str, index: u64, got: u64, expected: u64) -> Self {
        Failure {
            check,
            index,
            got,
            expected,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "self-check '{}' failed at index {}: got {:#x}, expected {:#x}",
            self.check, self.index, self.got, self.expected
        )
    }
}

/// Makes every thread fail if any thread's self-check failed.
fn agree<S: Sys>(ctx: &Ctx<S>, failure: Option<Failure>) -> Result<(), Failure> {
    if ctx.all(failure.is_none()) {
        return Ok(());
    }
    Err(failure.unwrap_or(Failure::new("another thread's self-check", 0, 0, 0)))
}

#[cfg(feature = "native")]
pub mod native;
