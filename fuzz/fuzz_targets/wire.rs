//! Fuzzes the node protocol's frame decoder: any bytes decode or fail cleanly, and a
//! decoded frame re-encodes to the same bytes (`cargo fuzz run wire`).
#![no_main]

use flotilla_transport::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = wire::decode(data) {
        let mut again = Vec::new();
        wire::encode(&msg, &mut again);
        assert_eq!(again, data);
    }
});
