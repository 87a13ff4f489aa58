//! Forcing a vCPU thread out of `KVM_RUN`. A real-time signal is sent to the thread; its
//! handler sets `immediate_exit` in the thread's bound `kvm_run`, so the kick is not lost
//! even if it lands just before the thread re-enters the guest: `KVM_RUN` then returns
//! `EINTR` at once. The thread clears the flag and looks at why it was kicked.

use kvm_bindings::kvm_run;
use std::cell::Cell;
use std::sync::OnceLock;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    static BOUND_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal: the first real-time signal.
pub fn signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = BOUND_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is the calling thread's own bound kvm_run mapping, which
        // stays mapped while bound (see `bind`); a volatile byte store is signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

/// Installs the handler once per process.
pub fn install() -> Result<(), vmm_sys_util::errno::Error> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(signal(), handle_kick).map_err(|e| e.errno()))
        .map_err(vmm_sys_util::errno::Error::new)
}

/// Binds `run` to the calling thread so kicks reach it; `None` unbinds.
///
/// # Safety
/// `run` must stay mapped until this thread unbinds it or exits.
pub(crate) unsafe fn bind(run: Option<*mut kvm_run>) {
    BOUND_RUN.with(|r| r.set(run.unwrap_or(std::ptr::null_mut())));
}

/// Sends the kick signal to `thread`. The caller must know the thread is still alive.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: pthread_kill on a live thread id with a signal whose handler is installed.
    unsafe { libc::pthread_kill(thread, signal()) };
}
