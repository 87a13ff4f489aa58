//! How Flotilla nodes talk. One [`Transport`] trait, several wires:
//!
//! - [`tcp`]: the default; works across machines.
//! - [`shm`]: nodes on one host; frames go through rings in a shared segment written
//!   one-sidedly by the sender (the shape an RDMA backend takes: registered memory,
//!   one-sided writes, a doorbell). Connection setup, authentication and liveness still
//!   use a TCP link, so both transports carry exactly the same protocol.
//!
//! Every frame is validated on receipt ([`wire`]); a bad frame closes that link with a
//! logged error and tells the [`Handler`], which ends the run naming the peer. Before any
//! frame flows, both ends of a link prove knowledge of the cluster secret ([`auth`]).
//!
//! [`directory`] is the home side of the page protocol these messages carry: a pure
//! state machine, shared by the engine and the trace-driven simulator so that both apply
//! the same coherence rules.

pub mod auth;
pub mod directory;
pub mod shm;
pub mod tcp;
pub mod wire;

pub use flotilla_coherence::{Access, NodeId, MAX_NODES};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
pub use wire::{Message, NodeStats, Samples, WireError};

/// Why a link or a whole mesh failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("node {peer} ({addr}): {what}: {source}")]
    Io {
        peer: NodeId,
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("peer at {addr}: handshake failed: {reason}")]
    Handshake { addr: SocketAddr, reason: String },
    #[error("peer at {addr} failed authentication (wrong cluster secret?)")]
    Auth { addr: SocketAddr },
    #[error("node {peer} runs a different cluster configuration (the guest, placement or node list differ)")]
    ConfigMismatch { peer: NodeId },
    #[error("no connection from node(s) {missing:?} within {timeout:?}")]
    Timeout {
        missing: Vec<NodeId>,
        timeout: Duration,
    },
    #[error("node {peer}: bad frame: {source}")]
    Wire { peer: NodeId, source: WireError },
    #[error("node {peer} closed the connection")]
    Closed { peer: NodeId },
    #[error("node {peer} sent nothing for {idle:?} (hung or unreachable)")]
    Silent { peer: NodeId, idle: Duration },
    #[error("no link to node {0}")]
    NoLink(NodeId),
    #[error("shared-memory segment {path}: {source}")]
    Shm {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

/// Receives what arrives on a transport. Called on the transport's receive threads: it
/// must not block for long (it may send).
pub trait Handler: Send + Sync + 'static {
    fn deliver(&self, from: NodeId, msg: Message);
    /// The link to `peer` is gone; nothing more will arrive from it.
    fn link_lost(&self, peer: NodeId, why: TransportError);
}

/// A set of authenticated links from this node to every other node of the cluster.
pub trait Transport: Send + Sync {
    /// `tcp` or `shm`.
    fn name(&self) -> &'static str;
    fn me(&self) -> NodeId;
    fn nodes(&self) -> u16;
    /// Sends one frame to `to` (not to this node itself). Frames to one peer arrive in
    /// the order they were sent.
    fn send(&self, to: NodeId, msg: &Message) -> Result<(), TransportError>;
    /// What this transport has sent and received.
    fn traffic(&self) -> &Traffic;
    /// Frame bytes sent so far, headers included.
    fn bytes_sent(&self) -> u64 {
        self.traffic().sent.load(Ordering::Relaxed)
    }
    /// Frame bytes received so far from peers, headers included (keep-alives excluded).
    fn bytes_received(&self) -> u64 {
        self.traffic().received.load(Ordering::Relaxed)
    }
    /// Closes every link; the handler hears of no further losses.
    fn close(&self);
}

/// Frame bytes a transport moved, counted where frames are written and delivered.
#[derive(Debug, Default)]
pub struct Traffic {
    pub(crate) sent: AtomicU64,
    pub(crate) received: AtomicU64,
}

impl Traffic {
    pub(crate) fn sent(&self, bytes: u64) {
        self.sent.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn received(&self, bytes: u64) {
        self.received.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The link to `to` in a transport's per-peer table.
pub(crate) fn link_to<L>(links: &[Option<L>], to: NodeId) -> Result<&L, TransportError> {
    links
        .get(to as usize)
        .and_then(Option::as_ref)
        .ok_or(TransportError::NoLink(to))
}

/// What a node needs to join its cluster.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub me: NodeId,
    /// Every node's listening address, by node id.
    pub addrs: Vec<SocketAddr>,
    pub secret: Vec<u8>,
    /// Digest of the cluster configuration every node must share.
    pub digest: [u8; 32],
    /// How long to wait for every peer to be connected.
    pub connect_timeout: Duration,
    /// A peer that sends nothing (not even a keep-alive) for this long is dead.
    pub idle_timeout: Duration,
    /// Emulated one-way link delay (`--link-delay-us`): every frame from a peer is
    /// delivered this long after the peer sent it (see `hold`). Zero: none.
    pub link_delay: Duration,
}

/// Longest emulated link delay accepted.
pub const MAX_LINK_DELAY: Duration = Duration::from_secs(1);

impl MeshConfig {
    pub fn check(&self) -> Result<(), TransportError> {
        let n = self.addrs.len();
        if n == 0 || n > MAX_NODES {
            return Err(TransportError::Config(format!(
                "a cluster has 1 to {MAX_NODES} nodes, not {n}"
            )));
        }
        if self.me as usize >= n {
            return Err(TransportError::Config(format!(
                "node id {} is not below the node count {n}",
                self.me
            )));
        }
        if self.link_delay > MAX_LINK_DELAY {
            return Err(TransportError::Config(format!(
                "a link delay of {} µs; at most {} µs can be emulated",
                self.link_delay.as_micros(),
                MAX_LINK_DELAY.as_micros()
            )));
        }
        if self.secret.len() < 16 {
            return Err(TransportError::Config(format!(
                "the cluster secret is {} bytes; at least 16 are needed",
                self.secret.len()
            )));
        }
        Ok(())
    }
}

/// Which wire to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Shm,
}

impl Kind {
    pub fn from_name(name: &str) -> Option<Kind> {
        match name {
            "tcp" => Some(Kind::Tcp),
            "shm" => Some(Kind::Shm),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Shm => "shm",
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The send stamp of a frame: CLOCK_MONOTONIC when a link delay is emulated, else 0 (no
/// clock read on the fault path).
pub(crate) fn sent_stamp(delay: Duration) -> u64 {
    if delay.is_zero() {
        0
    } else {
        monotonic_ns()
    }
}

/// Link-delay emulation (`--link-delay-us`; netem does not work on this host): a receiver
/// thread holds each frame until `delay` after the peer stamped it at sending, so a link
/// of any latency can be tried on one machine (an RDMA-class link ~3 µs, 10 GbE ~15 µs, a
/// slow one ~100 µs). Every node delays what it receives, so both directions are; frames
/// sent together arrive together (the delay does not add up along a queue), and senders
/// never block. The stamp is the sender's CLOCK_MONOTONIC, exact for nodes on one host;
/// a stamp from the future (another host's clock) waits at most `delay`, and a frame
/// with no stamp (its sender emulates no delay) is held `delay` from its arrival. The wait sleeps
/// while more than 200 µs remain (sleeps overshoot by tens of µs here) and spins for the
/// rest: accurate to a few µs, at the cost of the receiver's CPU while it spins. A
/// spinning receiver also skips this host's idle wake-up (tens of µs on PVM), so small
/// delays can measure *faster* than none: a 4 KiB round trip took 79 µs with no delay,
/// 49–51 µs with 3 or 15 µs, 205 µs with 100 µs (2 × 100 + about 5). The trace's
/// measured round trip (run metadata) is what a simulator should calibrate on.
pub(crate) fn hold(sent_ns: u64, delay: Duration) {
    if delay.is_zero() {
        return;
    }
    let now = monotonic_ns();
    let d = delay.as_nanos() as u64;
    // An unstamped frame (a peer that emulates no delay) is held from its arrival.
    let due = if sent_ns == 0 {
        now + d
    } else {
        (sent_ns + d).min(now + d)
    };
    loop {
        let left = due.saturating_sub(monotonic_ns());
        if left == 0 {
            return;
        }
        if left > 200_000 {
            std::thread::sleep(Duration::from_nanos(left - 150_000));
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Joins the cluster over the chosen wire.
pub fn establish(
    kind: Kind,
    config: &MeshConfig,
    handler: std::sync::Arc<dyn Handler>,
) -> Result<std::sync::Arc<dyn Transport>, TransportError> {
    Ok(match kind {
        Kind::Tcp => tcp::TcpTransport::establish(config, handler)?,
        Kind::Shm => shm::ShmTransport::establish(config, handler)?,
    })
}
