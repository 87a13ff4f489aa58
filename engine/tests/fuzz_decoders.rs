//! Property tests over the decoders of outside input: guest images and encoded vCPU
//! states. Arbitrary and mutated inputs never panic, and what is accepted obeys the
//! rules. (The same checks run coverage-guided under cargo-fuzz: see fuzz/.)

mod common;

use flotilla_engine::loader::Image;
use flotilla_engine::VcpuState;
use proptest::prelude::*;

fn check_image(bytes: &[u8], ram: u64) {
    if let Ok(image) = Image::parse(bytes, ram) {
        for (i, s) in image.segments.iter().enumerate() {
            assert!(s.addr >= flotilla_abi::IMAGE_MIN_ADDR && s.addr + s.mem_bytes <= ram);
            assert!(s.file_range.end <= bytes.len());
            for t in &image.segments[i + 1..] {
                assert!(s.addr + s.mem_bytes <= t.addr || t.addr + t.mem_bytes <= s.addr);
            }
        }
        assert!(image
            .segments
            .iter()
            .any(|s| s.executable && image.entry >= s.addr && image.entry < s.addr + s.mem_bytes));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic_the_loader(bytes in proptest::collection::vec(any::<u8>(), 0..512), ram in 4u64..64) {
        check_image(&bytes, ram << 20);
    }

    #[test]
    fn mutated_images_never_panic_the_loader(
        edits in proptest::collection::vec((0usize..0x1100, any::<u8>()), 1..12),
        cut in 0usize..0x3000,
    ) {
        let mut bytes = common::image(&[0xC3; 16]);
        for (at, value) in edits {
            bytes[at] = value;
        }
        bytes.truncate(cut.max(1));
        check_image(&bytes, 16 << 20);
    }

    #[test]
    fn random_bytes_never_panic_the_state_decoder(tail in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut bytes = b"FLVS\x01\x00".to_vec();
        bytes.extend_from_slice(&tail);
        let _ = VcpuState::decode(&bytes);
        let _ = VcpuState::decode(&tail);
    }
}
