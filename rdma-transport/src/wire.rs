//! The wire format of Flotilla's node protocol (docs/protocol.md, "Wire format").
//!
//! A frame is a 20-byte header, `magic u32 | version u8 | kind u8 | reserved u16 |
//! length u32 | sent_ns u64` (little-endian; `sent_ns` is the sender's clock when a link
//! delay is emulated, else 0), followed by `length` bytes of body whose layout depends
//! on `kind`. [`decode`] checks everything: magic, version, kind, length against the
//! kind's exact or maximum size, every enumerated field, and that the body is consumed
//! exactly. Bad input is an error naming the problem; it never panics.

use crate::{Access, NodeId};

pub const MAGIC: u32 = u32::from_le_bytes(*b"FLTL");
pub const VERSION: u8 = 4;
/// Largest vCPU history a `VcpuMove` may carry.
pub const MAX_HISTORY_BYTES: usize = 1024;
pub const HEADER_BYTES: usize = 20;
pub const PAGE_BYTES: usize = 4096;
/// Largest body of any frame: a vCPU state, or a console chunk.
pub const MAX_BODY_BYTES: usize = 64 << 10;
/// Largest console chunk in one frame.
pub const CONSOLE_CHUNK_BYTES: usize = 32 << 10;
/// Longest text in an error frame.
pub const MAX_TEXT_BYTES: usize = 4096;

/// Per-node counters sent to node 0 at the end of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub remote_faults: u64,
    pub page_moves: u64,
    pub replicas_made: u64,
    pub invalidations: u64,
    pub vcpu_moves: u64,
    pub bytes_sent: u64,
    pub exits: u64,
    /// Pages of fresh memory claimed: owned with no data sent (`Claim`).
    pub pages_claimed: u64,
}

impl NodeStats {
    /// Adds another node's counters to these (for cluster totals).
    pub fn add(&mut self, s: &NodeStats) {
        self.remote_faults += s.remote_faults;
        self.page_moves += s.page_moves;
        self.replicas_made += s.replicas_made;
        self.invalidations += s.invalidations;
        self.vcpu_moves += s.vcpu_moves;
        self.bytes_sent += s.bytes_sent;
        self.exits += s.exits;
        self.pages_claimed += s.pages_claimed;
    }
}

/// Latency samples (µs) from one node, for the run's percentiles.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Samples {
    /// Remote faults served by moving the page: from the fault exit to re-entry.
    pub fault_service_us: Vec<u32>,
    /// vCPU moves: from the fault exit on the source to re-entry on this node.
    pub vcpu_move_us: Vec<u32>,
    /// Local faults on pages held here but not yet populated: trap and install.
    pub install_us: Vec<u32>,
    /// Capturing a vCPU's state at a fault (source side of a move).
    pub capture_us: Vec<u32>,
    /// Restoring a vCPU's state (destination side of a move).
    pub restore_us: Vec<u32>,
    /// Bare 4 KiB request/response round trips on the transport.
    pub rtt_4k_us: Vec<u32>,
    /// Remote faults served by a claim of fresh memory (no data travelled): from the
    /// fault exit to re-entry. `fault_service_us` holds the others.
    pub claim_us: Vec<u32>,
}

impl Samples {
    pub const FIELDS: [&'static str; 7] = [
        "fault_service_us",
        "vcpu_move_us",
        "install_us",
        "capture_us",
        "restore_us",
        "rtt_4k_us",
        "claim_us",
    ];

    /// The lists, in [`Samples::FIELDS`] order.
    pub fn lists(&self) -> [&Vec<u32>; 7] {
        [
            &self.fault_service_us,
            &self.vcpu_move_us,
            &self.install_us,
            &self.capture_us,
            &self.restore_us,
            &self.rtt_4k_us,
            &self.claim_us,
        ]
    }

    /// The lists, in [`Samples::FIELDS`] order.
    pub fn lists_mut(&mut self) -> [&mut Vec<u32>; 7] {
        [
            &mut self.fault_service_us,
            &mut self.vcpu_move_us,
            &mut self.install_us,
            &mut self.capture_us,
            &mut self.restore_us,
            &mut self.rtt_4k_us,
            &mut self.claim_us,
        ]
    }

    /// Adds another node's samples.
    pub fn extend(&mut self, other: &Samples) {
        for (mine, theirs) in self.lists_mut().into_iter().zip(other.lists()) {
            mine.extend_from_slice(theirs);
        }
    }
}

/// Most samples of each kind one node sends: a `Stats` frame with every list full must
/// fit in a frame (at 4096, the frames of a busy node did not, and shm refused them).
pub const MAX_SAMPLES: usize = 2048;
/// Largest `Stats` body: 8 counters, then per kind a count and its samples.
const MAX_STATS_BYTES: usize = 64 + 4 * Samples::FIELDS.len() * (1 + MAX_SAMPLES);
const _: () = assert!(MAX_STATS_BYTES <= MAX_BODY_BYTES);

/// Every message nodes exchange.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    // Coherence (docs/protocol.md, "Messages").
    /// Requester → home: I want the page.
    PageRequest {
        page: u64,
        want: Access,
        requester: NodeId,
    },
    /// Home → owner: send the page to `requester` (and drop or downgrade your copy).
    /// `copies`: how many nodes held a copy when the home took the request.
    Fetch {
        page: u64,
        want: Access,
        requester: NodeId,
        copies: u8,
    },
    /// Home → replica holder: drop your read-only copy; `owner` is the next writer.
    Invalidate {
        page: u64,
        owner: NodeId,
    },
    /// Replica holder → home.
    InvalidateAck {
        page: u64,
    },
    /// Owner or home → requester: the page's contents; `want` says how to install it.
    /// `copies` is passed on from the home's `Fetch`.
    PageData {
        page: u64,
        want: Access,
        data: Box<[u8; PAGE_BYTES]>,
        copies: u8,
    },
    /// Home → requester: you hold the current contents; you now own the page.
    Grant {
        page: u64,
        copies: u8,
    },
    /// Requester → home: the page is installed and used; the home may go on.
    Done {
        page: u64,
    },
    /// Requester → home: I want `page` (for `want`), and the `count - 1` pages after it
    /// if nobody has used them yet (a first touch of fresh memory; see `Claimed`).
    Claim {
        page: u64,
        count: u8,
        want: Access,
    },
    /// Home → requester: bit `i` of `mask` set: page `page + i` is yours, and nobody has
    /// written it: install zeros, then answer with `ClaimDone`. A clear bit 0: `page` comes
    /// the usual way; other clear bits: ask again if you need them.
    Claimed {
        page: u64,
        count: u8,
        mask: u64,
    },
    /// Requester → home: the granted pages of a `Claimed` (same fields) are installed:
    /// a `Done` for each.
    ClaimDone {
        page: u64,
        count: u8,
        mask: u64,
    },
    // vCPUs.
    /// A vCPU's full state; it faulted on `page` and re-executes there. `fault_ns` is
    /// the sender's CLOCK_MONOTONIC at the fault (meaningful to nodes on the same host),
    /// `clock_ns` the guest clock at the move (so it never runs backwards),
    /// `sender_vcpus` the vCPUs left running on the sender (a load hint for policies),
    /// `history` the vCPU's recent faults as its policy saw them (`History::encode` of
    /// the placement crate, at most [`MAX_HISTORY_BYTES`]), so a policy sees the same vCPU
    /// on every node.
    VcpuMove {
        vcpu: u32,
        page: u64,
        fault_ns: u64,
        clock_ns: u64,
        sender_vcpus: u32,
        history: Vec<u8>,
        state: Vec<u8>,
    },
    /// A bare 4 KiB request (`reply` false) or response, for measuring the wire.
    Echo {
        reply: bool,
        data: Box<[u8; PAGE_BYTES]>,
    },
    // Futexes: node 0 keeps the one futex table.
    FutexWait {
        vcpu: u32,
        addr: u64,
        expected: u32,
        timeout_ns: u64,
    },
    FutexWake {
        vcpu: u32,
        addr: u64,
        count: u32,
    },
    /// Node 0 → the waiter's or waker's node: the call's result.
    FutexResult {
        vcpu: u32,
        result: i32,
    },
    // Run control: everything the run's outcome is made of goes to node 0.
    Console {
        fd: u8,
        bytes: Vec<u8>,
    },
    Report {
        value: u64,
    },
    VcpuReturned {
        vcpu: u32,
        code: i32,
    },
    Exit {
        code: i32,
    },
    /// A node-level error that ends the run.
    Fatal {
        text: String,
    },
    /// Node 0 → all: stop every vCPU and send your stats.
    Stop,
    Stats {
        stats: NodeStats,
        samples: Samples,
    },
    /// Node 0 → all: the run is over; leave.
    Bye,
    /// Keep-alive on an idle link.
    Ping,
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {0:#010x} (not a Flotilla peer?)")]
    Magic(u32),
    #[error("protocol version {got}, this node speaks {VERSION}")]
    Version { got: u8 },
    #[error("unknown message kind {0}")]
    Kind(u8),
    #[error("reserved header bits are {0:#x}, must be 0")]
    Reserved(u16),
    #[error("{kind} body of {len} bytes; it must be {expect}")]
    Length {
        kind: &'static str,
        len: usize,
        expect: String,
    },
    #[error("{kind}: field {field} has invalid value {value}")]
    Field {
        kind: &'static str,
        field: &'static str,
        value: u64,
    },
    #[error("{0} bytes is shorter than a frame header")]
    Truncated(usize),
    #[error("{kind}: text is not UTF-8")]
    Text { kind: &'static str },
}

const K_PAGE_REQUEST: u8 = 1;
const K_FETCH: u8 = 2;
const K_INVALIDATE: u8 = 3;
const K_INVALIDATE_ACK: u8 = 4;
const K_PAGE_DATA: u8 = 5;
const K_GRANT: u8 = 6;
const K_DONE: u8 = 7;
const K_VCPU_MOVE: u8 = 8;
const K_FUTEX_WAIT: u8 = 9;
const K_FUTEX_WAKE: u8 = 10;
const K_FUTEX_RESULT: u8 = 11;
const K_CONSOLE: u8 = 12;
const K_REPORT: u8 = 13;
const K_VCPU_RETURNED: u8 = 14;
const K_EXIT: u8 = 15;
const K_FATAL: u8 = 16;
const K_STOP: u8 = 17;
const K_STATS: u8 = 18;
const K_BYE: u8 = 19;
const K_PING: u8 = 20;
const K_ECHO: u8 = 21;
const K_CLAIM: u8 = 22;
const K_CLAIMED: u8 = 23;
const K_CLAIM_DONE: u8 = 24;
/// Most pages one `Claim` covers.
pub const CLAIM_MAX_PAGES: u8 = 64;

impl Message {
    /// The message's name, for logs and errors.
    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
    }

    fn kind(&self) -> u8 {
        match self {
            Message::PageRequest { .. } => K_PAGE_REQUEST,
            Message::Fetch { .. } => K_FETCH,
            Message::Invalidate { .. } => K_INVALIDATE,
            Message::InvalidateAck { .. } => K_INVALIDATE_ACK,
            Message::PageData { .. } => K_PAGE_DATA,
            Message::Grant { .. } => K_GRANT,
            Message::Done { .. } => K_DONE,
            Message::Claim { .. } => K_CLAIM,
            Message::Claimed { .. } => K_CLAIMED,
            Message::ClaimDone { .. } => K_CLAIM_DONE,
            Message::VcpuMove { .. } => K_VCPU_MOVE,
            Message::FutexWait { .. } => K_FUTEX_WAIT,
            Message::FutexWake { .. } => K_FUTEX_WAKE,
            Message::FutexResult { .. } => K_FUTEX_RESULT,
            Message::Console { .. } => K_CONSOLE,
            Message::Report { .. } => K_REPORT,
            Message::VcpuReturned { .. } => K_VCPU_RETURNED,
            Message::Exit { .. } => K_EXIT,
            Message::Fatal { .. } => K_FATAL,
            Message::Stop => K_STOP,
            Message::Stats { .. } => K_STATS,
            Message::Bye => K_BYE,
            Message::Ping => K_PING,
            Message::Echo { .. } => K_ECHO,
        }
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        K_PAGE_REQUEST => "PageRequest",
        K_FETCH => "Fetch",
        K_INVALIDATE => "Invalidate",
        K_INVALIDATE_ACK => "InvalidateAck",
        K_PAGE_DATA => "PageData",
        K_GRANT => "Grant",
        K_DONE => "Done",
        K_CLAIM => "Claim",
        K_CLAIMED => "Claimed",
        K_CLAIM_DONE => "ClaimDone",
        K_VCPU_MOVE => "VcpuMove",
        K_FUTEX_WAIT => "FutexWait",
        K_FUTEX_WAKE => "FutexWake",
        K_FUTEX_RESULT => "FutexResult",
        K_CONSOLE => "Console",
        K_REPORT => "Report",
        K_VCPU_RETURNED => "VcpuReturned",
        K_EXIT => "Exit",
        K_FATAL => "Fatal",
        K_STOP => "Stop",
        K_STATS => "Stats",
        K_BYE => "Bye",
        K_PING => "Ping",
        K_ECHO => "Echo",
        _ => "unknown",
    }
}

/// The permission a page message asks for or carries: read or write (an instruction
/// fetch asks for read; see `Access::permission`).
fn want_byte(w: Access) -> u8 {
    w.permission().code()
}

/// Appends the frame for `msg` to `out`.
pub fn encode(msg: &Message, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(VERSION);
    out.push(msg.kind());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    let body = out.len();
    let mut w = Writer(out);
    match msg {
        Message::PageRequest {
            page,
            want,
            requester,
        } => {
            w.u64(*page);
            w.u8(want_byte(*want));
            w.u16(*requester);
        }
        Message::Fetch {
            page,
            want,
            requester,
            copies,
        } => {
            w.u64(*page);
            w.u8(want_byte(*want));
            w.u16(*requester);
            w.u8(*copies);
        }
        Message::Invalidate { page, owner } => {
            w.u64(*page);
            w.u16(*owner);
        }
        Message::InvalidateAck { page } | Message::Done { page } => w.u64(*page),
        Message::Grant { page, copies } => {
            w.u64(*page);
            w.u8(*copies);
        }
        Message::Claim { page, count, want } => {
            w.u64(*page);
            w.u8(*count);
            w.u8(want_byte(*want));
        }
        Message::Claimed { page, count, mask } | Message::ClaimDone { page, count, mask } => {
            w.u64(*page);
            w.u8(*count);
            w.u64(*mask);
        }
        Message::PageData {
            page,
            want,
            data,
            copies,
        } => {
            w.u64(*page);
            w.u8(want_byte(*want));
            w.bytes(&data[..]);
            w.u8(*copies);
        }
        Message::VcpuMove {
            vcpu,
            page,
            fault_ns,
            clock_ns,
            sender_vcpus,
            history,
            state,
        } => {
            w.u32(*vcpu);
            w.u64(*page);
            w.u64(*fault_ns);
            w.u64(*clock_ns);
            w.u32(*sender_vcpus);
            w.u16(history.len() as u16);
            w.bytes(history);
            w.bytes(state);
        }
        Message::Echo { reply, data } => {
            w.u8(u8::from(*reply));
            w.bytes(&data[..]);
        }
        Message::FutexWait {
            vcpu,
            addr,
            expected,
            timeout_ns,
        } => {
            w.u32(*vcpu);
            w.u64(*addr);
            w.u32(*expected);
            w.u64(*timeout_ns);
        }
        Message::FutexWake { vcpu, addr, count } => {
            w.u32(*vcpu);
            w.u64(*addr);
            w.u32(*count);
        }
        Message::FutexResult { vcpu, result } => {
            w.u32(*vcpu);
            w.u32(*result as u32);
        }
        Message::Console { fd, bytes } => {
            w.u8(*fd);
            w.bytes(bytes);
        }
        Message::Report { value } => w.u64(*value),
        Message::VcpuReturned { vcpu, code } => {
            w.u32(*vcpu);
            w.u32(*code as u32);
        }
        Message::Exit { code } => w.u32(*code as u32),
        Message::Fatal { text } => w.bytes(text.as_bytes()),
        Message::Stop | Message::Bye | Message::Ping => {}
        Message::Stats { stats, samples } => {
            for v in [
                stats.remote_faults,
                stats.page_moves,
                stats.replicas_made,
                stats.invalidations,
                stats.vcpu_moves,
                stats.bytes_sent,
                stats.exits,
                stats.pages_claimed,
            ] {
                w.u64(v);
            }
            for list in samples.lists() {
                let n = list.len().min(MAX_SAMPLES);
                w.u32(n as u32);
                for v in &list[..n] {
                    w.u32(*v);
                }
            }
        }
    }
    let len = (out.len() - body) as u32;
    out[start + 8..start + 12].copy_from_slice(&len.to_le_bytes());
}

thread_local! {
    static FRAME: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Encodes `msg`, stamped `sent_ns`, into this thread's reusable frame buffer and hands
/// the frame to `f`: senders on the fault path allocate nothing per frame.
pub fn with_frame<R>(msg: &Message, sent_ns: u64, f: impl FnOnce(&[u8]) -> R) -> R {
    FRAME.with(|buf| {
        let mut frame = buf.borrow_mut();
        frame.clear();
        encode(msg, &mut frame);
        frame[12..20].copy_from_slice(&sent_ns.to_le_bytes());
        f(&frame)
    })
}

/// A checked frame header: the body's kind and length, and the send stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub len: usize,
    pub sent_ns: u64,
}

/// Checks a frame header, including the body length against the kind.
pub fn decode_header(bytes: &[u8]) -> Result<Header, WireError> {
    if bytes.len() < HEADER_BYTES {
        return Err(WireError::Truncated(bytes.len()));
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let magic = u32_at(0);
    if magic != MAGIC {
        return Err(WireError::Magic(magic));
    }
    if bytes[4] != VERSION {
        return Err(WireError::Version { got: bytes[4] });
    }
    let kind = bytes[5];
    let reserved = u16::from_le_bytes([bytes[6], bytes[7]]);
    if reserved != 0 {
        return Err(WireError::Reserved(reserved));
    }
    let len = u32_at(8) as usize;
    let name = kind_name(kind);
    let exact = |n: usize| {
        if len == n {
            Ok(())
        } else {
            Err(WireError::Length {
                kind: name,
                len,
                expect: format!("{n} bytes"),
            })
        }
    };
    let at_most = |lo: usize, hi: usize| {
        if (lo..=hi).contains(&len) {
            Ok(())
        } else {
            Err(WireError::Length {
                kind: name,
                len,
                expect: format!("{lo} to {hi} bytes"),
            })
        }
    };
    match kind {
        K_PAGE_REQUEST => exact(11)?,
        K_FETCH => exact(12)?,
        K_INVALIDATE => exact(10)?,
        K_INVALIDATE_ACK | K_DONE | K_REPORT => exact(8)?,
        K_GRANT => exact(9)?,
        K_CLAIM => exact(10)?,
        K_CLAIMED | K_CLAIM_DONE => exact(17)?,
        K_PAGE_DATA => exact(10 + PAGE_BYTES)?,
        K_VCPU_MOVE => at_most(34, MAX_BODY_BYTES)?,
        K_ECHO => exact(1 + PAGE_BYTES)?,
        K_FUTEX_WAIT => exact(24)?,
        K_FUTEX_WAKE => exact(16)?,
        K_FUTEX_RESULT | K_VCPU_RETURNED => exact(8)?,
        K_CONSOLE => at_most(1, 1 + CONSOLE_CHUNK_BYTES)?,
        K_EXIT => exact(4)?,
        K_FATAL => at_most(0, MAX_TEXT_BYTES)?,
        K_STOP | K_BYE | K_PING => exact(0)?,
        K_STATS => at_most(64 + 4 * Samples::FIELDS.len(), MAX_STATS_BYTES)?,
        other => return Err(WireError::Kind(other)),
    }
    let sent_ns = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    Ok(Header { kind, len, sent_ns })
}

/// Decodes the body of a frame whose header [`decode_header`] accepted.
pub fn decode_body(header: Header, body: &[u8]) -> Result<Message, WireError> {
    let kind = kind_name(header.kind);
    if body.len() != header.len {
        return Err(WireError::Length {
            kind,
            len: body.len(),
            expect: format!("{} bytes (the header's length)", header.len),
        });
    }
    let mut r = Reader { buf: body, kind };
    let want = |r: &mut Reader| match r.u8()? {
        0 => Ok(Access::Read),
        1 => Ok(Access::Write),
        v => Err(WireError::Field {
            kind,
            field: "want",
            value: v as u64,
        }),
    };
    let copies = |r: &mut Reader| match r.u8()? {
        v if v as usize <= crate::MAX_NODES => Ok(v),
        v => Err(WireError::Field {
            kind,
            field: "copies",
            value: v as u64,
        }),
    };
    let msg = match header.kind {
        K_PAGE_REQUEST => Message::PageRequest {
            page: r.u64()?,
            want: want(&mut r)?,
            requester: r.u16()?,
        },
        K_FETCH => Message::Fetch {
            page: r.u64()?,
            want: want(&mut r)?,
            requester: r.u16()?,
            copies: copies(&mut r)?,
        },
        K_INVALIDATE => Message::Invalidate {
            page: r.u64()?,
            owner: r.u16()?,
        },
        K_INVALIDATE_ACK => Message::InvalidateAck { page: r.u64()? },
        K_PAGE_DATA => {
            let page = r.u64()?;
            let want = want(&mut r)?;
            let mut data = Box::new([0u8; PAGE_BYTES]);
            data.copy_from_slice(r.take(PAGE_BYTES)?);
            let n = copies(&mut r)?;
            Message::PageData {
                page,
                want,
                data,
                copies: n,
            }
        }
        K_GRANT => Message::Grant {
            page: r.u64()?,
            copies: copies(&mut r)?,
        },
        K_DONE => Message::Done { page: r.u64()? },
        K_CLAIM | K_CLAIMED | K_CLAIM_DONE => {
            let page = r.u64()?;
            let count = match r.u8()? {
                c @ 1..=CLAIM_MAX_PAGES => c,
                c => {
                    return Err(WireError::Field {
                        kind,
                        field: "count",
                        value: c as u64,
                    })
                }
            };
            if header.kind == K_CLAIM {
                Message::Claim {
                    page,
                    count,
                    want: want(&mut r)?,
                }
            } else {
                let mask = r.u64()?;
                if count < 64 && mask >> count != 0 {
                    return Err(WireError::Field {
                        kind,
                        field: "mask",
                        value: mask,
                    });
                }
                if header.kind == K_CLAIMED {
                    Message::Claimed { page, count, mask }
                } else {
                    Message::ClaimDone { page, count, mask }
                }
            }
        }
        K_VCPU_MOVE => {
            let (vcpu, page, fault_ns, clock_ns, sender_vcpus) =
                (r.u32()?, r.u64()?, r.u64()?, r.u64()?, r.u32()?);
            let n = r.u16()?;
            if n as usize > MAX_HISTORY_BYTES {
                return Err(WireError::Field {
                    kind,
                    field: "history length",
                    value: n as u64,
                });
            }
            Message::VcpuMove {
                vcpu,
                page,
                fault_ns,
                clock_ns,
                sender_vcpus,
                history: r.take(n as usize)?.to_vec(),
                state: r.rest().to_vec(),
            }
        }
        K_ECHO => {
            let reply = match r.u8()? {
                0 => false,
                1 => true,
                v => {
                    return Err(WireError::Field {
                        kind,
                        field: "reply",
                        value: v as u64,
                    })
                }
            };
            let mut data = Box::new([0u8; PAGE_BYTES]);
            data.copy_from_slice(r.take(PAGE_BYTES)?);
            Message::Echo { reply, data }
        }
        K_FUTEX_WAIT => Message::FutexWait {
            vcpu: r.u32()?,
            addr: r.u64()?,
            expected: r.u32()?,
            timeout_ns: r.u64()?,
        },
        K_FUTEX_WAKE => Message::FutexWake {
            vcpu: r.u32()?,
            addr: r.u64()?,
            count: r.u32()?,
        },
        K_FUTEX_RESULT => Message::FutexResult {
            vcpu: r.u32()?,
            result: r.u32()? as i32,
        },
        K_CONSOLE => {
            let fd = r.u8()?;
            if fd != 1 && fd != 2 {
                return Err(WireError::Field {
                    kind,
                    field: "fd",
                    value: fd as u64,
                });
            }
            Message::Console {
                fd,
                bytes: r.rest().to_vec(),
            }
        }
        K_REPORT => Message::Report { value: r.u64()? },
        K_VCPU_RETURNED => Message::VcpuReturned {
            vcpu: r.u32()?,
            code: r.u32()? as i32,
        },
        K_EXIT => Message::Exit {
            code: r.u32()? as i32,
        },
        K_FATAL => Message::Fatal {
            text: String::from_utf8(r.rest().to_vec()).map_err(|_| WireError::Text { kind })?,
        },
        K_STOP => Message::Stop,
        K_BYE => Message::Bye,
        K_PING => Message::Ping,
        K_STATS => {
            let mut v = [0u64; 8];
            for x in &mut v {
                *x = r.u64()?;
            }
            let stats = NodeStats {
                remote_faults: v[0],
                page_moves: v[1],
                replicas_made: v[2],
                invalidations: v[3],
                vcpu_moves: v[4],
                bytes_sent: v[5],
                exits: v[6],
                pages_claimed: v[7],
            };
            let mut samples = Samples::default();
            for (field, list) in Samples::FIELDS.into_iter().zip(samples.lists_mut()) {
                let n = r.u32()? as usize;
                if n > MAX_SAMPLES {
                    return Err(WireError::Field {
                        kind,
                        field,
                        value: n as u64,
                    });
                }
                for _ in 0..n {
                    list.push(r.u32()?);
                }
            }
            Message::Stats { stats, samples }
        }
        other => return Err(WireError::Kind(other)),
    };
    if !r.buf.is_empty() {
        return Err(WireError::Length {
            kind,
            len: header.len,
            expect: format!("{} bytes (trailing bytes)", header.len - r.buf.len()),
        });
    }
    Ok(msg)
}

/// Decodes one whole frame (header and body) from `bytes`, which must hold exactly it.
pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
    let header = decode_header(bytes)?;
    decode_body(header, &bytes[HEADER_BYTES..])
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    kind: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Length {
                kind: self.kind,
                len: self.buf.len(),
                expect: format!("at least {n} more bytes"),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn samples() -> Vec<Message> {
        let mut data = Box::new([0u8; PAGE_BYTES]);
        data[17] = 9;
        vec![
            Message::PageRequest {
                page: 5,
                want: Access::Write,
                requester: 3,
            },
            Message::Fetch {
                page: u64::MAX,
                want: Access::Read,
                requester: 0,
                copies: 64,
            },
            Message::Invalidate { page: 1, owner: 2 },
            Message::InvalidateAck { page: 1 },
            Message::PageData {
                page: 9,
                want: Access::Read,
                data,
                copies: 2,
            },
            Message::Grant { page: 3, copies: 1 },
            Message::Done { page: 3 },
            Message::Claim {
                page: 4,
                count: 64,
                want: Access::Write,
            },
            Message::Claimed {
                page: 4,
                count: 3,
                mask: 0b101,
            },
            Message::ClaimDone {
                page: 4,
                count: 64,
                mask: u64::MAX,
            },
            Message::VcpuMove {
                vcpu: 3,
                page: 77,
                fault_ns: 5,
                clock_ns: 6,
                sender_vcpus: 2,
                history: vec![9, 8],
                state: vec![1, 2, 3],
            },
            Message::Echo {
                reply: true,
                data: Box::new([3u8; PAGE_BYTES]),
            },
            Message::FutexWait {
                vcpu: 1,
                addr: 0x1000,
                expected: 7,
                timeout_ns: 0,
            },
            Message::FutexWake {
                vcpu: 1,
                addr: 0x1000,
                count: u32::MAX,
            },
            Message::FutexResult {
                vcpu: 1,
                result: -11,
            },
            Message::Console {
                fd: 2,
                bytes: b"hi\n".to_vec(),
            },
            Message::Report { value: 42 },
            Message::VcpuReturned { vcpu: 0, code: -1 },
            Message::Exit { code: 3 },
            Message::Fatal {
                text: "vCPU 2: triple fault".into(),
            },
            Message::Stop,
            Message::Stats {
                stats: NodeStats {
                    remote_faults: 1,
                    bytes_sent: 99,
                    ..Default::default()
                },
                samples: Samples {
                    fault_service_us: vec![1, 2, 3],
                    rtt_4k_us: vec![9],
                    ..Default::default()
                },
            },
            Message::Bye,
            Message::Ping,
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for msg in samples() {
            let mut buf = Vec::new();
            encode(&msg, &mut buf);
            assert_eq!(decode(&buf), Ok(msg.clone()), "{}", msg.name());
        }
    }

    /// The fullest `Stats` a node can send.
    pub(crate) fn fullest_stats() -> Message {
        let full: Vec<u32> = (0..MAX_SAMPLES as u32).collect();
        let mut samples = Samples::default();
        for list in samples.lists_mut() {
            *list = full.clone();
        }
        Message::Stats {
            stats: NodeStats::default(),
            samples,
        }
    }

    #[test]
    fn the_fullest_stats_fits_a_frame() {
        let msg = fullest_stats();
        let mut buf = Vec::new();
        encode(&msg, &mut buf);
        assert!(
            buf.len() - HEADER_BYTES <= MAX_BODY_BYTES,
            "{} bytes",
            buf.len()
        );
        assert_eq!(decode(&buf), Ok(msg));
    }

    #[test]
    fn bad_frames_are_named() {
        let mut buf = Vec::new();
        encode(&Message::Grant { page: 1, copies: 1 }, &mut buf);
        let mut bad = buf.clone();
        bad[0] ^= 1;
        assert!(matches!(decode(&bad), Err(WireError::Magic(_))));
        let mut bad = buf.clone();
        bad[4] = 9;
        assert_eq!(decode(&bad), Err(WireError::Version { got: 9 }));
        let mut bad = buf.clone();
        bad[5] = 200;
        assert_eq!(decode(&bad), Err(WireError::Kind(200)));
        assert!(matches!(
            decode(&buf[..buf.len() - 1]),
            Err(WireError::Length { .. })
        ));
        let mut bad = buf.clone();
        bad[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());
        assert!(matches!(decode(&bad), Err(WireError::Length { .. })));
        let mut req = Vec::new();
        encode(
            &Message::PageRequest {
                page: 1,
                want: Access::Read,
                requester: 0,
            },
            &mut req,
        );
        req[HEADER_BYTES + 8] = 7;
        assert!(matches!(
            decode(&req),
            Err(WireError::Field { field: "want", .. })
        ));
    }
}
