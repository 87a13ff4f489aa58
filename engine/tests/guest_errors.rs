//! Guests that go wrong end the run with a clear error, never a hang or a panic.

mod common;

use common::{asm, config, image, kvm};
use flotilla_abi::{hypercall as nr, HYPERCALL_PORT_BASE};
use flotilla_engine::{Error, Machine};

const MEM: u64 = 16 << 20;

fn run(code: &[u8], vcpus: u32) -> Result<flotilla_engine::Outcome, Error> {
    let mut cfg = config(vcpus, MEM, "");
    cfg.timeout = Some(std::time::Duration::from_secs(20));
    Machine::boot(cfg, &image(code))?.run()
}

fn port(call: u16) -> u16 {
    HYPERCALL_PORT_BASE + call
}

#[test]
fn exit_and_return_codes() {
    if !kvm() {
        return;
    }
    let exit = [
        asm::mov_eax(42),
        asm::out(port(nr::EXIT)),
        asm::SPIN.to_vec(),
    ]
    .concat();
    assert_eq!(run(&exit, 3).unwrap().exit_code, 42);
    // Returning from the entry point on every vCPU ends with vCPU 0's value.
    let ret = [asm::mov_eax(7), asm::RET.to_vec()].concat();
    assert_eq!(run(&ret, 4).unwrap().exit_code, 7);
}

#[test]
fn write_with_a_buffer_outside_ram_ends_the_guest() {
    if !kvm() {
        return;
    }
    let code = [
        asm::SUB_RSP_64.to_vec(),
        asm::mov_rax(1),
        asm::store_rax(0), // fd 1
        asm::mov_rax(MEM - 4),
        asm::store_rax(8), // buf: 4 bytes before the end of RAM
        asm::mov_rax(64),
        asm::store_rax(16), // len 64: runs past the end
        asm::EAX_ESP.to_vec(),
        asm::out(port(nr::WRITE)),
        asm::SPIN.to_vec(),
    ]
    .concat();
    let err = run(&code, 1).unwrap_err();
    assert!(matches!(err, Error::BadHypercall { vcpu: 0, .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("write") && msg.contains("outside guest RAM"),
        "{msg}"
    );
}

#[test]
fn parameter_block_outside_ram_ends_the_guest() {
    if !kvm() {
        return;
    }
    let code = [
        asm::mov_eax(0xFFFF_FFF0),
        asm::out(port(nr::CLOCK)),
        asm::SPIN.to_vec(),
    ]
    .concat();
    let err = run(&code, 2).unwrap_err();
    assert!(matches!(err, Error::BadHypercall { .. }), "{err}");
    assert!(err.to_string().contains("clock"), "{err}");
}

#[test]
fn unknown_port_ends_the_guest() {
    if !kvm() {
        return;
    }
    let code = [asm::out(0x3F8), asm::SPIN.to_vec()].concat();
    let err = run(&code, 1).unwrap_err();
    assert!(err.to_string().contains("0x3f8"), "{err}");
}

#[test]
fn triple_fault_is_reported_with_the_vcpu() {
    if !kvm() {
        return;
    }
    let err = run(&asm::UD2, 2).unwrap_err();
    assert!(
        matches!(err, Error::TripleFault { rip: 0x40_0000, .. }),
        "{err}"
    );
    // hlt is privileged at CPL 3: it faults too, and the run still ends.
    let err = run(&[0xF4], 1).unwrap_err();
    assert!(matches!(err, Error::TripleFault { .. }), "{err}");
}

#[test]
fn futex_deadlock_is_detected() {
    if !kvm() {
        return;
    }
    // Wait forever on a zero word in the data segment, expecting zero.
    let code = [
        asm::SUB_RSP_64.to_vec(),
        asm::mov_rax(common::CODE_ADDR + 0x1000),
        asm::store_rax(0),
        asm::mov_rax(0),
        asm::store_rax(8),  // expected 0, flags 0
        asm::store_rax(16), // timeout 0: forever
        asm::EAX_ESP.to_vec(),
        asm::out(port(nr::FUTEX_WAIT)),
        asm::SPIN.to_vec(),
    ]
    .concat();
    let err = run(&code, 3).unwrap_err();
    assert!(matches!(err, Error::Deadlock { .. }), "{err}");
}

#[test]
fn a_spinning_guest_hits_the_timeout() {
    if !kvm() {
        return;
    }
    let mut cfg = config(2, MEM, "");
    cfg.timeout = Some(std::time::Duration::from_millis(300));
    let err = Machine::boot(cfg, &image(&asm::SPIN))
        .unwrap()
        .run()
        .unwrap_err();
    assert!(matches!(err, Error::Timeout(_)), "{err}");
}
