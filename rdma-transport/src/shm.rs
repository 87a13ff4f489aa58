//! The shared-memory transport, for nodes on one host. Each pair of nodes shares one
//! segment (a file in `/dev/shm`, mode 0600, unlinked once both ends mapped it) holding
//! two byte rings, one per direction. A sender writes whole frames into the peer's ring
//! with plain stores (one-sided: the receiver takes no part until the doorbell), then
//! publishes the new head and, if the receiver sleeps, rings a futex doorbell. The
//! receiver validates every frame exactly as the TCP transport does; the ring indices
//! come from another process and are checked too.
//!
//! The segment's name travels over the link's authenticated TCP connection, which stays
//! open for keep-alives: a peer that dies or hangs is noticed the same way as with TCP.
//! A loss seen on that connection is reported only once the ring is drained (or after
//! `DRAIN_LIMIT`), so that what a peer wrote before closing, such as its last error,
//! still arrives before the news that it is gone, as it would on one TCP stream.

use crate::tcp::{connect_all, read_frame};
use crate::wire::{self, Message, HEADER_BYTES, MAX_BODY_BYTES};
use crate::{Handler, MeshConfig, NodeId, Traffic, Transport, TransportError};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes of frame data per ring.
const RING_BYTES: usize = 1 << 20;
/// Ring control block: producer and consumer fields on separate cache lines.
const CONTROL_BYTES: usize = 256;
const SEGMENT_BYTES: usize = 2 * (CONTROL_BYTES + RING_BYTES);
/// How long a receiver polls an empty ring before sleeping on the doorbell.
const SPIN: Duration = Duration::from_micros(200);
/// How long a loss seen on the TCP connection waits for the ring receiver to drain what
/// the peer published before it went (the receiver may be busy in a handler).
const DRAIN_LIMIT: Duration = Duration::from_secs(1);

#[repr(C)]
struct Control {
    /// Bytes ever written (producer).
    head: AtomicU64,
    _pad0: [u8; 56],
    /// Bytes ever consumed (consumer).
    tail: AtomicU64,
    /// 1 while the consumer sleeps or is about to.
    sleeping: AtomicU32,
    /// The doorbell futex word.
    bell: AtomicU32,
}

/// One direction of one pair's segment.
struct Ring {
    control: *const Control,
    data: *mut u8,
}

// SAFETY: the ring points into a shared mapping that lives as long as the transport (the
// `Segment` is kept alive by the transport); all shared fields are atomics, and data bytes
// are only written by the single producer (under its lock) in the free part of the ring.
unsafe impl Send for Ring {}
// SAFETY: see above.
unsafe impl Sync for Ring {}

impl Ring {
    fn control(&self) -> &Control {
        // SAFETY: the control block lies at the start of this ring's part of the mapping.
        unsafe { &*self.control }
    }

    fn copy_in(&self, pos: u64, bytes: &[u8]) {
        let start = (pos % RING_BYTES as u64) as usize;
        let first = bytes.len().min(RING_BYTES - start);
        // SAFETY: both pieces stay inside the ring's data area; the producer owns
        // [head, tail + RING_BYTES), which the caller checked has room for `bytes`.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data.add(start), first);
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr().add(first),
                self.data,
                bytes.len() - first,
            );
        }
    }

    fn copy_out(&self, pos: u64, out: &mut [u8]) {
        let start = (pos % RING_BYTES as u64) as usize;
        let first = out.len().min(RING_BYTES - start);
        // SAFETY: inside the data area; the consumer owns [tail, head), published by the
        // producer's release store of `head` (acquired by the caller).
        unsafe {
            std::ptr::copy_nonoverlapping(self.data.add(start), out.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(
                self.data,
                out.as_mut_ptr().add(first),
                out.len() - first,
            );
        }
    }
}

struct Segment {
    base: *mut libc::c_void,
}

// SAFETY: a plain shared mapping, unmapped only on drop.
unsafe impl Send for Segment {}
// SAFETY: see above.
unsafe impl Sync for Segment {}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; rings pointing into it are dropped with the
        // transport that owns this segment.
        unsafe { libc::munmap(self.base, SEGMENT_BYTES) };
    }
}

fn futex(word: &AtomicU32, op: libc::c_int, val: u32, timeout: Option<&libc::timespec>) {
    let ts = timeout.map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: a futex call on a live, aligned word of a shared mapping (no PRIVATE flag:
    // the word is shared between processes).
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), op, val, ts) };
}

/// The end of one peer's link, reported to the handler at most once.
#[derive(Default)]
struct Loss {
    /// Seen on the TCP connection, not yet reported: waits for the ring to drain.
    pending: Mutex<Option<TransportError>>,
    reported: AtomicBool,
}

struct Link {
    addr: SocketAddr,
    tx: Ring,
    tx_lock: Mutex<()>,
    tcp: TcpStream,
    _segment: Arc<Segment>,
}

/// See the module documentation.
pub struct ShmTransport {
    me: NodeId,
    nodes: u16,
    links: Vec<Option<Link>>,
    /// Indexed by peer.
    losses: Vec<Loss>,
    traffic: Traffic,
    closed: AtomicBool,
    link_delay: Duration,
}

fn map(file: &std::fs::File, path: &str) -> Result<Segment, TransportError> {
    // SAFETY: a shared read-write mapping of a file of SEGMENT_BYTES; checked below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SEGMENT_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(TransportError::Shm {
            path: path.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(Segment { base })
}

fn ring(segment: &Segment, index: usize) -> Ring {
    let part = CONTROL_BYTES + RING_BYTES;
    // SAFETY: index is 0 or 1, so both pointers stay inside the segment.
    unsafe {
        let start = (segment.base as *mut u8).add(index * part);
        Ring {
            control: start as *const Control,
            data: start.add(CONTROL_BYTES),
        }
    }
}

/// The lower node of a pair creates the segment and sends its path; the higher maps it.
fn share_segment(
    me: NodeId,
    peer: NodeId,
    addr: SocketAddr,
    tcp: &mut TcpStream,
) -> Result<Segment, TransportError> {
    let io = |what, source| TransportError::Io {
        peer,
        addr,
        what,
        source,
    };
    if me < peer {
        let mut nonce = [0u8; 8];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut nonce))
            .map_err(|e| io("reading /dev/urandom", e))?;
        let path = format!(
            "/dev/shm/flotilla-{}-{me}-{peer}-{:016x}",
            std::process::id(),
            u64::from_le_bytes(nonce)
        );
        let shm_err = |source| TransportError::Shm {
            path: path.clone(),
            source,
        };
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(shm_err)?
        };
        let cleanup = |e| {
            let _ = std::fs::remove_file(&path);
            e
        };
        file.set_len(SEGMENT_BYTES as u64)
            .map_err(shm_err)
            .map_err(cleanup)?;
        let segment = map(&file, &path).map_err(cleanup)?;
        let mut msg = (path.len() as u16).to_le_bytes().to_vec();
        msg.extend_from_slice(path.as_bytes());
        tcp.write_all(&msg)
            .map_err(|e| io("sending the segment name", e))
            .map_err(cleanup)?;
        let mut ack = [0u8; 1];
        let acked = tcp.read_exact(&mut ack);
        let _ = std::fs::remove_file(&path);
        acked.map_err(|e| io("waiting for the peer to map the segment", e))?;
        Ok(segment)
    } else {
        let mut len = [0u8; 2];
        tcp.read_exact(&mut len)
            .map_err(|e| io("receiving the segment name", e))?;
        let len = u16::from_le_bytes(len) as usize;
        if len > 255 {
            return Err(io(
                "receiving the segment name",
                std::io::Error::other(format!("name of {len} bytes")),
            ));
        }
        let mut name = vec![0u8; len];
        tcp.read_exact(&mut name)
            .map_err(|e| io("receiving the segment name", e))?;
        let path = String::from_utf8(name)
            .ok()
            .filter(|p| p.starts_with("/dev/shm/flotilla-") && !p.contains(".."))
            .ok_or_else(|| {
                io(
                    "receiving the segment name",
                    std::io::Error::other("not a Flotilla segment path"),
                )
            })?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| TransportError::Shm {
                path: path.clone(),
                source,
            })?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        if size != SEGMENT_BYTES as u64 {
            return Err(TransportError::Shm {
                path,
                source: std::io::Error::other(format!("segment is {size} bytes")),
            });
        }
        let segment = map(&file, &path)?;
        tcp.write_all(&[1])
            .map_err(|e| io("acknowledging the segment", e))?;
        Ok(segment)
    }
}

impl ShmTransport {
    pub fn establish(
        config: &MeshConfig,
        handler: Arc<dyn Handler>,
    ) -> Result<Arc<Self>, TransportError> {
        let streams = connect_all(config)?;
        let me = config.me;
        let mut links = Vec::new();
        let mut receivers = Vec::new();
        for (peer, s) in streams.into_iter().enumerate() {
            let Some((addr, mut tcp)) = s else {
                links.push(None);
                continue;
            };
            let peer = peer as NodeId;
            let segment = Arc::new(share_segment(me, peer, addr, &mut tcp)?);
            // Ring 0 carries lower → higher, ring 1 higher → lower.
            let (tx, rx) = if me < peer { (0, 1) } else { (1, 0) };
            let io = |what, source| TransportError::Io {
                peer,
                addr,
                what,
                source,
            };
            tcp.set_read_timeout(Some(config.idle_timeout))
                .map_err(|e| io("setting the idle timeout", e))?;
            let tcp_rx = tcp.try_clone().map_err(|e| io("cloning the socket", e))?;
            receivers.push((peer, addr, rx, tcp_rx, Arc::clone(&segment)));
            links.push(Some(Link {
                addr,
                tx: ring(&segment, tx),
                tx_lock: Mutex::new(()),
                tcp,
                _segment: segment,
            }));
        }
        let transport = Arc::new(ShmTransport {
            me,
            nodes: config.addrs.len() as u16,
            links,
            losses: (0..config.addrs.len()).map(|_| Loss::default()).collect(),
            traffic: Traffic::default(),
            closed: AtomicBool::new(false),
            link_delay: config.link_delay,
        });
        let spawn_err = |peer, addr, source| TransportError::Io {
            peer,
            addr,
            what: "starting a receive thread",
            source,
        };
        for (peer, addr, rx, tcp, segment) in receivers {
            let (t, h, s) = (
                Arc::clone(&transport),
                Arc::clone(&handler),
                Arc::clone(&segment),
            );
            std::thread::Builder::new()
                .name(format!("shm{me}<{peer}"))
                .spawn(move || {
                    let _segment = s;
                    t.receive_ring(peer, &ring(&_segment, rx), &*h)
                })
                .map_err(|e| spawn_err(peer, addr, e))?;
            let (t, h) = (Arc::clone(&transport), Arc::clone(&handler));
            let idle = config.idle_timeout;
            std::thread::Builder::new()
                .name(format!("live{me}<{peer}"))
                .spawn(move || {
                    let rx = ring(&segment, rx);
                    t.watch_liveness(peer, addr, tcp, idle, &rx, &*h)
                })
                .map_err(|e| spawn_err(peer, addr, e))?;
        }
        if config.addrs.len() > 1 {
            let t = Arc::clone(&transport);
            let period = config.idle_timeout / 4;
            std::thread::Builder::new()
                .name(format!("keepalive{me}"))
                .spawn(move || t.keep_alive(period))
                .map_err(|e| spawn_err(me, config.addrs[me as usize], e))?;
        }
        Ok(transport)
    }

    /// Reports the end of `peer`'s link, once (both of its threads may see it).
    fn lost(&self, peer: NodeId, why: TransportError, handler: &dyn Handler) {
        let Some(loss) = self.losses.get(peer as usize) else {
            return;
        };
        if self.closed.load(Ordering::SeqCst) || loss.reported.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::debug!(node = self.me, peer, error = %why, "link lost");
        handler.link_lost(peer, why);
    }

    fn loss_pending(&self, peer: NodeId) -> bool {
        self.losses.get(peer as usize).is_some_and(|l| {
            l.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
        })
    }

    /// A loss seen on the TCP connection, reported by the ring receiver once it has
    /// drained the ring; None while the link stands.
    fn take_pending_loss(&self, peer: NodeId) -> Option<TransportError> {
        let loss = self.losses.get(peer as usize)?;
        loss.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Keep-alives only travel on TCP; anything else there is a protocol error.
    fn watch_liveness(
        &self,
        peer: NodeId,
        addr: SocketAddr,
        mut tcp: TcpStream,
        idle: Duration,
        rx: &Ring,
        handler: &dyn Handler,
    ) {
        let mut header = [0u8; HEADER_BYTES];
        let mut body = Vec::new();
        let why = loop {
            match read_frame(&mut tcp, &mut header, &mut body, peer, addr, idle) {
                Ok((Message::Ping, _)) => {}
                Ok((other, _)) => {
                    break TransportError::Handshake {
                        addr,
                        reason: format!("{} on the keep-alive connection", other.name()),
                    }
                }
                Err(e) => break e,
            }
        };
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let _ = tcp.shutdown(Shutdown::Both);
        // Hand the loss to the ring receiver, which reports it after the last frame the
        // peer published; report it here if the receiver does not get to it in time.
        let Some(loss) = self.losses.get(peer as usize) else {
            return;
        };
        *loss.pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        let c = rx.control();
        c.bell.fetch_add(1, Ordering::SeqCst);
        futex(&c.bell, libc::FUTEX_WAKE, 1, None);
        let deadline = Instant::now() + DRAIN_LIMIT;
        while Instant::now() < deadline && !loss.reported.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(why) = self.take_pending_loss(peer) {
            self.lost(peer, why, handler);
        }
    }

    fn receive_ring(&self, peer: NodeId, rx: &Ring, handler: &dyn Handler) {
        let c = rx.control();
        let mut tail = c.tail.load(Ordering::Acquire);
        let mut header = [0u8; HEADER_BYTES];
        let mut body = Vec::new();
        let mut gone = false;
        loop {
            // Wait for a whole frame's header.
            let spin_until = Instant::now() + SPIN;
            let head = loop {
                if self.closed.load(Ordering::SeqCst) {
                    return;
                }
                let head = c.head.load(Ordering::Acquire);
                if head != tail {
                    break head;
                }
                if self.loss_pending(peer) {
                    if gone {
                        // Everything the peer published before it went has been delivered.
                        if let Some(why) = self.take_pending_loss(peer) {
                            self.lost(peer, why, handler);
                        }
                        return;
                    }
                    // Look at the ring once more: the loss may have been seen after the
                    // last frames were published but before this thread read the head.
                    gone = true;
                    continue;
                }
                if Instant::now() < spin_until {
                    std::thread::yield_now();
                    continue;
                }
                let bell = c.bell.load(Ordering::SeqCst);
                c.sleeping.store(1, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                if c.head.load(Ordering::SeqCst) == tail {
                    let ts = libc::timespec {
                        tv_sec: 0,
                        tv_nsec: 100_000_000,
                    };
                    futex(&c.bell, libc::FUTEX_WAIT, bell, Some(&ts));
                }
                c.sleeping.store(0, Ordering::SeqCst);
            };
            let avail = head.wrapping_sub(tail);
            let bad = |what: String| TransportError::Shm {
                path: format!("ring from node {peer}"),
                source: std::io::Error::other(what),
            };
            if avail > RING_BYTES as u64 || avail < HEADER_BYTES as u64 {
                self.lost(
                    peer,
                    bad(format!("corrupt ring: {avail} bytes pending")),
                    handler,
                );
                return;
            }
            rx.copy_out(tail, &mut header);
            let h = match wire::decode_header(&header) {
                Ok(h) => h,
                Err(source) => {
                    self.lost(peer, TransportError::Wire { peer, source }, handler);
                    return;
                }
            };
            let total = (HEADER_BYTES + h.len) as u64;
            if avail < total || h.len > MAX_BODY_BYTES {
                self.lost(
                    peer,
                    bad(format!("frame of {total} bytes, {avail} published")),
                    handler,
                );
                return;
            }
            body.resize(h.len, 0);
            rx.copy_out(tail + HEADER_BYTES as u64, &mut body);
            tail += total;
            c.tail.store(tail, Ordering::Release);
            self.traffic.received(total);
            match wire::decode_body(h, &body) {
                Ok(msg) => {
                    crate::hold(h.sent_ns, self.link_delay);
                    handler.deliver(peer, msg)
                }
                Err(source) => {
                    self.lost(peer, TransportError::Wire { peer, source }, handler);
                    return;
                }
            }
        }
    }

    fn keep_alive(&self, period: Duration) {
        let mut frame = Vec::new();
        wire::encode(&Message::Ping, &mut frame);
        while !self.closed.load(Ordering::SeqCst) {
            std::thread::sleep(period);
            for link in self.links.iter().flatten() {
                let _ = (&link.tcp).write_all(&frame);
            }
        }
    }
}

impl Transport for ShmTransport {
    fn name(&self) -> &'static str {
        "shm"
    }

    fn me(&self) -> NodeId {
        self.me
    }

    fn nodes(&self) -> u16 {
        self.nodes
    }

    fn send(&self, to: NodeId, msg: &Message) -> Result<(), TransportError> {
        let link = crate::link_to(&self.links, to)?;
        wire::with_frame(msg, crate::sent_stamp(self.link_delay), |frame| {
            let len = frame.len() as u64;
            let _guard = link.tx_lock.lock().unwrap_or_else(|p| p.into_inner());
            let c = link.tx.control();
            let head = c.head.load(Ordering::Relaxed);
            // Wait for room (rare: the protocol keeps little in flight).
            let deadline = Instant::now() + Duration::from_secs(10);
            while head + len - c.tail.load(Ordering::Acquire) > RING_BYTES as u64 {
                if self.closed.load(Ordering::SeqCst) || Instant::now() > deadline {
                    return Err(TransportError::Io {
                        peer: to,
                        addr: link.addr,
                        what: "sending",
                        source: std::io::Error::other("the peer's ring stays full"),
                    });
                }
                std::thread::yield_now();
            }
            link.tx.copy_in(head, frame);
            c.head.store(head + len, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if c.sleeping.load(Ordering::SeqCst) != 0 {
                c.bell.fetch_add(1, Ordering::SeqCst);
                futex(&c.bell, libc::FUTEX_WAKE, 1, None);
            }
            self.traffic.sent(len);
            Ok(())
        })
    }

    fn traffic(&self) -> &Traffic {
        &self.traffic
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for link in self.links.iter().flatten() {
            let _ = link.tcp.shutdown(Shutdown::Both);
            let c = link.tx.control();
            c.bell.fetch_add(1, Ordering::SeqCst);
            futex(&c.bell, libc::FUTEX_WAKE, 1, None);
        }
    }
}
