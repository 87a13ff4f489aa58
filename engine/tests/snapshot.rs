//! Capture and restore: pause a running guest mid-computation, capture every vCPU's
//! full state, move it through its byte encoding, restore it into a fresh VM over the
//! same guest memory, and the guest finishes with the same result.

mod common;

use common::{config, kvm};
use flotilla_engine::{Machine, Snapshot, VcpuState};
use flotilla_workloads::{native, Workload};
use std::time::Duration;

#[test]
fn paused_guest_restored_into_a_fresh_vm_finishes_with_the_same_result() {
    if !kvm() {
        return;
    }
    let (w, vcpus, args) = (Workload::Matmul, 2, "n=2000");
    let prepared = w.prepare(args).unwrap();
    let reference = native::run(&prepared, vcpus as usize).unwrap().checksum;
    let cfg = config(vcpus, 160 << 20, args);
    let image = flotilla_guest_images::image(w);

    let running = Machine::boot(cfg.clone(), image).unwrap().start().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let snapshot = running.pause().expect("the guest is still computing");
    assert!(
        snapshot.returned.iter().all(Option::is_none),
        "paused mid-computation"
    );
    assert_eq!(snapshot.report, None, "no result reported yet");
    let memory = running.stop();

    // Through the wire form, as a vCPU moving to another node would go.
    let vcpus_moved = snapshot
        .vcpus
        .iter()
        .map(|s| {
            let bytes = s.as_ref().expect("captured").encode();
            Some(VcpuState::decode(&bytes).expect("decodes"))
        })
        .collect();
    let moved = Snapshot {
        vcpus: vcpus_moved,
        ..snapshot
    };
    for (i, s) in moved.vcpus.iter().enumerate() {
        let s = s.as_ref().unwrap();
        assert_eq!(s.id, i as u32);
        assert!(
            s.regs.rip >= 0x40_0000,
            "rip {:#x} is in the image",
            s.regs.rip
        );
    }

    let outcome = Machine::restore(cfg, memory, &moved)
        .unwrap()
        .run()
        .unwrap();
    assert_eq!(
        outcome.exit_code,
        0,
        "{}",
        String::from_utf8_lossy(&outcome.console)
    );
    assert_eq!(outcome.report, Some(reference));
}

#[test]
fn pause_resume_in_place_keeps_the_result() {
    if !kvm() {
        return;
    }
    let (w, vcpus, args) = (Workload::Kvstore, 3, "ops=2m keys=100k");
    let reference = native::run(&w.prepare(args).unwrap(), vcpus as usize)
        .unwrap()
        .checksum;
    let running = Machine::boot(
        config(vcpus, 64 << 20, args),
        flotilla_guest_images::image(w),
    )
    .unwrap()
    .start()
    .unwrap();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(15));
        match running.pause() {
            Ok(_) => running.resume(),
            Err(_) => break, // finished already
        }
    }
    let outcome = running.wait().unwrap();
    assert_eq!(outcome.report, Some(reference));
}

#[test]
fn corrupt_state_bytes_are_rejected() {
    use flotilla_engine::kvm::StateError;
    assert_eq!(
        VcpuState::decode(b"FLV").unwrap_err(),
        StateError::Truncated(3)
    );
    assert_eq!(
        VcpuState::decode(b"XXXX\x01\x00rest").unwrap_err(),
        StateError::BadMagic
    );
    assert_eq!(
        VcpuState::decode(b"FLVS\x09\x00rest").unwrap_err(),
        StateError::Version(9)
    );
    assert!(matches!(
        VcpuState::decode(b"FLVS\x01\x00\xff\xff\xff").unwrap_err(),
        StateError::Malformed(_)
    ));
}
