//! Running a workload natively: one host thread per workload thread over one fresh,
//! lazily allocated anonymous mapping, the host's counterpart of guest RAM's free range.
//! This gives the reference checksum a guest run must match, and the native timing the
//! overhead benchmark compares with.

use crate::runtime::{Ctx, Sys, MAX_THREADS};
use crate::{Failure, Prepared};
use std::sync::atomic::AtomicU32;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Futex wait/wake and sched_yield: the host's equivalents of the guest hypercalls.
struct Host;

impl Sys for Host {
    fn wait(&self, word: &AtomicU32, expected: u32) {
        // SAFETY: FUTEX_WAIT on a live, aligned u32; spurious returns are fine.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                expected,
                std::ptr::null::<libc::timespec>(),
            )
        };
    }

    fn wake_all(&self, word: &AtomicU32) {
        // SAFETY: FUTEX_WAKE on a live, aligned u32.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                i32::MAX,
            )
        };
    }

    fn relax(&self) {
        std::thread::yield_now();
    }
}

/// A native run's result.
#[derive(Debug, Clone, Copy)]
pub struct NativeRun {
    pub checksum: u64,
    /// From spawning the threads to the last one finishing.
    pub wall: Duration,
}

/// Why a native run failed.
#[derive(Debug)]
pub enum NativeError {
    Threads(usize),
    Mmap(std::io::Error),
    Spawn(std::io::Error),
    Failed(Failure),
    Panicked,
}

impl std::fmt::Display for NativeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NativeError::Threads(n) => {
                write!(f, "{n} threads requested; 1 to {MAX_THREADS} supported")
            }
            NativeError::Mmap(e) => write!(f, "cannot map workload memory: {e}"),
            NativeError::Spawn(e) => write!(f, "cannot start a workload thread: {e}"),
            NativeError::Failed(failure) => write!(f, "{failure}"),
            NativeError::Panicked => write!(f, "a workload thread panicked"),
        }
    }
}

impl std::error::Error for NativeError {}

struct Region {
    base: *mut u8,
    len: usize,
}

// SAFETY: the region is plain memory handed to workload threads under Ctx's contract.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping after every thread has finished.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// Runs `workload` on `threads` host threads and returns its checksum and wall time.
pub fn run(workload: &Prepared, threads: usize) -> Result<NativeRun, NativeError> {
    if threads == 0 || threads > MAX_THREADS {
        return Err(NativeError::Threads(threads));
    }
    let len = workload.mem_bytes(threads).next_multiple_of(4096);
    // SAFETY: fresh anonymous mapping, checked below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(NativeError::Mmap(std::io::Error::last_os_error()));
    }
    let region = Region {
        base: base as *mut u8,
        len,
    };
    // Threads start together once all exist; if one cannot be spawned, none runs (a
    // partial set would wait forever at the workload's first barrier).
    let gate = (Mutex::new(None::<bool>), Condvar::new());
    let mut start = Instant::now();
    let results: Result<Vec<Result<u64, NativeError>>, NativeError> = std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(threads);
        for id in 0..threads {
            let (region, gate) = (&region, &gate);
            let spawned = std::thread::Builder::new()
                .name(format!("native{id}"))
                .spawn_scoped(scope, move || {
                    let mut go = gate.0.lock().unwrap_or_else(|p| p.into_inner());
                    while go.is_none() {
                        go = gate.1.wait(go).unwrap_or_else(|p| p.into_inner());
                    }
                    if *go != Some(true) {
                        return None;
                    }
                    drop(go);
                    // SAFETY: the mapping is zero-filled, page aligned, shared by exactly
                    // these `threads` threads, and unmapped only after they are joined.
                    let ctx = unsafe { Ctx::new(id, threads, &Host, region.base, region.len) };
                    Some(workload.run(&ctx))
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    *gate.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(false);
                    gate.1.notify_all();
                    return Err(NativeError::Spawn(e));
                }
            }
        }
        start = Instant::now();
        *gate.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(true);
        gate.1.notify_all();
        Ok(handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(Some(Ok(sum))) => Ok(sum),
                Ok(Some(Err(failure))) => Err(NativeError::Failed(failure)),
                Ok(None) | Err(_) => Err(NativeError::Panicked),
            })
            .collect())
    });
    let wall = start.elapsed();
    let mut checksum = 0;
    for r in results? {
        checksum = r?;
    }
    Ok(NativeRun { checksum, wall })
}
