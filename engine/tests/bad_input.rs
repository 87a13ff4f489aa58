//! Bad configurations and images are refused with an error that names the problem,
//! before any guest code runs.

mod common;

use common::{config, image};
use flotilla_engine::boot::BootError;
use flotilla_engine::loader::LoadError;
use flotilla_engine::{Error, Machine};

fn boot(vcpus: u32, mem: u64, bytes: &[u8]) -> Error {
    match Machine::boot(config(vcpus, mem, ""), bytes) {
        Ok(_) => panic!("booted a machine that should have been refused"),
        Err(e) => e,
    }
}

const MEM: u64 = 16 << 20;

#[test]
fn vcpu_counts_outside_1_to_64_are_refused() {
    let ok = image(&[0xC3]);
    for n in [0, 65, 1000] {
        let e = boot(n, MEM, &ok);
        assert!(
            matches!(e, Error::Boot(BootError::VcpuCount(got)) if got == n),
            "{e}"
        );
        assert!(e.to_string().contains("1 to 64"), "{e}");
    }
}

#[test]
fn ram_too_small_for_image_and_stacks() {
    let e = boot(64, 6 << 20, &image(&[0xC3]));
    assert!(
        matches!(e, Error::Boot(BootError::RamTooSmall { vcpus: 64, .. })),
        "{e}"
    );
    let e = boot(1, (4 << 20) + 4096, &image(&[0xC3]));
    assert!(matches!(e, Error::Boot(BootError::RamSize(_))), "{e}");
}

#[test]
fn malformed_images_are_refused() {
    let good = image(&[0xC3]);
    assert!(matches!(
        boot(1, MEM, &[]),
        Error::Load(LoadError::Truncated(0))
    ));
    assert!(matches!(
        boot(1, MEM, &good[..40]),
        Error::Load(LoadError::Truncated(40))
    ));
    assert!(matches!(
        boot(
            1,
            MEM,
            b"#!/bin/sh\necho not an elf at all, sorry, but long enough for a header\n"
        ),
        Error::Load(LoadError::BadMagic)
    ));
    let mut arm = good.clone();
    arm[18] = 183;
    assert!(matches!(
        boot(1, MEM, &arm),
        Error::Load(LoadError::NotX86_64(183))
    ));
    let mut elf32 = good.clone();
    elf32[4] = 1;
    assert!(matches!(
        boot(1, MEM, &elf32),
        Error::Load(LoadError::NotElf64(1))
    ));
    // Cut inside the program headers.
    assert!(matches!(
        boot(1, MEM, &good[..100]),
        Error::Load(LoadError::Malformed(_))
    ));
    // Cut inside the code segment's file bytes.
    assert!(matches!(
        boot(1, MEM, &good[..0x1000]),
        Error::Load(LoadError::SegmentPastFileEnd { .. })
    ));
}

#[test]
fn segment_placement_is_checked() {
    let mut high = image(&[0xC3]);
    // Move the data segment past the end of 16 MiB of RAM.
    let vaddr = (MEM - 0x800).to_le_bytes();
    high[64 + 56 + 16..64 + 56 + 24].copy_from_slice(&vaddr);
    let e = boot(1, MEM, &high);
    assert!(
        matches!(
            e,
            Error::Load(LoadError::SegmentOutsideRam { index: 1, .. })
        ),
        "{e}"
    );

    let mut overlap = image(&[0xC3]);
    let vaddr = (common::CODE_ADDR + 0x800).to_le_bytes();
    overlap[64 + 56 + 16..64 + 56 + 24].copy_from_slice(&vaddr);
    let e = boot(1, MEM, &overlap);
    assert!(
        matches!(e, Error::Load(LoadError::SegmentsOverlap { .. })),
        "{e}"
    );

    let mut entry = image(&[0xC3]);
    entry[24..32].copy_from_slice(&(common::CODE_ADDR + 0x1000).to_le_bytes()); // data segment
    let e = boot(1, MEM, &entry);
    assert!(
        matches!(e, Error::Load(LoadError::EntryOutsideSegments(_))),
        "{e}"
    );
}

#[test]
fn argument_strings_are_checked() {
    let mut cfg = config(1, MEM, "");
    cfg.args = "x".repeat(5000);
    let e = Machine::boot(cfg, &image(&[0xC3])).err().expect("refused");
    assert!(
        matches!(e, Error::Boot(BootError::ArgsTooLong(5000))),
        "{e}"
    );
}
