//! The frame decoder against arbitrary and mutated input: it must never panic, never
//! accept a frame whose re-encoding differs (but for the send stamp, which is transport
//! metadata, not part of the message), and name what is wrong.

use flotilla_transport::wire::{self, Message, HEADER_BYTES, PAGE_BYTES};
use flotilla_transport::Access;
use proptest::prelude::*;

/// `frame` with its send stamp (header bytes 12..20) cleared.
fn unstamped(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    if f.len() >= HEADER_BYTES {
        f[12..20].fill(0);
    }
    f
}

fn valid_frames() -> Vec<Vec<u8>> {
    let msgs = [
        Message::PageRequest {
            page: 77,
            want: Access::Write,
            requester: 2,
        },
        Message::PageData {
            page: 9,
            want: Access::Read,
            data: Box::new([5u8; PAGE_BYTES]),
            copies: 3,
        },
        Message::VcpuMove {
            vcpu: 1,
            page: 3,
            fault_ns: 4,
            clock_ns: 5,
            sender_vcpus: 2,
            history: vec![1; 40],
            state: vec![9; 300],
        },
        Message::Console {
            fd: 1,
            bytes: b"hello".to_vec(),
        },
        Message::Fatal {
            text: "node 1: boom".into(),
        },
        Message::Stop,
    ];
    msgs.iter()
        .map(|m| {
            let mut b = Vec::new();
            wire::encode(m, &mut b);
            b
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..6000)) {
        if let Ok(msg) = wire::decode(&bytes) {
            let mut again = Vec::new();
            wire::encode(&msg, &mut again);
            prop_assert_eq!(again, unstamped(&bytes));
        }
    }

    #[test]
    fn mutated_frames_decode_to_themselves_or_fail(
        which in 0usize..6,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        cut in any::<usize>(),
        truncate in any::<bool>(),
    ) {
        let mut frame = valid_frames()[which].clone();
        for (at, x) in flips {
            let i = at % frame.len();
            frame[i] ^= x;
        }
        if truncate {
            frame.truncate(cut % frame.len());
        }
        match wire::decode(&frame) {
            Ok(msg) => {
                let mut again = Vec::new();
                wire::encode(&msg, &mut again);
                prop_assert_eq!(again, unstamped(&frame));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn oversized_lengths_are_rejected_from_the_header(kind in 0u8..=255, len in 70_000u32..) {
        let mut h = [0u8; HEADER_BYTES];
        h[..4].copy_from_slice(&wire::MAGIC.to_le_bytes());
        h[4] = wire::VERSION;
        h[5] = kind;
        h[8..12].copy_from_slice(&len.to_le_bytes());
        prop_assert!(wire::decode_header(&h).is_err());
    }
}
