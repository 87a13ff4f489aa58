//! A Flotilla guest program that runs one workload of the suite, chosen when the image is
//! built (`FLOTILLA_WORKLOAD`). Every vCPU enters `_start`; the workload's argument
//! string comes from the boot info. vCPU 0 prints and reports the checksum.
//! Exit codes: 0 verified by the guest's self-check, 1 self-check failed, 2 bad
//! arguments, 3 not enough guest memory.
#![no_std]
#![no_main]

use core::fmt::Write;
use core::sync::atomic::AtomicU32;
use flotilla_abi::{sys, BootInfo, ABI_VERSION, BOOT_INFO_MAGIC};
use flotilla_workloads::{Ctx, Sys, Workload};

const WORKLOAD: &str = env!("FLOTILLA_WORKLOAD");

struct Guest;

impl Sys for Guest {
    fn wait(&self, word: &AtomicU32, expected: u32) {
        sys::sys_futex_wait(word.as_ptr(), expected, 0);
    }
    fn wake_all(&self, word: &AtomicU32) {
        sys::sys_futex_wake(word.as_ptr(), u32::MAX);
    }
    fn relax(&self) {
        sys::sys_yield();
    }
}

/// Formats into a stack buffer and writes it to the console in one hypercall.
struct Console {
    fd: i32,
    buf: [u8; 512],
    len: usize,
}

impl Console {
    fn new(fd: i32) -> Self {
        Console { fd, buf: [0; 512], len: 0 }
    }
    fn flush(&mut self) {
        sys::sys_write(self.fd, &self.buf[..self.len]);
        self.len = 0;
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

macro_rules! say {
    ($fd:expr, $($arg:tt)*) => {{
        let mut c = Console::new($fd);
        let _ = writeln!(c, $($arg)*);
        c.flush();
    }};
}

#[no_mangle]
pub extern "C" fn _start(boot: &'static BootInfo, vcpu: u64) -> i32 {
    let vcpu = vcpu as usize;
    let lead = vcpu == 0;
    if boot.magic != BOOT_INFO_MAGIC || boot.abi_version != ABI_VERSION {
        if lead {
            say!(2, "{WORKLOAD}: unexpected boot info (ABI version {})", boot.abi_version);
        }
        return 4;
    }
    // SAFETY: the engine placed `args_len` bytes of argument string at `args_addr`.
    let raw = unsafe { core::slice::from_raw_parts(boot.args_addr as *const u8, boot.args_len as usize) };
    let Ok(args) = core::str::from_utf8(raw) else {
        if lead {
            say!(2, "{WORKLOAD}: argument string is not UTF-8");
        }
        return 2;
    };
    let Some(workload) = Workload::from_name(WORKLOAD) else {
        return 4;
    };
    let prepared = match workload.prepare(args) {
        Ok(p) => p,
        Err(e) => {
            if lead {
                say!(2, "{WORKLOAD}: {e}");
            }
            return 2;
        }
    };
    let threads = boot.vcpu_count as usize;
    let need = prepared.mem_bytes(threads) as u64;
    let have = boot.free_end - boot.free_start;
    if need > have {
        if lead {
            say!(2, "{WORKLOAD}: needs {need} bytes of free guest memory, has {have}");
        }
        return 3;
    }
    // SAFETY: the free range is zero-filled guest RAM shared by all vCPUs, page aligned,
    // and used by nothing else; every vCPU runs this workload on it.
    let ctx = unsafe { Ctx::new(vcpu, threads, &Guest, boot.free_start as *mut u8, have as usize) };
    let start = sys::sys_clock_ns();
    match prepared.run(&ctx) {
        Ok(checksum) => {
            if lead {
                let ms = (sys::sys_clock_ns() - start) / 1_000_000;
                sys::sys_report(checksum);
                say!(1, "{WORKLOAD}: checksum={checksum:#018x} vcpus={threads} compute_ms={ms} self-check=ok");
            }
            0
        }
        Err(failure) => {
            if lead {
                say!(2, "{WORKLOAD}: {failure}");
            }
            1
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!(2, "{WORKLOAD}: guest panic: {info}");
    sys::sys_exit(101)
}

// The x86_64-unknown-linux-gnu target expects libc to provide these; a guest has none.

/// # Safety
/// As C's `memcpy`.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller passes valid, non-overlapping ranges of `n` bytes.
    unsafe {
        core::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C's `memmove`.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // SAFETY: forward copy is safe when dst does not start inside [src, src+n).
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backward copy with the direction flag set, restored afterwards.
    unsafe {
        core::arch::asm!(
            "std", "rep movsb", "cld",
            inout("rcx") n => _,
            inout("rdi") dst.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack)
        );
    }
    dst
}

/// # Safety
/// As C's `memset`.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller passes a valid range of `n` bytes.
    unsafe {
        core::arch::asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags));
    }
    dst
}

/// # Safety
/// As C's `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller passes valid ranges of `n` bytes.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

/// # Safety
/// As C's `bcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The precompiled `core` for this target is built with unwinding and references this
/// symbol; guests abort on panic, so it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
