//! Decoding guest hypercalls (docs/guest-abi.md, "Hypercalls"). A hypercall is port I/O
//! on `HYPERCALL_PORT_BASE + nr`; calls with parameters pass the guest-physical address of
//! a parameter block in `eax`. Decoding reads and validates the block and every pointer
//! in it against guest RAM; executing the call is the machine's job.

use crate::memory::{GuestRead, MemoryError, Pod};
use flotilla_abi::{hypercall as nr, *};

/// Longest console write accepted in one call; longer writes get `-EINVAL`.
pub const WRITE_MAX_BYTES: u64 = 1 << 20;

/// A decoded `out` hypercall.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hypercall {
    Exit(i32),
    Return(i32),
    /// Console write of `[buf, buf + len)` to `fd` (the machine answers -EINVAL for an fd
    /// other than 1 and 2, or a length over `WRITE_MAX_BYTES`).
    Write {
        block: u64,
        fd: u32,
        buf: u64,
        len: u64,
    },
    Clock {
        block: u64,
        clock_id: u32,
    },
    FutexWait {
        block: u64,
        addr: u64,
        expected: u32,
        flags: u32,
        timeout_ns: u64,
    },
    FutexWake {
        block: u64,
        addr: u64,
        count: u32,
    },
    Yield,
    Report(u64),
}

/// A hypercall the guest got wrong in a way that ends the guest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HypercallError {
    #[error("{dir} on port {port:#x}, which is not a Flotilla hypercall")]
    UnknownPort { port: u16, dir: &'static str },
    #[error("hypercall {name}: parameter block: {reason}")]
    Block { name: &'static str, reason: String },
    #[error("hypercall {name}: {what} [{addr:#x}, {addr:#x} + {len:#x}) is outside guest RAM (size {ram:#x})")]
    Pointer {
        name: &'static str,
        what: &'static str,
        addr: u64,
        len: u64,
        ram: u64,
    },
}

/// Name of hypercall `nr`, for messages.
pub fn name(call: u16) -> &'static str {
    match call {
        nr::EXIT => "exit",
        nr::RETURN => "return",
        nr::WRITE => "write",
        nr::VCPU_ID => "vcpu_id",
        nr::VCPU_COUNT => "vcpu_count",
        nr::CLOCK => "clock",
        nr::FUTEX_WAIT => "futex_wait",
        nr::FUTEX_WAKE => "futex_wake",
        nr::YIELD => "yield",
        nr::REPORT => "report",
        nr::NODE_ID => "node_id",
        nr::NODE_COUNT => "node_count",
        _ => "unknown",
    }
}

/// The hypercall number of `port`, if it is a hypercall port.
pub fn number(port: u16) -> Option<u16> {
    port.checked_sub(HYPERCALL_PORT_BASE)
        .filter(|&n| n < nr::COUNT)
}

fn block<T: Pod, M: GuestRead>(memory: &M, call: u16, addr: u64) -> Result<T, HypercallError> {
    memory
        .read_pod(addr)
        .map_err(|e: MemoryError| HypercallError::Block {
            name: name(call),
            reason: e.to_string(),
        })
}

fn pointer<M: GuestRead>(
    memory: &M,
    call: u16,
    what: &'static str,
    addr: u64,
    len: u64,
) -> Result<(), HypercallError> {
    memory
        .check(addr, len)
        .map_err(|_| HypercallError::Pointer {
            name: name(call),
            what,
            addr,
            len,
            ram: memory.ram_bytes(),
        })
}

/// Decodes an `out` of `value` to `port`.
pub fn decode_out<M: GuestRead>(
    memory: &M,
    port: u16,
    value: u32,
) -> Result<Hypercall, HypercallError> {
    let call = number(port).ok_or(HypercallError::UnknownPort { port, dir: "out" })?;
    let addr = value as u64;
    Ok(match call {
        nr::EXIT => Hypercall::Exit(value as i32),
        nr::RETURN => Hypercall::Return(value as i32),
        nr::WRITE => {
            let a: WriteArgs = block(memory, call, addr)?;
            if a.len <= WRITE_MAX_BYTES {
                pointer(memory, call, "buffer", a.buf, a.len)?;
            }
            Hypercall::Write {
                block: addr,
                fd: a.fd,
                buf: a.buf,
                len: a.len,
            }
        }
        nr::CLOCK => {
            let a: ClockArgs = block(memory, call, addr)?;
            Hypercall::Clock {
                block: addr,
                clock_id: a.clock_id,
            }
        }
        nr::FUTEX_WAIT => {
            let a: FutexWaitArgs = block(memory, call, addr)?;
            pointer(memory, call, "futex word", a.addr, 4)?;
            Hypercall::FutexWait {
                block: addr,
                addr: a.addr,
                expected: a.expected,
                flags: a.flags,
                timeout_ns: a.timeout_ns,
            }
        }
        nr::FUTEX_WAKE => {
            let a: FutexWakeArgs = block(memory, call, addr)?;
            pointer(memory, call, "futex word", a.addr, 4)?;
            Hypercall::FutexWake {
                block: addr,
                addr: a.addr,
                count: a.count,
            }
        }
        nr::YIELD => Hypercall::Yield,
        nr::REPORT => Hypercall::Report(block::<ReportArgs, M>(memory, call, addr)?.value),
        _ => return Err(HypercallError::UnknownPort { port, dir: "out" }),
    })
}

// The rules every engine applies when it serves a call, in one place.

/// What the `in` hypercalls tell a vCPU about where it runs.
#[derive(Debug, Clone, Copy)]
pub struct Whereabouts {
    pub vcpu: u32,
    pub vcpus: u32,
    /// The node the vCPU runs on now.
    pub node: u32,
    pub nodes: u32,
}

/// Answers an `in` hypercall (VCPU_ID, VCPU_COUNT, NODE_ID, NODE_COUNT) into `data`;
/// `false` if `port` is not one.
pub fn answer_in(port: u16, data: &mut [u8], at: Whereabouts) -> bool {
    let value = match number(port) {
        Some(nr::VCPU_ID) => at.vcpu,
        Some(nr::VCPU_COUNT) => at.vcpus,
        Some(nr::NODE_ID) => at.node,
        Some(nr::NODE_COUNT) => at.nodes,
        _ => return false,
    };
    let n = data.len().min(4);
    data[..n].copy_from_slice(&value.to_le_bytes()[..n]);
    true
}

/// Whether a console write of `len` bytes to `fd` is served; others get `-EINVAL`.
pub fn write_accepted(fd: u32, len: u64) -> bool {
    (fd == 1 || fd == 2) && len <= WRITE_MAX_BYTES
}

/// CLOCK's result code and nanoseconds; `now_ns` is read only for a known clock.
pub fn clock(clock_id: u32, now_ns: impl FnOnce() -> u64) -> (i32, u64) {
    if clock_id == CLOCK_MONOTONIC {
        (0, now_ns())
    } else {
        (-errno::EINVAL, 0)
    }
}

/// Whether a futex word address is valid (4-byte aligned); others get `-EINVAL`.
pub fn futex_word_ok(addr: u64) -> bool {
    addr.is_multiple_of(4)
}

/// Offsets of the `result` fields, for writing results back.
pub mod result_offset {
    use flotilla_abi::*;
    use std::mem::offset_of;
    pub const WRITE: u64 = offset_of!(WriteArgs, result) as u64;
    pub const CLOCK_RESULT: u64 = offset_of!(ClockArgs, result) as u64;
    pub const CLOCK_NANOS: u64 = offset_of!(ClockArgs, nanos) as u64;
    pub const FUTEX_WAIT: u64 = offset_of!(FutexWaitArgs, result) as u64;
    pub const FUTEX_WAKE: u64 = offset_of!(FutexWakeArgs, result) as u64;
}

/// The value of an `out`, zero-extended from 1, 2 or 4 bytes.
pub(crate) fn le_value(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemory;

    #[test]
    fn pointers_outside_ram_are_rejected() {
        let mem = GuestMemory::new(4 << 20).unwrap();
        let port = |n| HYPERCALL_PORT_BASE + n;
        let args = WriteArgs {
            fd: 1,
            buf: (4 << 20) - 2,
            len: 16,
            ..Default::default()
        };
        mem.write_obj(0x8000, &args).unwrap();
        assert!(matches!(
            decode_out(&mem, port(nr::WRITE), 0x8000),
            Err(HypercallError::Pointer { what: "buffer", .. })
        ));
        assert!(matches!(
            decode_out(&mem, port(nr::WRITE), (4 << 20) - 8),
            Err(HypercallError::Block { name: "write", .. })
        ));
        let wait = FutexWaitArgs {
            addr: 1 << 40,
            ..Default::default()
        };
        mem.write_obj(0x9000, &wait).unwrap();
        assert!(matches!(
            decode_out(&mem, port(nr::FUTEX_WAIT), 0x9000),
            Err(HypercallError::Pointer {
                what: "futex word",
                ..
            })
        ));
        assert_eq!(
            decode_out(&mem, 0x3F8, 0),
            Err(HypercallError::UnknownPort {
                port: 0x3F8,
                dir: "out"
            })
        );
        assert_eq!(decode_out(&mem, port(nr::EXIT), 7), Ok(Hypercall::Exit(7)));
    }
}
