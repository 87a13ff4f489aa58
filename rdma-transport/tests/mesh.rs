//! A real TCP mesh on loopback: nodes in threads of this process, real sockets.

use flotilla_transport::{
    auth, establish, wire, Handler, Kind, MeshConfig, Message, NodeId, NodeStats, Samples,
    TransportError,
};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Inbox(Mutex<Sender<(NodeId, Message)>>);

impl Handler for Inbox {
    fn deliver(&self, from: NodeId, msg: Message) {
        let _ = self.0.lock().unwrap().send((from, msg));
    }
    fn link_lost(&self, _peer: NodeId, _why: TransportError) {}
}

fn addrs(n: usize) -> Vec<SocketAddr> {
    let l: Vec<_> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    l.iter().map(|l| l.local_addr().unwrap()).collect()
}

fn config(me: NodeId, addrs: &[SocketAddr], connect_timeout: Duration) -> MeshConfig {
    MeshConfig {
        me,
        addrs: addrs.to_vec(),
        secret: b"a-secret-of-enough-bytes".to_vec(),
        digest: auth::digest(b"mesh test"),
        connect_timeout,
        idle_timeout: Duration::from_secs(3),
        link_delay: Duration::ZERO,
    }
}

/// A 2-node mesh of `kind`, both nodes with `delay`: node 0 delivers to `handler0`,
/// node 1 to an `Inbox` whose receiver is dropped. Returns (node 0, node 1).
fn pair(
    kind: Kind,
    delay: Duration,
    handler0: Arc<dyn Handler>,
) -> (
    Arc<dyn flotilla_transport::Transport>,
    Arc<dyn flotilla_transport::Transport>,
) {
    let addrs = addrs(2);
    let limit = Duration::from_secs(5);
    let a0 = addrs.clone();
    let node0 = std::thread::spawn(move || {
        let mut c = config(0, &a0, limit);
        c.link_delay = delay;
        establish(kind, &c, handler0)
    });
    let (tx1, _rx1) = channel();
    let mut c1 = config(1, &addrs, limit);
    c1.link_delay = delay;
    let t1 = establish(kind, &c1, Arc::new(Inbox(Mutex::new(tx1)))).expect("node 1 joins");
    let t0 = node0.join().unwrap().expect("node 0 forms the cluster");
    (t0, t1)
}

#[test]
fn silent_connections_do_not_hold_up_a_forming_cluster() {
    let addrs = addrs(2);
    // Node 0 listens; three strangers connect to it first and never say a word. Each
    // handshake gets its own thread and a 1 s deadline, so node 1 still gets in well
    // within the 4 s the cluster has to form (one at a time, at 5 s each, it did not).
    let limit = Duration::from_secs(4);
    let (tx0, rx0) = channel();
    let a0 = addrs.clone();
    let node0 = std::thread::spawn(move || {
        establish(
            Kind::Tcp,
            &config(0, &a0, limit),
            Arc::new(Inbox(Mutex::new(tx0))),
        )
    });
    let mut silent = Vec::new();
    for _ in 0..50 {
        if let Ok(s) = TcpStream::connect(addrs[0]) {
            silent.push(s);
            if silent.len() == 3 {
                break;
            }
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(silent.len(), 3, "node 0 never listened");
    let (tx1, _rx1) = channel();
    let t1 = establish(
        Kind::Tcp,
        &config(1, &addrs, limit),
        Arc::new(Inbox(Mutex::new(tx1))),
    )
    .expect("node 1 joins");
    let t0 = node0.join().unwrap().expect("node 0 forms the cluster");
    t1.send(0, &Message::Ping).unwrap();
    t1.send(0, &Message::Report { value: 42 }).unwrap();
    let (from, msg) = rx0.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(from, 1);
    assert!(matches!(msg, Message::Report { value: 42 }), "{msg:?}");
    drop(silent);
    t0.close();
    t1.close();
}

/// Records what arrives and when the link is lost, slowly, so that the receiver is still
/// busy with earlier frames when the peer goes.
struct SlowLog(Mutex<Sender<Option<u64>>>);

impl Handler for SlowLog {
    fn deliver(&self, _from: NodeId, msg: Message) {
        if let Message::Report { value } = msg {
            std::thread::sleep(Duration::from_millis(2));
            let _ = self.0.lock().unwrap().send(Some(value));
        }
    }
    fn link_lost(&self, _peer: NodeId, _why: TransportError) {
        let _ = self.0.lock().unwrap().send(None);
    }
}

#[test]
fn what_a_peer_sent_before_it_closed_arrives_before_its_loss() {
    // A failing node sends its error and closes at once. On shm the frames travel in the
    // ring and the close on the TCP connection beside it: the loss must still be reported
    // after the frames (before, node 0 could hear "closed the connection" first and
    // report that instead of the guest's error).
    for kind in [Kind::Shm, Kind::Tcp] {
        let (tx0, rx0) = channel();
        let (t0, t1) = pair(kind, Duration::ZERO, Arc::new(SlowLog(Mutex::new(tx0))));
        const SENT: u64 = 100;
        for value in 0..SENT {
            t1.send(0, &Message::Report { value }).unwrap();
        }
        t1.close();
        drop(t1);
        let mut got = Vec::new();
        loop {
            match rx0.recv_timeout(Duration::from_secs(10)) {
                Ok(Some(v)) => got.push(v),
                Ok(None) => break,
                Err(e) => panic!("{kind:?}: no loss reported after {} frames: {e}", got.len()),
            }
        }
        assert_eq!(got, (0..SENT).collect::<Vec<_>>(), "{kind:?}");
        assert!(
            rx0.recv_timeout(Duration::from_millis(300)).is_err(),
            "{kind:?}: something after the loss"
        );
        t0.close();
    }
}

#[test]
fn the_fullest_stats_crosses_both_transports() {
    // A busy node's end-of-run counters, every sample list full: larger than a frame
    // before, so shm dropped the link and node 0 reported "no counters" from that node.
    let mut samples = Samples::default();
    for list in samples.lists_mut() {
        *list = (0..wire::MAX_SAMPLES as u32).collect();
    }
    let stats = Message::Stats {
        stats: NodeStats {
            remote_faults: 7,
            ..Default::default()
        },
        samples,
    };
    for kind in [Kind::Shm, Kind::Tcp] {
        let (tx0, rx0) = channel();
        let (t0, t1) = pair(kind, Duration::ZERO, Arc::new(Inbox(Mutex::new(tx0))));
        t1.send(0, &stats).unwrap();
        let (from, got) = rx0
            .recv_timeout(Duration::from_secs(5))
            .expect("stats arrive");
        assert_eq!((from, &got), (1, &stats), "{kind:?}");
        t0.close();
        t1.close();
    }
}

#[test]
fn an_emulated_link_delay_holds_every_frame_back_in_order() {
    let delay = Duration::from_millis(20);
    for kind in [Kind::Shm, Kind::Tcp] {
        let (tx0, rx0) = channel();
        // Every node of a cluster has the same delay (the cluster file's), so frames
        // carry their send time.
        let (t0, t1) = pair(kind, delay, Arc::new(Inbox(Mutex::new(tx0))));
        let sent = std::time::Instant::now();
        for value in 0..10 {
            t1.send(0, &Message::Report { value }).unwrap();
        }
        for value in 0..10 {
            let (_, msg) = rx0.recv_timeout(Duration::from_secs(5)).expect("delivered");
            assert!(
                matches!(msg, Message::Report { value: v } if v == value),
                "{kind:?}: {msg:?}"
            );
        }
        let took = sent.elapsed();
        // Frames sent together arrive together, `delay` later: not one delay each.
        assert!(took >= delay, "{kind:?}: delivered after {took:?}");
        assert!(took < delay * 5, "{kind:?}: delays added up: {took:?}");
        t0.close();
        t1.close();
    }
    let mut c = config(0, &addrs(1), Duration::from_secs(1));
    c.link_delay = Duration::from_secs(2);
    let e = c.check().unwrap_err().to_string();
    assert!(e.contains("at most 1000000 µs"), "{e}");
}
