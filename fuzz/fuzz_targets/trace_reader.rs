//! The trace reader against arbitrary bytes: it must never panic, and whatever it accepts
//! must write back to a file it reads the same.
#![no_main]

use flotilla_telemetry::trace;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = trace::read_bytes(data) {
        let mut w = trace::TraceWriter::new(Vec::new(), &t.meta).expect("writing to memory");
        w.write_events(&t.events).expect("accepted events write back");
        let bytes = w.finish().expect("finish");
        assert_eq!(trace::read_bytes(&bytes).expect("re-read"), t);
    }
});
