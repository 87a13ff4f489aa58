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
    Pin(std::io::Error),
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
            NativeError::Pin(e) => write!(f, "cannot pin a workload thread to its CPU: {e}"),
            NativeError::Failed(failure) => write!(f, "{failure}"),
            NativeError::Panicked => write!(f, "a workload thread panicked"),
        }
    }
}

impl std::error::Error for NativeError {}

/// Where the threads wait to start together.
#[derive(Default)]
struct Gate {
    /// `Some(true)`: go; `Some(false)`: the run is off.
    go: Option<bool>,
    /// Threads that reached the gate.
    ready: usize,
    pin_error: Option<std::io::Error>,
}

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
    run_pinned(workload, threads, &[])
}

/// Pins the calling thread to `cpu`.
pub fn pin_thread(cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::other(format!("no CPU {cpu}")));
    }
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it (checked
    // above); sched_setaffinity only reads it.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// [`run`] with thread `i` pinned to `cpus[i % cpus.len()]` (no pinning if empty), as the
/// overhead benchmark pins vCPU `i` of the guest, so both sides get the same placement.
pub fn run_pinned(
    workload: &Prepared,
    threads: usize,
    cpus: &[usize],
) -> Result<NativeRun, NativeError> {
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
    // Huge pages where the host gives them, as for guest RAM (`GuestMemory::new`): with
    // THP in `madvise` mode only advised memory gets them, and a comparison where only
    // the guest had them made matmul 28% faster as a guest than natively.
    // SAFETY: advising the range we just mapped.
    unsafe { libc::madvise(base, len, libc::MADV_HUGEPAGE) };
    let region = Region {
        base: base as *mut u8,
        len,
    };
    // Threads start together once all exist; if one cannot be spawned, none runs (a
    // partial set would wait forever at the workload's first barrier).
    let gate = (Mutex::new(Gate::default()), Condvar::new());
    let mut start = Instant::now();
    let results: Result<Vec<Result<u64, NativeError>>, NativeError> = std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(threads);
        for id in 0..threads {
            let (region, gate) = (&region, &gate);
            let spawned = std::thread::Builder::new()
                .name(format!("native{id}"))
                .spawn_scoped(scope, move || {
                    let pinned = match cpus.get(id % cpus.len().max(1)) {
                        Some(&cpu) => pin_thread(cpu).err(),
                        None => None,
                    };
                    let mut g = gate.0.lock().unwrap_or_else(|p| p.into_inner());
                    g.ready += 1;
                    if g.pin_error.is_none() {
                        g.pin_error = pinned;
                    }
                    gate.1.notify_all();
                    while g.go.is_none() {
                        g = gate.1.wait(g).unwrap_or_else(|p| p.into_inner());
                    }
                    if g.go != Some(true) {
                        return None;
                    }
                    drop(g);
                    // SAFETY: the mapping is zero-filled, page aligned, shared by exactly
                    // these `threads` threads, and unmapped only after they are joined.
                    let ctx = unsafe { Ctx::new(id, threads, &Host, region.base, region.len) };
                    Some(workload.run(&ctx))
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    gate.0.lock().unwrap_or_else(|p| p.into_inner()).go = Some(false);
                    gate.1.notify_all();
                    return Err(NativeError::Spawn(e));
                }
            }
        }
        // Every thread is pinned (or failed to be) before any starts.
        let mut g = gate.0.lock().unwrap_or_else(|p| p.into_inner());
        while g.ready < threads {
            g = gate.1.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        if let Some(e) = g.pin_error.take() {
            g.go = Some(false);
            gate.1.notify_all();
            return Err(NativeError::Pin(e));
        }
        start = Instant::now();
        g.go = Some(true);
        drop(g);
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
