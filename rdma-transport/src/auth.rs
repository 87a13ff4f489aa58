//! The link handshake. Both ends send a hello (magic, version, node id, a fresh 16-byte
//! nonce, the cluster configuration digest), then each proves it knows the cluster secret
//! with an HMAC-SHA256 over both hellos and its role. The acceptor checks the connector's
//! proof before sending its own, so a peer without the secret learns nothing but the
//! acceptor's hello, and no frame is exchanged before both proofs check out.

use crate::{NodeId, TransportError};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::SocketAddr;

const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"FLTH");
const HELLO_VERSION: u8 = 1;
pub const HELLO_BYTES: usize = 4 + 1 + 2 + 16 + 32;
const PROOF_BYTES: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// One side's hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub node: NodeId,
    pub nonce: [u8; 16],
    pub digest: [u8; 32],
}

impl Hello {
    pub fn new(node: NodeId, digest: [u8; 32]) -> std::io::Result<Self> {
        let mut nonce = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut nonce)?;
        Ok(Hello {
            node,
            nonce,
            digest,
        })
    }

    pub fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut b = [0u8; HELLO_BYTES];
        b[0..4].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        b[4] = HELLO_VERSION;
        b[5..7].copy_from_slice(&self.node.to_le_bytes());
        b[7..23].copy_from_slice(&self.nonce);
        b[23..55].copy_from_slice(&self.digest);
        b
    }

    pub fn decode(b: &[u8; HELLO_BYTES]) -> Result<Self, String> {
        let magic = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if magic != HELLO_MAGIC {
            return Err(format!(
                "bad hello magic {magic:#010x} (not a Flotilla node?)"
            ));
        }
        if b[4] != HELLO_VERSION {
            return Err(format!(
                "handshake version {}, this node speaks {HELLO_VERSION}",
                b[4]
            ));
        }
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&b[7..23]);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&b[23..55]);
        Ok(Hello {
            node: u16::from_le_bytes([b[5], b[6]]),
            nonce,
            digest,
        })
    }
}

fn mac(secret: &[u8], role: &[u8], connector: &Hello, acceptor: &Hello) -> HmacSha256 {
    // HMAC takes keys of any length.
    let mut m = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC accepts any key length");
    m.update(b"flotilla-link-v1 ");
    m.update(role);
    m.update(&connector.encode());
    m.update(&acceptor.encode());
    m
}

/// SHA-256 of `bytes` (the cluster configuration digest).
pub fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn handshake_err(addr: SocketAddr, reason: impl Into<String>) -> TransportError {
    TransportError::Handshake {
        addr,
        reason: reason.into(),
    }
}

fn read_hello(s: &mut impl Read, addr: SocketAddr) -> Result<Hello, TransportError> {
    let mut b = [0u8; HELLO_BYTES];
    s.read_exact(&mut b).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => handshake_err(
            addr,
            "sent no hello in time (a silent or unauthenticated connection); closed",
        ),
        _ => handshake_err(addr, format!("reading hello: {e}")),
    })?;
    Hello::decode(&b).map_err(|r| handshake_err(addr, r))
}

fn read_proof(s: &mut impl Read, addr: SocketAddr) -> Result<[u8; PROOF_BYTES], TransportError> {
    let mut b = [0u8; PROOF_BYTES];
    // A peer that hangs up instead of proving itself failed authentication.
    s.read_exact(&mut b)
        .map_err(|_| TransportError::Auth { addr })?;
    Ok(b)
}

/// The connecting side: returns the acceptor's node id once both proofs check out.
pub fn connect<S: Read + Write>(
    s: &mut S,
    addr: SocketAddr,
    me: Hello,
    expect: NodeId,
    secret: &[u8],
) -> Result<NodeId, TransportError> {
    let io = |e: std::io::Error| handshake_err(addr, e.to_string());
    s.write_all(&me.encode()).map_err(io)?;
    let peer = read_hello(s, addr)?;
    if peer.node != expect {
        return Err(handshake_err(
            addr,
            format!("expected node {expect}, it says it is node {}", peer.node),
        ));
    }
    let proof = mac(secret, b"connector", &me, &peer)
        .finalize()
        .into_bytes();
    s.write_all(&proof).map_err(io)?;
    let theirs = read_proof(s, addr)?;
    mac(secret, b"acceptor", &me, &peer)
        .verify_slice(&theirs)
        .map_err(|_| TransportError::Auth { addr })?;
    if peer.digest != me.digest {
        return Err(TransportError::ConfigMismatch { peer: peer.node });
    }
    Ok(peer.node)
}

/// The accepting side: `valid` says which node ids may connect here.
pub fn accept<S: Read + Write>(
    s: &mut S,
    addr: SocketAddr,
    me: Hello,
    valid: impl Fn(NodeId) -> bool,
    secret: &[u8],
) -> Result<NodeId, TransportError> {
    let io = |e: std::io::Error| handshake_err(addr, e.to_string());
    let peer = read_hello(s, addr)?;
    if !valid(peer.node) {
        return Err(handshake_err(
            addr,
            format!("node id {} is not expected to connect here", peer.node),
        ));
    }
    s.write_all(&me.encode()).map_err(io)?;
    let theirs = read_proof(s, addr)?;
    mac(secret, b"connector", &peer, &me)
        .verify_slice(&theirs)
        .map_err(|_| TransportError::Auth { addr })?;
    let proof = mac(secret, b"acceptor", &peer, &me).finalize().into_bytes();
    s.write_all(&proof).map_err(io)?;
    if peer.digest != me.digest {
        return Err(TransportError::ConfigMismatch { peer: peer.node });
    }
    Ok(peer.node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair(
        secret_a: &'static [u8],
        secret_c: &'static [u8],
    ) -> (
        Result<NodeId, TransportError>,
        Result<NodeId, TransportError>,
    ) {
        let (mut a, mut c) = UnixStream::pair().unwrap();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let d = digest(b"cfg");
        let t = std::thread::spawn(move || {
            let r = accept(
                &mut a,
                addr,
                Hello::new(0, d).unwrap(),
                |n| n == 1,
                secret_a,
            );
            drop(a);
            r
        });
        let rc = connect(&mut c, addr, Hello::new(1, d).unwrap(), 0, secret_c);
        (t.join().unwrap(), rc)
    }

    #[test]
    fn same_secret_connects() {
        let (a, c) = pair(b"0123456789abcdef", b"0123456789abcdef");
        assert_eq!(a.unwrap(), 1);
        assert_eq!(c.unwrap(), 0);
    }

    #[test]
    fn wrong_secret_is_refused_on_both_sides() {
        let (a, c) = pair(b"0123456789abcdef", b"0123456789abcdeX");
        assert!(matches!(a, Err(TransportError::Auth { .. })), "{a:?}");
        assert!(matches!(c, Err(TransportError::Auth { .. })), "{c:?}");
    }

    #[test]
    fn garbage_hello_is_named() {
        let b = [7u8; HELLO_BYTES];
        assert!(Hello::decode(&b).unwrap_err().contains("magic"));
    }
}
