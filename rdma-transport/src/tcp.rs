//! The TCP transport: one connection per pair of nodes (the higher id connects to the
//! lower), authenticated by [`crate::auth`], `TCP_NODELAY`, one receive thread per link,
//! and keep-alives so a hung peer is noticed within the idle timeout. Senders write whole
//! frames under a per-link lock straight from the calling thread: on small machines a
//! hand-off to a writer thread costs more than the write itself.
//!
//! Why direct writes cannot deadlock: a receive thread may send (answering a request)
//! while its peer's receive thread does the same, so both could block if both socket
//! buffers filled up. Every node has at most one outstanding request per vCPU plus one
//! transaction per page it is home of, each answered by at most one page-sized frame, so
//! what is in flight on a link stays far below a socket buffer.

use crate::auth::{self, Hello};
use crate::wire::{self, Message, HEADER_BYTES};
use crate::{Handler, MeshConfig, NodeId, Traffic, Transport, TransportError};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY: Duration = Duration::from_millis(20);

struct Link {
    addr: SocketAddr,
    writer: Mutex<TcpStream>,
}

/// See the module documentation.
pub struct TcpTransport {
    me: NodeId,
    nodes: u16,
    links: Vec<Option<Link>>,
    traffic: Traffic,
    closed: AtomicBool,
    link_delay: Duration,
}

/// Listens on this node's address and connects to every peer; returns the authenticated
/// streams by peer id. Shared by the TCP and shared-memory transports.
pub(crate) fn connect_all(
    config: &MeshConfig,
) -> Result<Vec<Option<(SocketAddr, TcpStream)>>, TransportError> {
    config.check()?;
    let me = config.me;
    let n = config.addrs.len();
    let mut streams: Vec<Option<(SocketAddr, TcpStream)>> = (0..n).map(|_| None).collect();
    if n == 1 {
        return Ok(streams);
    }
    let my_addr = config.addrs[me as usize];
    let listener = TcpListener::bind(my_addr).map_err(|source| TransportError::Bind {
        addr: my_addr,
        source,
    })?;
    let deadline = Instant::now() + config.connect_timeout;
    let higher: Vec<NodeId> = ((me as usize + 1)..n).map(|i| i as NodeId).collect();
    let accept_config = config.clone();
    let acceptor = std::thread::Builder::new()
        .name(format!("accept{me}"))
        .spawn(move || accept_peers(listener, &accept_config, higher, deadline))
        .map_err(|source| TransportError::Io {
            peer: me,
            addr: my_addr,
            what: "starting the accept thread",
            source,
        })?;
    let mut failure = None;
    for peer in 0..me {
        match connect_peer(config, peer, deadline) {
            Ok(s) => streams[peer as usize] = Some((config.addrs[peer as usize], s)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let accepted = acceptor
        .join()
        .map_err(|_| TransportError::Config("the accept thread panicked".into()))?;
    if let Some(e) = failure {
        return Err(e);
    }
    for (peer, addr, s) in accepted? {
        streams[peer as usize] = Some((addr, s));
    }
    Ok(streams)
}

fn connect_peer(
    config: &MeshConfig,
    peer: NodeId,
    deadline: Instant,
) -> Result<TcpStream, TransportError> {
    let addr = config.addrs[peer as usize];
    loop {
        match TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT) {
            Ok(mut s) => {
                let io = |what, source| TransportError::Io {
                    peer,
                    addr,
                    what,
                    source,
                };
                s.set_nodelay(true).map_err(|e| io("TCP_NODELAY", e))?;
                s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
                    .map_err(|e| io("setting a timeout", e))?;
                let hello = Hello::new(config.me, config.digest)
                    .map_err(|e| io("reading /dev/urandom", e))?;
                auth::connect(&mut s, addr, hello, peer, &config.secret)?;
                return Ok(s);
            }
            Err(e) if Instant::now() < deadline => {
                tracing::trace!(peer, %addr, error = %e, "peer not up yet; retrying");
                std::thread::sleep(RETRY);
            }
            Err(_) => {
                return Err(TransportError::Timeout {
                    missing: vec![peer],
                    timeout: config.connect_timeout,
                })
            }
        }
    }
}

type Accepted = Vec<(NodeId, SocketAddr, TcpStream)>;

/// How long an incoming connection has to say hello and prove itself. A real peer does
/// so at once; a silent stranger is closed after this, on its own thread, so it never
/// holds up the peers that are still to come.
const ACCEPT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// Authenticates one incoming connection (on its own thread).
fn handshake_incoming(
    mut s: TcpStream,
    addr: SocketAddr,
    config: &MeshConfig,
    expected: &[NodeId],
) -> Result<(NodeId, TcpStream), TransportError> {
    let hello = s
        .set_nonblocking(false)
        .and_then(|()| s.set_nodelay(true))
        .and_then(|()| s.set_read_timeout(Some(ACCEPT_HANDSHAKE_TIMEOUT)))
        .and_then(|()| s.set_write_timeout(Some(ACCEPT_HANDSHAKE_TIMEOUT)))
        .and_then(|()| Hello::new(config.me, config.digest))
        .map_err(|e| TransportError::Handshake {
            addr,
            reason: format!("setting up the connection: {e}"),
        })?;
    let peer = auth::accept(
        &mut s,
        addr,
        hello,
        |p| expected.contains(&p),
        &config.secret,
    )?;
    Ok((peer, s))
}

fn accept_peers(
    listener: TcpListener,
    config: &MeshConfig,
    mut missing: Vec<NodeId>,
    deadline: Instant,
) -> Result<Accepted, TransportError> {
    let mut got: Accepted = Vec::new();
    let local = config.addrs[config.me as usize];
    listener
        .set_nonblocking(true)
        .map_err(|source| TransportError::Bind {
            addr: local,
            source,
        })?;
    let (done_tx, done) =
        std::sync::mpsc::channel::<(SocketAddr, Result<(NodeId, TcpStream), TransportError>)>();
    while !missing.is_empty() {
        if Instant::now() >= deadline {
            return Err(TransportError::Timeout {
                missing,
                timeout: config.connect_timeout,
            });
        }
        // Handshakes that finished.
        while let Ok((addr, result)) = done.try_recv() {
            match result {
                Ok((peer, s)) if missing.contains(&peer) => {
                    missing.retain(|&m| m != peer);
                    got.push((peer, addr, s));
                }
                Ok((peer, s)) => {
                    tracing::error!(node = config.me, %addr, peer, "refused a second connection claiming the same node");
                    let _ = s.shutdown(Shutdown::Both);
                }
                Err(e @ TransportError::ConfigMismatch { .. }) => return Err(e),
                // A stranger, a silent connection or a peer with the wrong secret gets
                // nothing; keep waiting for the real one.
                Err(e) => {
                    tracing::error!(node = config.me, %addr, error = %e, "refused a connection")
                }
            }
        }
        match listener.accept() {
            Ok((s, addr)) => {
                let (config, expected, tx) = (config.clone(), missing.clone(), done_tx.clone());
                let started = std::thread::Builder::new()
                    .name(format!("hello{}", config.me))
                    .spawn(move || {
                        let _ = tx.send((addr, handshake_incoming(s, addr, &config, &expected)));
                    });
                if let Err(e) = started {
                    tracing::warn!(%addr, error = %e, "cannot start a handshake thread");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(RETRY),
            Err(e) => tracing::warn!(error = %e, "accept failed"),
        }
    }
    Ok(got)
}

impl TcpTransport {
    /// Joins the cluster described by `config`: every link is up and authenticated when
    /// this returns, and frames start flowing to `handler`.
    pub fn establish(
        config: &MeshConfig,
        handler: Arc<dyn Handler>,
    ) -> Result<Arc<Self>, TransportError> {
        let streams = connect_all(config)?;
        let mut links = Vec::new();
        let mut readers = Vec::new();
        for (peer, s) in streams.into_iter().enumerate() {
            let Some((addr, stream)) = s else {
                links.push(None);
                continue;
            };
            let peer = peer as NodeId;
            let io = |what, source| TransportError::Io {
                peer,
                addr,
                what,
                source,
            };
            stream
                .set_read_timeout(Some(config.idle_timeout))
                .map_err(|e| io("setting the idle timeout", e))?;
            let reader = stream
                .try_clone()
                .map_err(|e| io("cloning the socket", e))?;
            readers.push((peer, addr, reader));
            links.push(Some(Link {
                addr,
                writer: Mutex::new(stream),
            }));
        }
        let transport = Arc::new(TcpTransport {
            me: config.me,
            nodes: config.addrs.len() as u16,
            links,
            traffic: Traffic::default(),
            closed: AtomicBool::new(false),
            link_delay: config.link_delay,
        });
        for (peer, addr, stream) in readers {
            let t = Arc::clone(&transport);
            let h = Arc::clone(&handler);
            let idle = config.idle_timeout;
            std::thread::Builder::new()
                .name(format!("rx{}<{peer}", config.me))
                .spawn(move || t.receive(peer, addr, stream, idle, &*h))
                .map_err(|source| TransportError::Io {
                    peer,
                    addr,
                    what: "starting a receive thread",
                    source,
                })?;
        }
        if config.addrs.len() > 1 {
            let t = Arc::clone(&transport);
            let period = config.idle_timeout / 4;
            std::thread::Builder::new()
                .name(format!("keepalive{}", config.me))
                .spawn(move || t.keep_alive(period))
                .map_err(|source| TransportError::Io {
                    peer: config.me,
                    addr: config.addrs[config.me as usize],
                    what: "starting the keep-alive thread",
                    source,
                })?;
        }
        Ok(transport)
    }

    fn receive(
        &self,
        peer: NodeId,
        addr: SocketAddr,
        mut stream: TcpStream,
        idle: Duration,
        handler: &dyn Handler,
    ) {
        let mut header = [0u8; HEADER_BYTES];
        let mut body = Vec::new();
        let result = loop {
            match read_frame(&mut stream, &mut header, &mut body, peer, addr, idle) {
                Ok((Message::Ping, _)) => {}
                Ok((msg, sent_ns)) => {
                    self.traffic.received((HEADER_BYTES + body.len()) as u64);
                    crate::hold(sent_ns, self.link_delay);
                    handler.deliver(peer, msg)
                }
                Err(e) => break e,
            }
        };
        if !self.closed.load(Ordering::SeqCst) {
            tracing::debug!(node = self.me, peer, error = %result, "link lost");
            let _ = stream.shutdown(Shutdown::Both);
            handler.link_lost(peer, result);
        }
    }

    fn keep_alive(&self, period: Duration) {
        while !self.closed.load(Ordering::SeqCst) {
            std::thread::sleep(period);
            for peer in 0..self.nodes {
                if self.links[peer as usize].is_some() {
                    let _ = self.send(peer, &Message::Ping);
                }
            }
        }
    }
}

/// Reads and validates one frame; returns it with its send stamp.
pub(crate) fn read_frame(
    stream: &mut impl Read,
    header: &mut [u8; HEADER_BYTES],
    body: &mut Vec<u8>,
    peer: NodeId,
    addr: SocketAddr,
    idle: Duration,
) -> Result<(Message, u64), TransportError> {
    let io = |e: std::io::Error| match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
            TransportError::Closed { peer }
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => TransportError::Silent { peer, idle },
        _ => TransportError::Io {
            peer,
            addr,
            what: "receiving",
            source: e,
        },
    };
    stream.read_exact(header).map_err(io)?;
    let h = wire::decode_header(header).map_err(|source| TransportError::Wire { peer, source })?;
    body.resize(h.len, 0);
    stream.read_exact(body).map_err(io)?;
    let msg = wire::decode_body(h, body).map_err(|source| TransportError::Wire { peer, source })?;
    Ok((msg, h.sent_ns))
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp"
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
            let mut w = link.writer.lock().unwrap_or_else(|p| p.into_inner());
            w.write_all(frame).map_err(|source| TransportError::Io {
                peer: to,
                addr: link.addr,
                what: "sending",
                source,
            })?;
            self.traffic.sent(frame.len() as u64);
            Ok(())
        })
    }

    fn traffic(&self) -> &Traffic {
        &self.traffic
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for link in self.links.iter().flatten() {
            let w = link.writer.lock().unwrap_or_else(|p| p.into_inner());
            let _ = w.shutdown(Shutdown::Both);
        }
    }
}
