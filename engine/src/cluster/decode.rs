//! Finding the page a write fault is about. On PVM hosts a plain write to a page that
//! userfaultfd reports missing makes `KVM_RUN` fail with `EFAULT` and no address (reads,
//! and writes to write-protected pages, come back as MMIO exits instead). The vCPU is
//! still at the instruction, so the engine decodes it (iced-x86) and computes its memory
//! operands from the registers: guest RAM is identity-mapped and segment bases are 0,
//! so the effective address is the guest-physical address.

use iced_x86::{Decoder, DecoderOptions, InstructionInfoFactory, OpAccess, Register};
use kvm_bindings::kvm_regs;

/// One memory operand of an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemAccess {
    pub addr: u64,
    pub len: u64,
    pub write: bool,
}

fn value(reg: Register, r: &kvm_regs) -> Option<u64> {
    if reg.is_segment_register() {
        return Some(0);
    }
    let full = match reg.full_register() {
        Register::RAX => r.rax,
        Register::RBX => r.rbx,
        Register::RCX => r.rcx,
        Register::RDX => r.rdx,
        Register::RSI => r.rsi,
        Register::RDI => r.rdi,
        Register::RSP => r.rsp,
        Register::RBP => r.rbp,
        Register::R8 => r.r8,
        Register::R9 => r.r9,
        Register::R10 => r.r10,
        Register::R11 => r.r11,
        Register::R12 => r.r12,
        Register::R13 => r.r13,
        Register::R14 => r.r14,
        Register::R15 => r.r15,
        Register::RIP => r.rip,
        _ => return None,
    };
    Some(match reg.size() {
        8 => full,
        4 => full & 0xFFFF_FFFF,
        2 => full & 0xFFFF,
        _ => full & 0xFF,
    })
}

/// The memory operands of the instruction `code` starts with, at `regs.rip`.
pub fn memory_accesses(code: &[u8], regs: &kvm_regs) -> Result<Vec<MemAccess>, String> {
    let mut decoder = Decoder::with_ip(64, code, regs.rip, DecoderOptions::NONE);
    let instr = decoder.decode();
    if instr.is_invalid() {
        return Err(format!("cannot decode the instruction at {:#x}", regs.rip));
    }
    let mut factory = InstructionInfoFactory::new();
    let info = factory.info(&instr);
    let mut out = Vec::new();
    for m in info.used_memory() {
        let addr = m
            .virtual_address(0, |reg, _, _| value(reg, regs))
            .ok_or_else(|| format!("cannot compute an operand address at {:#x}", regs.rip))?;
        let write = matches!(
            m.access(),
            OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
        );
        out.push(MemAccess {
            addr,
            len: m.memory_size().size().max(1) as u64,
            write,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_and_push_addresses() {
        let regs = kvm_regs {
            rbp: 0x10_0000,
            r15: 3,
            rsp: 0x8000,
            rip: 0x40_0000,
            ..Default::default()
        };
        // mov [rbp + r15*8], rax
        let a = memory_accesses(&[0x4a, 0x89, 0x44, 0xfd, 0x00], &regs).unwrap();
        assert_eq!(
            a,
            vec![MemAccess {
                addr: 0x10_0018,
                len: 8,
                write: true
            }]
        );
        // push r15
        let a = memory_accesses(&[0x41, 0x57], &regs).unwrap();
        assert_eq!(a[0].addr, 0x7ff8);
        assert!(a[0].write);
        assert!(memory_accesses(&[0x0f, 0xff], &regs).is_err());
    }
}
