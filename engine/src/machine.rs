//! A guest machine on one node: guest RAM, one KVM VM, and one host thread per vCPU.
//!
//! [`Machine::boot`] validates and loads an image; [`Machine::start`] spawns the vCPU
//! threads plus a watchdog and returns a [`RunningMachine`], which can be paused (every
//! vCPU's full state captured into a [`Snapshot`]), resumed, stopped, or waited for.
//! [`Machine::restore`] builds a fresh VM from a snapshot and the same guest memory.
//!
//! A run ends when a vCPU calls EXIT, when every vCPU has returned from the entry point
//! (the code is vCPU 0's return value), or with an [`Error`]: triple fault, an exit the
//! engine does not handle, a bad hypercall, a futex deadlock, or the timeout. (Guests run
//! at CPL 3, so `hlt` faults instead of halting a vCPU forever.) Whoever ends the run kicks every other vCPU out of the guest.

use crate::boot::{check_args, check_machine, BootError, BootLayout};
use crate::futex::{FutexTable, WaitOutcome};
use crate::hypercall::{self, result_offset, Hypercall, HypercallError};
use crate::kvm::{kick, Exit, Hypervisor, KvmError, Vcpu, VcpuState, Vm};
use crate::loader::{Image, LoadError};
use crate::memory::{GuestMemory, MemoryError};
use flotilla_abi::{errno, STACK_BYTES_DEFAULT};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Most console output kept in an [`Outcome`].
pub const CONSOLE_MAX_BYTES: usize = 1 << 20;

/// What the guest's console output does besides being kept in the [`Outcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleMode {
    /// Keep it only.
    Capture,
    /// Also write fd 1 to this process's stdout and fd 2 to its stderr as it arrives.
    Forward,
}

/// How to build a machine.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub vcpus: u32,
    pub mem_bytes: u64,
    /// The argument string the guest finds in its boot info.
    pub args: String,
    pub stack_bytes: u64,
    /// End the run with [`Error::Timeout`] after this long.
    pub timeout: Option<Duration>,
    pub console: ConsoleMode,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpus: 1,
            mem_bytes: 256 << 20,
            args: String::new(),
            stack_bytes: STACK_BYTES_DEFAULT,
            timeout: None,
            console: ConsoleMode::Capture,
        }
    }
}

/// Why a machine could not be built or why its run failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("guest image: {0}")]
    Load(#[from] LoadError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("vCPU {vcpu}: guest triple fault (rip {rip:#x}); the guest ended")]
    TripleFault { vcpu: u32, rip: u64 },
    #[error("vCPU {vcpu}: unhandled exit at rip {rip:#x}: {exit}")]
    UnhandledExit { vcpu: u32, rip: u64, exit: String },
    #[error("vCPU {vcpu}: bad hypercall at rip {rip:#x}: {source}")]
    BadHypercall {
        vcpu: u32,
        rip: u64,
        source: HypercallError,
    },
    #[error("deadlock: every running vCPU waits in futex_wait with no timeout (last: vCPU {vcpu} on {addr:#x})")]
    Deadlock { vcpu: u32, addr: u64 },
    #[error("the guest did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the guest ended before it could be paused")]
    EndedBeforePause,
    #[error("snapshot has {got} vCPUs, the configuration {want}")]
    SnapshotMismatch { got: usize, want: u32 },
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("vCPU {0} thread panicked")]
    ThreadPanicked(u32),
}

/// The result of a finished run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The EXIT code, or vCPU 0's return value.
    pub exit_code: i32,
    /// The value the guest reported with REPORT (a workload's checksum).
    pub report: Option<u64>,
    /// Console output, fd 1 and 2 interleaved, at most [`CONSOLE_MAX_BYTES`].
    pub console: Vec<u8>,
    pub console_truncated: bool,
    /// From the vCPU threads' start to the end of the run.
    pub wall: Duration,
    /// Exits from the guest to the engine, all vCPUs.
    pub exits: u64,
}

/// Every vCPU's state, captured while paused, with what a restore needs besides RAM.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// `None` for vCPUs that had already returned.
    pub vcpus: Vec<Option<VcpuState>>,
    pub returned: Vec<Option<i32>>,
    pub report: Option<u64>,
    /// The guest's monotonic clock at the pause; a restored guest's clock continues from it.
    pub clock_ns: u64,
}

/// A built machine, not yet running.
pub struct Machine {
    config: MachineConfig,
    memory: Arc<GuestMemory>,
    vm: Vm,
    vcpus: Vec<Vcpu>,
    returned: Vec<Option<i32>>,
    report: Option<u64>,
    clock_ns: u64,
}

impl Machine {
    /// Validates `image` and the configuration, then builds the VM with every vCPU at the
    /// entry point.
    pub fn boot(config: MachineConfig, image: &[u8]) -> Result<Self, Error> {
        check_machine(config.vcpus, config.mem_bytes)?;
        check_args(&config.args)?;
        let image = Image::parse(image, config.mem_bytes)?;
        let layout = BootLayout::new(&image, config.vcpus, config.mem_bytes, config.stack_bytes)?;
        let hypervisor = Hypervisor::open()?;
        let memory = Arc::new(GuestMemory::new(config.mem_bytes)?);
        image.load(&memory)?;
        layout.write(&memory, &config.args)?;
        let vm = hypervisor.create_vm(&memory)?;
        let vcpus = (0..config.vcpus)
            .map(|id| {
                let vcpu = vm.create_vcpu(id)?;
                vcpu.set_boot_state(&layout)?;
                Ok(vcpu)
            })
            .collect::<Result<Vec<_>, Error>>()?;
        tracing::debug!(
            vcpus = config.vcpus,
            mem_bytes = config.mem_bytes,
            entry = layout.entry,
            "machine booted"
        );
        let returned = vec![None; config.vcpus as usize];
        Ok(Machine {
            config,
            memory,
            vm,
            vcpus,
            returned,
            report: None,
            clock_ns: 0,
        })
    }

    /// Builds a fresh VM over `memory` and restores every vCPU from `snapshot`.
    pub fn restore(
        config: MachineConfig,
        memory: Arc<GuestMemory>,
        snapshot: &Snapshot,
    ) -> Result<Self, Error> {
        check_machine(config.vcpus, config.mem_bytes)?;
        if snapshot.vcpus.len() != config.vcpus as usize
            || snapshot.returned.len() != config.vcpus as usize
        {
            return Err(Error::SnapshotMismatch {
                got: snapshot.vcpus.len(),
                want: config.vcpus,
            });
        }
        let hypervisor = Hypervisor::open()?;
        let vm = hypervisor.create_vm(&memory)?;
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for (id, state) in snapshot.vcpus.iter().enumerate() {
            let vcpu = vm.create_vcpu(id as u32)?;
            if let Some(state) = state {
                vcpu.restore(state)?;
            }
            vcpus.push(vcpu);
        }
        Ok(Machine {
            config,
            memory,
            vm,
            vcpus,
            returned: snapshot.returned.clone(),
            report: snapshot.report,
            clock_ns: snapshot.clock_ns,
        })
    }

    /// Guest RAM of this machine.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Runs the guest to the end.
    pub fn run(self) -> Result<Outcome, Error> {
        self.start()?.wait()
    }

    /// Starts every vCPU that has not returned on its own thread.
    pub fn start(self) -> Result<RunningMachine, Error> {
        let n = self.config.vcpus;
        let live = self.returned.iter().filter(|r| r.is_none()).count() as u32;
        let futex = FutexTable::new(n);
        for _ in live..n {
            futex.vcpu_finished();
        }
        let shared = Arc::new(Shared {
            memory: Arc::clone(&self.memory),
            vcpus: n,
            started: Instant::now(),
            clock_base_ns: self.clock_ns,
            console_mode: self.config.console,
            stop: AtomicBool::new(false),
            pause: AtomicBool::new(false),
            exits: AtomicU64::new(0),
            futex,
            run: Mutex::new(RunState {
                result: None,
                ended: None,
                returned: self.returned.clone(),
                report: self.report,
                paused: 0,
                captured: vec![None; n as usize],
                threads: vec![None; n as usize],
                console: Vec::new(),
                console_truncated: false,
            }),
            changed: Condvar::new(),
        });
        let mut threads = Vec::new();
        for mut vcpu in self.vcpus {
            let id = vcpu.id();
            if self.returned[id as usize].is_some() {
                continue;
            }
            let s = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    s.vcpu_thread(&mut vcpu);
                })
                .map_err(Error::Thread);
            match handle {
                Ok(h) => threads.push((id, h)),
                Err(e) => {
                    shared.finish(Err(Error::ThreadPanicked(id)));
                    for (_, h) in threads {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            }
        }
        if live == 0 {
            shared.finish(Ok(self.returned[0].unwrap_or(0)));
        }
        let s = Arc::clone(&shared);
        let timeout = self.config.timeout;
        let watchdog = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || s.watchdog(timeout))
            .map_err(Error::Thread)?;
        Ok(RunningMachine {
            shared,
            threads,
            watchdog: Some(watchdog),
            _vm: self.vm,
        })
    }
}

struct RunState {
    result: Option<Result<i32, Error>>,
    ended: Option<Instant>,
    returned: Vec<Option<i32>>,
    report: Option<u64>,
    paused: u32,
    captured: Vec<Option<VcpuState>>,
    /// Threads to kick, present while their vCPU thread runs.
    threads: Vec<Option<libc::pthread_t>>,
    console: Vec<u8>,
    console_truncated: bool,
}

struct Shared {
    memory: Arc<GuestMemory>,
    vcpus: u32,
    started: Instant,
    /// Guest clock at `started` (non-zero after a restore).
    clock_base_ns: u64,
    console_mode: ConsoleMode,
    stop: AtomicBool,
    pause: AtomicBool,
    exits: AtomicU64,
    futex: FutexTable,
    run: Mutex<RunState>,
    changed: Condvar,
}

/// What the vCPU loop does after an exit.
enum Flow {
    Continue,
    /// This vCPU returned from its entry point.
    Returned,
    /// The run is over.
    Stop,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, RunState> {
        self.run.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kick_all(&self, state: &RunState) {
        for thread in state.threads.iter().flatten() {
            kick::kick(*thread);
        }
    }

    /// Ends the run with `result` unless it already ended.
    fn finish(&self, result: Result<i32, Error>) {
        let mut state = self.state();
        if state.result.is_none() {
            if let Err(e) = &result {
                tracing::debug!(error = %e, "run ends with an error");
            }
            state.result = Some(result);
            state.ended = Some(Instant::now());
        }
        self.stop.store(true, Ordering::SeqCst);
        self.kick_all(&state);
        drop(state);
        self.futex.interrupt_all();
        self.changed.notify_all();
    }

    fn vcpu_thread(&self, vcpu: &mut Vcpu) {
        let id = vcpu.id();
        vcpu.bind_to_thread();
        // SAFETY: pthread_self has no preconditions.
        self.state().threads[id as usize] = Some(unsafe { libc::pthread_self() });
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.vcpu_loop(vcpu)));
        self.state().threads[id as usize] = None;
        vcpu.unbind_from_thread();
        if result.is_err() {
            self.finish(Err(Error::ThreadPanicked(id)));
        }
    }

    fn vcpu_loop(&self, vcpu: &mut Vcpu) {
        let id = vcpu.id();
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if self.pause.load(Ordering::SeqCst) {
                self.park(vcpu);
                continue;
            }
            let flow = match self.step(vcpu) {
                Ok(flow) => flow,
                Err(e) => {
                    self.finish(Err(e));
                    Flow::Stop
                }
            };
            match flow {
                Flow::Continue => {}
                Flow::Stop => return,
                Flow::Returned => {
                    tracing::debug!(vcpu = id, "vCPU returned from its entry point");
                    if self.futex.vcpu_finished() {
                        self.finish(Err(Error::Deadlock { vcpu: id, addr: 0 }));
                    }
                    return;
                }
            }
        }
    }

    /// Runs the guest to the next exit and handles it.
    fn step(&self, vcpu: &mut Vcpu) -> Result<Flow, Error> {
        let id = vcpu.id();
        self.exits.fetch_add(1, Ordering::Relaxed);
        let exit = vcpu.run()?;
        let unhandled = match exit {
            Exit::IoOut { port, data } => {
                let value = le_value(data);
                let call = hypercall::decode_out(&*self.memory, port, value);
                return match call {
                    Ok(call) => self.hypercall(id, call),
                    Err(source) => Err(Error::BadHypercall {
                        vcpu: id,
                        rip: vcpu.rip()?,
                        source,
                    }),
                };
            }
            Exit::IoIn { port, data } => {
                if !hypercall::answer_in(port, data, id, self.vcpus) {
                    let source = HypercallError::UnknownPort { port, dir: "in" };
                    return Err(Error::BadHypercall {
                        vcpu: id,
                        rip: vcpu.rip()?,
                        source,
                    });
                }
                return Ok(Flow::Continue);
            }
            // Kicked for a pause or the end of the run; the loop looks at the flags.
            Exit::Interrupted => return Ok(Flow::Continue),
            Exit::Shutdown => {
                return Err(Error::TripleFault {
                    vcpu: id,
                    rip: vcpu.rip()?,
                })
            }
            Exit::Halt => "hlt".to_string(),
            Exit::Mmio { addr, write, len } => format!(
                "{} of {len} bytes at guest-physical {addr:#x}, outside guest RAM ({:#x} bytes)",
                if write { "write" } else { "read" },
                self.memory.size()
            ),
            Exit::MemoryFault { addr, len } => format!("memory fault at {addr:#x} (+{len:#x})"),
            Exit::WriteFault => {
                "KVM_RUN failed with EFAULT (a write KVM could not map)".to_string()
            }
            Exit::InternalError { suberror } => format!("KVM internal error (suberror {suberror})"),
            Exit::FailEntry { reason } => format!("VM entry failed (reason {reason:#x})"),
            Exit::Other(what) => what,
        };
        Err(Error::UnhandledExit {
            vcpu: id,
            rip: vcpu.rip()?,
            exit: unhandled,
        })
    }

    fn hypercall(&self, vcpu: u32, call: Hypercall) -> Result<Flow, Error> {
        let mem = &*self.memory;
        match call {
            Hypercall::Exit(code) => {
                self.finish(Ok(code));
                return Ok(Flow::Stop);
            }
            Hypercall::Return(code) => {
                let mut state = self.state();
                state.returned[vcpu as usize] = Some(code);
                if state.returned.iter().all(Option::is_some) {
                    let code = state.returned[0].unwrap_or(code);
                    drop(state);
                    self.finish(Ok(code));
                }
                return Ok(Flow::Returned);
            }
            Hypercall::Write {
                block,
                fd,
                buf,
                len,
            } => {
                let result = if !hypercall::write_accepted(fd, len) {
                    -(errno::EINVAL as i64)
                } else {
                    let mut bytes = vec![0u8; len as usize];
                    mem.read(buf, &mut bytes)?;
                    self.console(fd, &bytes);
                    len as i64
                };
                mem.write_obj(block + result_offset::WRITE, &(result as u64))?;
            }
            Hypercall::Clock { block, clock_id } => {
                let (result, nanos) = hypercall::clock(clock_id, || self.clock_ns());
                mem.write(block + result_offset::CLOCK_RESULT, &result.to_le_bytes())?;
                mem.write_obj(block + result_offset::CLOCK_NANOS, &nanos)?;
            }
            Hypercall::FutexWait {
                block,
                addr,
                expected,
                flags,
                timeout_ns,
            } => {
                let result = match mem.atomic_u32(addr) {
                    Err(_) => -errno::EINVAL,
                    Ok(_) if flags != 0 => -errno::EINVAL,
                    Ok(word) => {
                        let timeout = (timeout_ns > 0).then(|| Duration::from_nanos(timeout_ns));
                        let still = || word.load(Ordering::SeqCst) == expected;
                        match self.futex.wait(vcpu, addr, still, timeout) {
                            WaitOutcome::Woken | WaitOutcome::Interrupted => 0,
                            WaitOutcome::ValueChanged => -errno::EAGAIN,
                            WaitOutcome::TimedOut => -errno::ETIMEDOUT,
                            WaitOutcome::Deadlock => return Err(Error::Deadlock { vcpu, addr }),
                        }
                    }
                };
                mem.write(block + result_offset::FUTEX_WAIT, &result.to_le_bytes())?;
            }
            Hypercall::FutexWake { block, addr, count } => {
                let result = if !hypercall::futex_word_ok(addr) {
                    -errno::EINVAL
                } else {
                    self.futex.wake(addr, count).min(i32::MAX as u32) as i32
                };
                mem.write(block + result_offset::FUTEX_WAKE, &result.to_le_bytes())?;
            }
            Hypercall::Yield => std::thread::yield_now(),
            Hypercall::Report(value) => self.state().report = Some(value),
        }
        Ok(Flow::Continue)
    }

    /// The guest's monotonic clock.
    fn clock_ns(&self) -> u64 {
        self.clock_base_ns + self.started.elapsed().as_nanos() as u64
    }

    fn console(&self, fd: u32, bytes: &[u8]) {
        if self.console_mode == ConsoleMode::Forward {
            let _ = if fd == 1 {
                std::io::stdout().lock().write_all(bytes)
            } else {
                std::io::stderr().lock().write_all(bytes)
            };
        }
        let mut state = self.state();
        let room = CONSOLE_MAX_BYTES.saturating_sub(state.console.len());
        state
            .console
            .extend_from_slice(&bytes[..bytes.len().min(room)]);
        state.console_truncated |= bytes.len() > room;
    }

    /// Pauses this vCPU: completes its pending I/O, captures its state, and waits until
    /// the pause ends.
    fn park(&self, vcpu: &mut Vcpu) {
        let id = vcpu.id() as usize;
        let captured = vcpu.complete_pending_io().and_then(|()| vcpu.capture());
        let mut state = self.state();
        match captured {
            Ok(s) => state.captured[id] = Some(s),
            Err(e) => {
                drop(state);
                self.finish(Err(e.into()));
                return;
            }
        }
        state.paused += 1;
        self.changed.notify_all();
        while self.pause.load(Ordering::SeqCst) && !self.stop.load(Ordering::SeqCst) {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.paused -= 1;
    }

    /// Ends the run at the timeout; without one, just waits for the end.
    fn watchdog(&self, timeout: Option<Duration>) {
        let mut state = self.state();
        while state.result.is_none() {
            let Some(limit) = timeout else {
                state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let elapsed = self.started.elapsed();
            if elapsed >= limit {
                drop(state);
                self.finish(Err(Error::Timeout(limit)));
                return;
            }
            state = self
                .changed
                .wait_timeout(state, limit - elapsed)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A running machine.
pub struct RunningMachine {
    shared: Arc<Shared>,
    threads: Vec<(u32, JoinHandle<()>)>,
    watchdog: Option<JoinHandle<()>>,
    _vm: Vm,
}

impl RunningMachine {
    /// Pauses every vCPU and captures its complete state. The vCPUs stay paused until
    /// [`RunningMachine::resume`] or [`RunningMachine::stop`].
    pub fn pause(&self) -> Result<Snapshot, Error> {
        let s = &self.shared;
        s.pause.store(true, Ordering::SeqCst);
        s.futex.interrupt_all();
        let mut state = s.state();
        s.kick_all(&state);
        loop {
            if state.result.is_some() {
                return Err(Error::EndedBeforePause);
            }
            let returned = state.returned.iter().filter(|r| r.is_some()).count() as u32;
            if state.paused + returned == s.vcpus {
                break;
            }
            state = s
                .changed
                .wait_timeout(state, Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            // Kick again: a vCPU may have re-entered the guest before seeing the flag.
            s.kick_all(&state);
        }
        let vcpus = (0..s.vcpus as usize)
            .map(|i| {
                if state.returned[i].is_some() {
                    None
                } else {
                    state.captured[i].clone()
                }
            })
            .collect();
        Ok(Snapshot {
            vcpus,
            returned: state.returned.clone(),
            report: state.report,
            clock_ns: s.clock_ns(),
        })
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.shared.futex.release();
        self.shared.pause.store(false, Ordering::SeqCst);
        let _guard = self.shared.state();
        self.shared.changed.notify_all();
    }

    /// Ends the run wherever it is and returns guest RAM.
    pub fn stop(mut self) -> Arc<GuestMemory> {
        self.shared.finish(Ok(0));
        self.join();
        Arc::clone(&self.shared.memory)
    }

    /// Waits for the run to end.
    pub fn wait(mut self) -> Result<Outcome, Error> {
        self.join();
        let mut state = self.shared.state();
        let result = state.result.take().unwrap_or(Ok(0));
        let wall = state.ended.unwrap_or_else(Instant::now) - self.shared.started;
        let exit_code = result?;
        Ok(Outcome {
            exit_code,
            report: state.report,
            console: std::mem::take(&mut state.console),
            console_truncated: state.console_truncated,
            wall,
            exits: self.shared.exits.load(Ordering::Relaxed),
        })
    }

    fn join(&mut self) {
        for (id, handle) in self.threads.drain(..) {
            if handle.join().is_err() {
                self.shared.finish(Err(Error::ThreadPanicked(id)));
            }
        }
        // Every vCPU is done; make sure the watchdog sees the end too.
        self.shared.finish(Ok(0));
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }
}

impl Drop for RunningMachine {
    fn drop(&mut self) {
        if !self.threads.is_empty() || self.watchdog.is_some() {
            self.shared.finish(Ok(0));
            self.join();
        }
    }
}

/// The value of an `out`, zero-extended from 1, 2 or 4 bytes.
pub(crate) fn le_value(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}
