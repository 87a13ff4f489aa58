//! Shared by the engine's integration tests: the KVM guard and a builder for tiny
//! hand-assembled guest images.
#![allow(dead_code)]

use flotilla_engine::{ConsoleMode, MachineConfig};
use std::time::Duration;

/// True if KVM tests can run. Without `/dev/kvm` this fails the test with a clear message,
/// unless `FLOTILLA_SKIP_KVM=1` says to skip (and then it says so).
pub fn kvm() -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if usable {
        return true;
    }
    if std::env::var("FLOTILLA_SKIP_KVM").as_deref() == Ok("1") {
        eprintln!("SKIPPED: /dev/kvm is not usable and FLOTILLA_SKIP_KVM=1");
        return false;
    }
    panic!(
        "this test needs read-write /dev/kvm, which is missing or not accessible here; \
         set FLOTILLA_SKIP_KVM=1 to skip KVM tests"
    );
}

/// A config for test runs: captured console and a generous timeout, so a broken guest
/// fails the test instead of hanging it.
pub fn config(vcpus: u32, mem_bytes: u64, args: &str) -> MachineConfig {
    MachineConfig {
        vcpus,
        mem_bytes,
        args: args.to_string(),
        timeout: Some(Duration::from_secs(120)),
        console: ConsoleMode::Capture,
        ..Default::default()
    }
}

/// Guest address of the code of images built by [`image`].
pub const CODE_ADDR: u64 = 0x40_0000;

/// A static ELF64 image with `code` in one executable segment at [`CODE_ADDR`]
/// (4 KiB of memory) and a 4 KiB writable data segment right after it.
pub fn image(code: &[u8]) -> Vec<u8> {
    assert!(code.len() <= 4096);
    let mut b = vec![0u8; 0x3000];
    b[..4].copy_from_slice(b"\x7fELF");
    (b[4], b[5], b[6]) = (2, 1, 1);
    b[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    b[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&CODE_ADDR.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&2u16.to_le_bytes());
    let segments = [
        (5u32, 0x1000u64, CODE_ADDR, code.len() as u64),
        (6, 0x2000, CODE_ADDR + 0x1000, 0),
    ];
    for (i, (flags, offset, vaddr, filesz)) in segments.into_iter().enumerate() {
        let o = 64 + i * 56;
        b[o..o + 4].copy_from_slice(&1u32.to_le_bytes());
        b[o + 4..o + 8].copy_from_slice(&flags.to_le_bytes());
        b[o + 8..o + 16].copy_from_slice(&offset.to_le_bytes());
        b[o + 16..o + 24].copy_from_slice(&vaddr.to_le_bytes());
        b[o + 24..o + 32].copy_from_slice(&vaddr.to_le_bytes());
        b[o + 32..o + 40].copy_from_slice(&filesz.to_le_bytes());
        b[o + 40..o + 48].copy_from_slice(&0x1000u64.to_le_bytes());
    }
    b[0x1000..0x1000 + code.len()].copy_from_slice(code);
    b
}

/// Machine code helpers (64-bit mode).
pub mod asm {
    /// `mov eax, imm32`
    pub fn mov_eax(v: u32) -> Vec<u8> {
        let mut c = vec![0xB8];
        c.extend_from_slice(&v.to_le_bytes());
        c
    }
    /// `mov rax, imm64`
    pub fn mov_rax(v: u64) -> Vec<u8> {
        let mut c = vec![0x48, 0xB8];
        c.extend_from_slice(&v.to_le_bytes());
        c
    }
    /// `mov [rsp + disp8], rax`
    pub fn store_rax(disp: u8) -> Vec<u8> {
        vec![0x48, 0x89, 0x44, 0x24, disp]
    }
    /// `sub rsp, 64`
    pub const SUB_RSP_64: [u8; 4] = [0x48, 0x83, 0xEC, 0x40];
    /// `mov eax, esp` (a parameter block on the stack, below 4 GiB)
    pub const EAX_ESP: [u8; 2] = [0x89, 0xE0];
    /// `mov dx, port; out dx, eax`
    pub fn out(port: u16) -> Vec<u8> {
        let p = port.to_le_bytes();
        vec![0x66, 0xBA, p[0], p[1], 0xEF]
    }
    /// `jmp $`
    pub const SPIN: [u8; 2] = [0xEB, 0xFE];
    /// `ret`
    pub const RET: [u8; 1] = [0xC3];
    /// `ud2`
    pub const UD2: [u8; 2] = [0x0F, 0x0B];
}
