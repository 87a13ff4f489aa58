//! Fuzzes the vCPU state decoder: any bytes decode or fail cleanly, and a decoded state
//! re-encodes to bytes that decode again (`cargo fuzz run vcpu_state`).
#![no_main]

use flotilla_engine::VcpuState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = VcpuState::decode(data) {
        let again = VcpuState::decode(&state.encode()).expect("re-encoded state decodes");
        assert_eq!(again.encode(), state.encode());
    }
});
