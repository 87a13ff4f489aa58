//! Guest-side hypercall wrappers, named after hermit-abi where a hermit call exists.
//!
//! These execute port I/O and only work inside a Flotilla guest; calling them in a host
//! process faults. Parameter blocks live on the caller's stack, which is below 4 GiB.

use crate::{
    hypercall, ClockArgs, FutexWaitArgs, FutexWakeArgs, ReportArgs, WriteArgs, CLOCK_MONOTONIC,
    HYPERCALL_PORT_BASE,
};
use core::arch::asm;

#[inline(always)]
fn out32(nr: u16, value: u32) {
    // SAFETY: port I/O on a hypercall port traps to the engine, which reads and writes
    // only the parameter block named by `value`; the asm is not marked `nomem`, so the
    // compiler assumes the block may have been written.
    unsafe {
        asm!("out dx, eax", in("dx") HYPERCALL_PORT_BASE + nr, in("eax") value, options(nostack, preserves_flags));
    }
}

#[inline(always)]
fn in32(nr: u16) -> u32 {
    let value: u32;
    // SAFETY: port input on a hypercall port; the engine supplies the value.
    unsafe {
        asm!("in eax, dx", in("dx") HYPERCALL_PORT_BASE + nr, out("eax") value, options(nostack, preserves_flags, nomem));
    }
    value
}

/// Address of a parameter block as the 32-bit hypercall operand. Blocks live on the
/// stack or in the image, both below 4 GiB by the ABI's layout rules.
#[inline(always)]
fn block<T>(args: &mut T) -> u32 {
    args as *mut T as usize as u32
}

/// Ends the whole guest, every vCPU, with `status`.
pub fn sys_exit(status: i32) -> ! {
    out32(hypercall::EXIT, status as u32);
    loop {
        // SAFETY: unreachable in practice (the engine stops the vCPU at EXIT). A spin, not
        // `hlt`, which faults at CPL 3, where guests run.
        unsafe { asm!("pause", options(nomem, nostack)) };
    }
}

/// Writes `buf` to the console (`fd` 1 or 2). Returns bytes written or a negated errno.
pub fn sys_write(fd: i32, buf: &[u8]) -> isize {
    let mut args = WriteArgs {
        fd: fd as u32,
        buf: buf.as_ptr() as u64,
        len: buf.len() as u64,
        ..WriteArgs::default()
    };
    out32(hypercall::WRITE, block(&mut args));
    args.result as isize
}

/// The calling vCPU's id, `0..sys_get_processor_count()`.
pub fn sys_get_vcpu_id() -> u32 {
    in32(hypercall::VCPU_ID)
}

/// Number of vCPUs of the guest.
pub fn sys_get_processor_count() -> usize {
    in32(hypercall::VCPU_COUNT) as usize
}

/// The node the calling vCPU runs on now, `0..sys_get_node_count()`. A vCPU can move
/// at any memory access, so this is a hint for reports and locality, not an invariant.
pub fn sys_get_node_id() -> u32 {
    in32(hypercall::NODE_ID)
}

/// Number of nodes of the cluster the guest runs on (1 when alone).
pub fn sys_get_node_count() -> u32 {
    in32(hypercall::NODE_COUNT)
}

/// Monotonic time in nanoseconds since the guest started.
pub fn sys_clock_ns() -> u64 {
    let mut args = ClockArgs {
        clock_id: CLOCK_MONOTONIC,
        ..ClockArgs::default()
    };
    out32(hypercall::CLOCK, block(&mut args));
    args.nanos
}

/// Sleeps while `*address == expected`, until woken by [`sys_futex_wake`] or until
/// `timeout_ns` (0: no timeout). Returns 0, `-EAGAIN`, `-ETIMEDOUT` or `-EINVAL`.
pub fn sys_futex_wait(address: *const u32, expected: u32, timeout_ns: u64) -> i32 {
    let mut args = FutexWaitArgs {
        addr: address as u64,
        expected,
        timeout_ns,
        ..FutexWaitArgs::default()
    };
    out32(hypercall::FUTEX_WAIT, block(&mut args));
    args.result
}

/// Wakes at most `count` vCPUs waiting on `address`. Returns the number woken.
pub fn sys_futex_wake(address: *const u32, count: u32) -> i32 {
    let mut args = FutexWakeArgs {
        addr: address as u64,
        count,
        ..FutexWakeArgs::default()
    };
    out32(hypercall::FUTEX_WAKE, block(&mut args));
    args.result
}

/// Lets other vCPUs run.
pub fn sys_yield() {
    out32(hypercall::YIELD, 0);
}

/// Records the guest's result value (a workload's checksum) for the engine to report.
pub fn sys_report(value: u64) {
    let mut args = ReportArgs { value };
    out32(hypercall::REPORT, block(&mut args));
}
