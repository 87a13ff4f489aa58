//! The trace reader against mutated files: never a panic, always a named error, and a
//! file it accepts holds exactly what a writer would write. Mutations either keep the
//! block checksums (so they reach the rkyv validation and the field checks) or not.

use flotilla_telemetry::trace::{
    self, Event, EventKind, TraceMeta, TraceWriter, BLOCK_HEADER_BYTES, HEADER_BYTES, NONE16,
};
use proptest::prelude::*;

fn valid() -> Vec<u8> {
    let meta = TraceMeta {
        workload: "kvstore".into(),
        args: "ops=1000".into(),
        policy: "random".into(),
        transport: "shm".into(),
        engine_version: "0.1.0".into(),
        host: "fuzz".into(),
        nodes: 3,
        vcpus: 4,
        mem_bytes: 1 << 28,
        seed: 3,
        sample_rate: 100,
        ..Default::default()
    };
    let events: Vec<Event> = (0..300u64)
        .map(|i| Event {
            t_ns: i * 10,
            page: 0x500 + i % 13,
            rip: 0x40_0000 + i,
            service_ns: i as u32,
            vcpu: (i % 4) as u16,
            node: (i % 3) as u16,
            peer: if i % 5 == 0 {
                NONE16
            } else {
                ((i + 1) % 3) as u16
            },
            replicas: (i % 4) as u16,
            kind: EventKind::ALL[(i % 7) as usize] as u8,
            access: (i % 3) as u8,
            decision: (i % 3) as u8,
            flags: (i % 8) as u8,
        })
        .collect();
    let mut w = TraceWriter::new(Vec::new(), &meta).unwrap();
    for chunk in events.chunks(100) {
        w.write_events(chunk).unwrap();
    }
    w.finish().unwrap()
}

/// Recomputes every block's checksum, walking the framing as far as it is intact.
fn fix_checksums(b: &mut [u8]) {
    let mut at = HEADER_BYTES;
    while at + BLOCK_HEADER_BYTES <= b.len() {
        let len = u32::from_le_bytes(b[at + 4..at + 8].try_into().unwrap()) as usize;
        let start = at + BLOCK_HEADER_BYTES;
        if len > b.len() - start {
            return;
        }
        let crc = crc32fast::hash(&b[start..start + len]);
        b[at + 8..at + 12].copy_from_slice(&crc.to_le_bytes());
        at = start + len.next_multiple_of(16);
    }
}

fn check(bytes: &[u8]) {
    match trace::read_bytes(bytes) {
        Ok(t) => {
            let mut w = TraceWriter::new(Vec::new(), &t.meta).unwrap();
            w.write_events(&t.events)
                .expect("accepted events are valid");
            let again = trace::read_bytes(&w.finish().unwrap()).unwrap();
            assert_eq!(again, t);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

#[test]
fn the_valid_file_reads() {
    let t = trace::read_bytes(&valid()).unwrap();
    assert_eq!(t.events.len(), 300);
    assert_eq!(t.meta.policy, "random");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn mutated_files_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        fix in any::<bool>(),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let mut b = valid();
        for (i, v) in &edits {
            let i = i.index(b.len());
            b[i] = *v;
        }
        if fix {
            fix_checksums(&mut b);
        }
        if let Some(c) = cut {
            b.truncate(c.index(b.len()));
        }
        check(&b);
    }

    #[test]
    fn arbitrary_bytes_never_panic(mut b in prop::collection::vec(any::<u8>(), 0..512), magic in any::<bool>()) {
        if magic && b.len() >= 16 {
            b[..8].copy_from_slice(b"FLOTRACE");
            b[8..10].copy_from_slice(&1u16.to_le_bytes());
            b[10..12].copy_from_slice(&16u16.to_le_bytes());
            fix_checksums(&mut b);
        }
        check(&b);
    }
}
