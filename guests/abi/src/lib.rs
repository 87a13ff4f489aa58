//! The Flotilla guest ABI: the one definition of everything a guest program and the
//! engine must agree on.
//!
//! - **Layout**: where the engine puts the GDT, boot info, page tables and the return
//!   trampoline in guest-physical memory, and the lowest address an image may use.
//! - **Boot info** ([`BootInfo`]): what a guest learns at entry (vCPU count, RAM size,
//!   the free-memory range, the argument string).
//! - **Hypercalls**: port I/O on `HYPERCALL_PORT_BASE + nr`. Calls that carry data pass
//!   the guest-physical address of a parameter block (one of the `*Args` structs below)
//!   in `eax`, so the block must lie below 4 GiB (stacks and images always do).
//!
//! The crate is `no_std` and has no dependencies, so guests link it directly. The
//! guest-side wrappers ([`sys`]) are plain inline assembly and are only meaningful inside
//! a Flotilla guest. The C header `guests/include/flotilla.h` is generated from this file
//! and checked against it by this crate's tests (`FLOTILLA_BLESS=1 cargo test -p
//! flotilla-abi` rewrites it). `docs/guest-abi.md` is the prose reference.
#![no_std]

pub mod sys;

/// Version of this ABI, in [`BootInfo::abi_version`]. Bumped on any incompatible change.
pub const ABI_VERSION: u32 = 1;

/// `BootInfo::magic`: the bytes "FLOTILLA" read as a little-endian u64.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"FLOTILLA");

/// Guest page size used by the engine for memory accounting and coherence.
pub const PAGE_SIZE: u64 = 4096;

// ---------------------------------------------------------------------------------------
// Guest-physical layout. Everything below IMAGE_MIN_ADDR belongs to the engine.
// ---------------------------------------------------------------------------------------

/// The global descriptor table the engine installs (null, 64-bit code, data).
pub const GDT_ADDR: u64 = 0x1000;
/// The boot info page: a [`BootInfo`] followed by the argument string.
pub const BOOT_INFO_ADDR: u64 = 0x2000;
/// Where the argument string starts (inside the boot info page).
pub const ARGS_ADDR: u64 = BOOT_INFO_ADDR + 0x100;
/// Longest argument string in bytes (without a terminator; the engine adds a NUL).
pub const ARGS_MAX_BYTES: u64 = 0x1000 - 0x100 - 1;
/// Return trampoline: every vCPU's entry function returns here, which performs
/// the `RETURN` hypercall with the return value.
pub const RETURN_TRAMPOLINE_ADDR: u64 = 0x3000;
/// First page of the identity-mapping page tables (PML4, PDPT, then one PD per GiB).
pub const PAGE_TABLES_ADDR: u64 = 0x10000;
/// Lowest guest-physical address an image segment may occupy (2 MiB).
pub const IMAGE_MIN_ADDR: u64 = 0x20_0000;
/// Largest guest RAM the identity map covers (64 GiB, one PDPT).
pub const RAM_MAX_BYTES: u64 = 64 << 30;
/// Smallest guest RAM the engine accepts (4 MiB: engine area plus a tiny image).
pub const RAM_MIN_BYTES: u64 = 4 << 20;
/// Most vCPUs a guest can have.
pub const VCPUS_MAX: u32 = 64;
/// Default size of each vCPU's stack.
pub const STACK_BYTES_DEFAULT: u64 = 256 << 10;

// ---------------------------------------------------------------------------------------
// Hypercalls.
// ---------------------------------------------------------------------------------------

/// Port of hypercall 0; hypercall `nr` uses port `HYPERCALL_PORT_BASE + nr`.
pub const HYPERCALL_PORT_BASE: u16 = 0x500;

/// Hypercall numbers. See `docs/guest-abi.md` for each call's semantics.
pub mod hypercall {
    /// `out`, eax = exit code. Ends the whole guest (every vCPU) with that code.
    pub const EXIT: u16 = 0;
    /// `out`, eax = return value. The calling vCPU is done; when every vCPU is done the
    /// guest ends with vCPU 0's value. The return trampoline makes this call.
    pub const RETURN: u16 = 1;
    /// `out`, eax = address of [`super::WriteArgs`]. Console write (fd 1 or 2).
    pub const WRITE: u16 = 2;
    /// `in`, eax receives the calling vCPU's id (0-based).
    pub const VCPU_ID: u16 = 3;
    /// `in`, eax receives the number of vCPUs.
    pub const VCPU_COUNT: u16 = 4;
    /// `out`, eax = address of [`super::ClockArgs`]. Monotonic clock in nanoseconds.
    pub const CLOCK: u16 = 5;
    /// `out`, eax = address of [`super::FutexWaitArgs`].
    pub const FUTEX_WAIT: u16 = 6;
    /// `out`, eax = address of [`super::FutexWakeArgs`].
    pub const FUTEX_WAKE: u16 = 7;
    /// `out`, eax ignored. Lets other vCPUs of this host run.
    pub const YIELD: u16 = 8;
    /// `out`, eax = address of [`super::ReportArgs`]. Records the guest's result value
    /// (a workload's checksum), which the engine reports.
    pub const REPORT: u16 = 9;
    /// `in`, eax receives the id of the node the calling vCPU runs on now (0-based). A
    /// vCPU can move between nodes, so the answer holds until its next memory access.
    pub const NODE_ID: u16 = 10;
    /// `in`, eax receives the number of nodes of the cluster (1 when alone).
    pub const NODE_COUNT: u16 = 11;
    /// Number of hypercalls; ports at or above `HYPERCALL_PORT_BASE + COUNT` are not calls.
    pub const COUNT: u16 = 12;
}

/// Error numbers returned (negated) in hypercall `result` fields. Same values as Linux
/// and hermit-abi.
pub mod errno {
    /// Bad argument (unknown fd, unknown clock, misaligned futex word).
    pub const EINVAL: i32 = 22;
    /// futex_wait: the word did not hold the expected value.
    pub const EAGAIN: i32 = 11;
    /// futex_wait: the timeout passed.
    pub const ETIMEDOUT: i32 = 110;
}

/// The boot info page at [`BOOT_INFO_ADDR`]. All fields little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// Number of vCPUs; vCPU ids are `0..vcpu_count`.
    pub vcpu_count: u32,
    /// Size of guest RAM in bytes; RAM is identity-mapped at `[0, ram_bytes)`.
    pub ram_bytes: u64,
    /// First byte of memory the guest may use freely (page aligned, zero-filled).
    pub free_start: u64,
    /// End (exclusive) of the free range.
    pub free_end: u64,
    /// Lowest and end address of the loaded image's segments.
    pub image_start: u64,
    pub image_end: u64,
    /// Where vCPU stacks start; vCPU `i`'s stack is
    /// `[stacks_start + i * stack_bytes, stacks_start + (i + 1) * stack_bytes)`.
    pub stacks_start: u64,
    pub stack_bytes: u64,
    /// Guest-physical address of the argument string (NUL-terminated, UTF-8).
    pub args_addr: u64,
    /// Length of the argument string in bytes, without the NUL.
    pub args_len: u64,
}

/// Parameter block of [`hypercall::WRITE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteArgs {
    /// 1 (stdout) or 2 (stderr).
    pub fd: u32,
    pub _reserved: u32,
    /// Guest-physical address of the bytes.
    pub buf: u64,
    pub len: u64,
    /// Out: bytes written, or a negated errno.
    pub result: i64,
}

/// Parameter block of [`hypercall::CLOCK`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockArgs {
    /// [`CLOCK_MONOTONIC`] (the only clock).
    pub clock_id: u32,
    /// Out: 0, or a negated errno.
    pub result: i32,
    /// Out: nanoseconds since the guest started.
    pub nanos: u64,
}

/// The monotonic clock id (hermit-abi's `CLOCK_MONOTONIC`).
pub const CLOCK_MONOTONIC: u32 = 4;

/// Parameter block of [`hypercall::FUTEX_WAIT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FutexWaitArgs {
    /// Guest-physical address of a 4-byte aligned u32.
    pub addr: u64,
    /// Sleep only if the word still holds this value.
    pub expected: u32,
    /// Reserved, must be 0.
    pub flags: u32,
    /// Relative timeout in nanoseconds; 0 waits without a timeout.
    pub timeout_ns: u64,
    /// Out: 0 woken, `-EAGAIN` value differed, `-ETIMEDOUT`, `-EINVAL`.
    pub result: i32,
    pub _reserved: u32,
}

/// Parameter block of [`hypercall::FUTEX_WAKE`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FutexWakeArgs {
    /// Guest-physical address of a 4-byte aligned u32.
    pub addr: u64,
    /// Wake at most this many waiters.
    pub count: u32,
    /// Out: number woken, or a negated errno.
    pub result: i32,
}

/// Parameter block of [`hypercall::REPORT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReportArgs {
    pub value: u64,
}

/// Machine code of the return trampoline placed at [`RETURN_TRAMPOLINE_ADDR`]:
/// `mov dx, HYPERCALL_PORT_BASE + RETURN; out dx, eax; 1: pause; jmp 1b`. (Not `hlt`,
/// which faults at CPL 3; the engine never resumes a vCPU after RETURN anyway.)
pub const RETURN_TRAMPOLINE_CODE: [u8; 9] = {
    let port = (HYPERCALL_PORT_BASE + hypercall::RETURN).to_le_bytes();
    [0x66, 0xBA, port[0], port[1], 0xEF, 0xF3, 0x90, 0xEB, 0xFC]
};

// The engine's regions must not overlap; checked when anything builds this crate.
const _: () = {
    assert!(GDT_ADDR + PAGE_SIZE <= BOOT_INFO_ADDR);
    assert!(ARGS_ADDR >= BOOT_INFO_ADDR + core::mem::size_of::<BootInfo>() as u64);
    assert!(ARGS_ADDR + ARGS_MAX_BYTES < BOOT_INFO_ADDR + PAGE_SIZE);
    assert!(BOOT_INFO_ADDR + PAGE_SIZE <= RETURN_TRAMPOLINE_ADDR);
    assert!(RETURN_TRAMPOLINE_ADDR + PAGE_SIZE <= PAGE_TABLES_ADDR);
    // PML4 + PDPT + one PD per GiB of the largest RAM.
    assert!(PAGE_TABLES_ADDR + (2 + (RAM_MAX_BYTES >> 30)) * PAGE_SIZE <= IMAGE_MIN_ADDR);
    assert!(IMAGE_MIN_ADDR < RAM_MIN_BYTES);
};

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn struct_sizes_are_stable() {
        assert_eq!(size_of::<BootInfo>(), 88);
        assert_eq!(size_of::<WriteArgs>(), 32);
        assert_eq!(size_of::<ClockArgs>(), 16);
        assert_eq!(size_of::<FutexWaitArgs>(), 32);
        assert_eq!(size_of::<FutexWakeArgs>(), 16);
        assert_eq!(size_of::<ReportArgs>(), 8);
    }

    #[test]
    fn trampoline_targets_the_return_port() {
        let port = u16::from_le_bytes([RETURN_TRAMPOLINE_CODE[2], RETURN_TRAMPOLINE_CODE[3]]);
        assert_eq!(port, HYPERCALL_PORT_BASE + hypercall::RETURN);
    }
}
