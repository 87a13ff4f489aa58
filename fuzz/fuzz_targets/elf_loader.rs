//! Fuzzes guest image validation: any bytes, any RAM size; never a panic, and an
//! accepted image always fits the rules (`cargo fuzz run elf_loader`).
#![no_main]

use flotilla_engine::loader::Image;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let ram = (u64::from_le_bytes(data[..8].try_into().unwrap()) % (64 << 30)).max(4 << 20);
    if let Ok(image) = Image::parse(&data[8..], ram) {
        for s in &image.segments {
            assert!(s.addr >= flotilla_abi::IMAGE_MIN_ADDR && s.addr + s.mem_bytes <= ram);
            assert!(s.file_range.end <= data.len() - 8);
        }
        assert!(image.segments.iter().any(|s| image.entry >= s.addr && image.entry < s.addr + s.mem_bytes));
    }
});
