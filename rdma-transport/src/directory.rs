//! The home directory: for every page this node is home of, who owns it and who holds
//! read-only copies, and the one transaction in progress on it (docs/protocol.md).
//!
//! A pure state machine: it takes requests, acknowledgements and completions and returns
//! the messages to send (possibly to this node itself), so it can be tested exhaustively
//! without a network. One transaction per page at a time, from the request until the
//! requester's `Done`; later requests wait in a FIFO queue. That serialization is what
//! rules out two writable copies and lost pages, and the queue is what rules out
//! starvation and deadlock (see the protocol document for the argument).

use crate::{Access, Message, NodeId};
use std::collections::{HashMap, VecDeque};

/// A message the directory wants sent.
pub type Outgoing = (NodeId, Message);

/// Most pages one claim of fresh memory asks for (the wire allows
/// [`CLAIM_MAX_PAGES`](crate::wire::CLAIM_MAX_PAGES)): the engine's rule, which the
/// simulator follows too.
pub const CLAIM_EXTENT: u8 = 16;
const _: () = assert!(CLAIM_EXTENT <= crate::wire::CLAIM_MAX_PAGES);
/// Faults that ask for one page after a claim that got nothing (the engine's rule, which
/// the simulator follows).
pub const CLAIM_BACKOFF: u32 = 64;

/// A node's first touch of a page it holds maps the pages after it that it holds the
/// same way and has never mapped either, up to this many in all (a guest touching fresh
/// memory goes on to the next page). The engine's rule, which the simulator follows:
/// a mapped page is no longer fresh, so no claim can take it.
pub const FIRST_TOUCH_RUN: u64 = 16;

/// A peer broke the protocol (or a bug did): the run must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("node {from}: {what} for page {page:#x}, which is not homed at node {home}")]
    NotHome {
        from: NodeId,
        what: &'static str,
        page: u64,
        home: NodeId,
    },
    #[error("node {from}: unexpected {what} for page {page:#x} (no matching transaction)")]
    Unexpected {
        from: NodeId,
        what: &'static str,
        page: u64,
    },
    #[error("node {from} is not a node of this {nodes}-node cluster")]
    BadNode { from: NodeId, nodes: u16 },
    #[error("page {page:#x}: cannot restore a busy page, or a copyset without its owner or beyond the cluster")]
    BadRestore { page: u64 },
}

#[derive(Debug)]
struct Transaction {
    requester: NodeId,
    /// Invalidation acknowledgements still missing.
    acks: u32,
    /// Sent once every acknowledgement is in.
    then: Option<Outgoing>,
    queue: VecDeque<(NodeId, Access)>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct PageDirectory {
    me: NodeId,
    nodes: u16,
    /// Pages `first..first + owner.len()` are covered; only those homed here are used.
    first: u64,
    owner: Vec<NodeId>,
    /// Bit n set: node n holds a copy (the owner's included).
    copyset: Vec<u64>,
    homed: Vec<bool>,
    busy: HashMap<u64, Transaction>,
}

impl PageDirectory {
    /// A directory over pages `first..first + count`; `initial(page)` says, for each page
    /// homed here, its owner and copyset at boot (`None` for pages homed elsewhere).
    pub fn new(
        me: NodeId,
        nodes: u16,
        first: u64,
        count: u64,
        initial: impl Fn(u64) -> Option<(NodeId, u64)>,
    ) -> Self {
        let n = count as usize;
        let mut d = PageDirectory {
            me,
            nodes,
            first,
            owner: vec![0; n],
            copyset: vec![0; n],
            homed: vec![false; n],
            busy: HashMap::new(),
        };
        for i in 0..n {
            if let Some((owner, copyset)) = initial(first + i as u64) {
                d.owner[i] = owner;
                d.copyset[i] = copyset;
                d.homed[i] = true;
            }
        }
        d
    }

    fn index(&self, page: u64, from: NodeId, what: &'static str) -> Result<usize, ProtocolError> {
        if from >= self.nodes {
            return Err(ProtocolError::BadNode {
                from,
                nodes: self.nodes,
            });
        }
        page.checked_sub(self.first)
            .map(|i| i as usize)
            .filter(|&i| i < self.homed.len() && self.homed[i])
            .ok_or(ProtocolError::NotHome {
                from,
                what,
                page,
                home: self.me,
            })
    }

    /// Current owner and copyset of a page homed here (for tests and diagnostics).
    pub fn entry(&self, page: u64) -> Option<(NodeId, u64)> {
        let i = self.index(page, self.me, "lookup").ok()?;
        Some((self.owner[i], self.copyset[i]))
    }

    /// Puts a page homed here back to an owner and copyset read earlier with
    /// [`entry`](Self::entry) (the simulator undoing a look-ahead). Refused while a
    /// transaction is open on the page, or for a copyset without its owner or naming a
    /// node outside the cluster.
    pub fn set_entry(
        &mut self,
        page: u64,
        owner: NodeId,
        copyset: u64,
    ) -> Result<(), ProtocolError> {
        let i = self.index(page, owner, "restore")?;
        let all = if self.nodes >= 64 {
            u64::MAX
        } else {
            (1u64 << self.nodes) - 1
        };
        if self.busy.contains_key(&page) || copyset & (1u64 << owner) == 0 || copyset & !all != 0 {
            return Err(ProtocolError::BadRestore { page });
        }
        self.owner[i] = owner;
        self.copyset[i] = copyset;
        Ok(())
    }

    /// Hands `page` to `to`, if no transaction is open or queued on it and this node
    /// alone holds it; returns whether it did. For a claim of fresh memory: the caller
    /// has checked, under the page's lock, that its copy was never used, and sends no
    /// data (the page is zeros). It is a transaction like any other: `to`'s `Done` ends
    /// it, so a request for the page that comes meanwhile waits until `to` has the page.
    pub fn claim(&mut self, page: u64, to: NodeId) -> Result<bool, ProtocolError> {
        let i = self.index(page, to, "Claim")?;
        let mine = 1u64 << self.me;
        if self.busy.contains_key(&page) || self.owner[i] != self.me || self.copyset[i] != mine {
            return Ok(false);
        }
        self.owner[i] = to;
        self.copyset[i] = 1u64 << to;
        self.busy.insert(
            page,
            Transaction {
                requester: to,
                acks: 0,
                then: None,
                queue: VecDeque::new(),
            },
        );
        Ok(true)
    }

    /// `from` asks for `page`.
    pub fn request(
        &mut self,
        page: u64,
        from: NodeId,
        want: Access,
    ) -> Result<Vec<Outgoing>, ProtocolError> {
        let i = self.index(page, from, "PageRequest")?;
        let want = want.permission();
        if let Some(t) = self.busy.get_mut(&page) {
            t.queue.push_back((from, want));
            return Ok(Vec::new());
        }
        Ok(self.start(i, page, from, want, VecDeque::new()))
    }

    fn start(
        &mut self,
        i: usize,
        page: u64,
        requester: NodeId,
        want: Access,
        queue: VecDeque<(NodeId, Access)>,
    ) -> Vec<Outgoing> {
        let bit = |n: NodeId| 1u64 << n;
        let owner = self.owner[i];
        let copyset = self.copyset[i];
        let has_copy = copyset & bit(requester) != 0;
        let mut out = Vec::new();
        let mut acks = 0;
        match want {
            Access::Read | Access::Execute => self.copyset[i] |= bit(requester),
            Access::Write => {
                // Everyone but the requester drops their copy; the owner's copy is
                // dropped by the Fetch that moves it, unless the requester already has
                // the contents.
                let mut drop = copyset & !bit(requester);
                if !has_copy {
                    drop &= !bit(owner);
                }
                for node in (0..self.nodes).filter(|&n| drop & bit(n) != 0) {
                    out.push((
                        node,
                        Message::Invalidate {
                            page,
                            owner: requester,
                        },
                    ));
                    acks += 1;
                }
                self.owner[i] = requester;
                self.copyset[i] = bit(requester);
            }
        }
        // A requester that holds the current contents only needs the go-ahead.
        let copies = copyset.count_ones() as u8;
        let then = if has_copy {
            (requester, Message::Grant { page, copies })
        } else {
            (
                owner,
                Message::Fetch {
                    page,
                    want,
                    requester,
                    copies,
                },
            )
        };
        let then = if acks == 0 {
            out.push(then);
            None
        } else {
            Some(then)
        };
        self.busy.insert(
            page,
            Transaction {
                requester,
                acks,
                then,
                queue,
            },
        );
        out
    }

    /// A replica holder dropped its copy.
    pub fn invalidate_ack(
        &mut self,
        page: u64,
        from: NodeId,
    ) -> Result<Vec<Outgoing>, ProtocolError> {
        self.index(page, from, "InvalidateAck")?;
        let unexpected = ProtocolError::Unexpected {
            from,
            what: "InvalidateAck",
            page,
        };
        let t = self.busy.get_mut(&page).ok_or(unexpected.clone())?;
        if t.acks == 0 {
            return Err(unexpected);
        }
        t.acks -= 1;
        Ok(if t.acks == 0 {
            t.then.take().into_iter().collect()
        } else {
            Vec::new()
        })
    }

    /// The requester installed and used the page: the next request may go.
    pub fn done(&mut self, page: u64, from: NodeId) -> Result<Vec<Outgoing>, ProtocolError> {
        let i = self.index(page, from, "Done")?;
        match self.busy.get(&page) {
            Some(t) if t.requester == from && t.acks == 0 && t.then.is_none() => {}
            _ => {
                return Err(ProtocolError::Unexpected {
                    from,
                    what: "Done",
                    page,
                })
            }
        }
        let mut t = self.busy.remove(&page).expect("checked above");
        Ok(match t.queue.pop_front() {
            Some((next, want)) => self.start(i, page, next, want, t.queue),
            None => Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    //! The protocol run against a model of the node caches (the same rules as
    //! `node.rs`), with every message delivered in a random order that still keeps each
    //! link FIFO. After every step: at most one writable copy, no read-only copy beside
    //! it, every copy holds the last value written, and no page is ever lost. At the
    //! end every request completes: no deadlock, whatever the interleaving.
    use super::*;
    use crate::wire::PAGE_BYTES;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum St {
        Invalid,
        Shared,
        Owned,
    }

    struct Cache {
        state: Vec<St>,
        value: Vec<u64>,
        pending: Vec<Option<Access>>,
        arrived: Vec<bool>,
    }

    struct World {
        n: u16,
        pages: u64,
        dirs: Vec<PageDirectory>,
        caches: Vec<Cache>,
        links: HashMap<(NodeId, NodeId), VecDeque<Message>>,
        last: Vec<u64>,
        writes: u64,
    }

    /// Pages homed in pairs, so a claim can cover more than one page.
    fn home(page: u64, n: u16) -> NodeId {
        ((page / 2) % n as u64) as NodeId
    }

    fn data(v: u64) -> Box<[u8; PAGE_BYTES]> {
        let mut d = Box::new([0u8; PAGE_BYTES]);
        d[..8].copy_from_slice(&v.to_le_bytes());
        d
    }

    impl World {
        fn new(n: u16, pages: u64) -> Self {
            let dirs = (0..n)
                .map(|me| {
                    PageDirectory::new(me, n, 0, pages, |p| {
                        (home(p, n) == me).then_some((me, 1u64 << me))
                    })
                })
                .collect();
            let caches = (0..n)
                .map(|me| Cache {
                    state: (0..pages)
                        .map(|p| {
                            if home(p, n) == me {
                                St::Owned
                            } else {
                                St::Invalid
                            }
                        })
                        .collect(),
                    value: vec![0; pages as usize],
                    pending: vec![None; pages as usize],
                    arrived: vec![false; pages as usize],
                })
                .collect();
            World {
                n,
                pages,
                dirs,
                caches,
                links: HashMap::new(),
                last: vec![0; pages as usize],
                writes: 0,
            }
        }

        fn send(&mut self, from: NodeId, out: Vec<Outgoing>) {
            for (to, msg) in out {
                self.links.entry((from, to)).or_default().push_back(msg);
            }
        }

        fn deliver(&mut self, from: NodeId, to: NodeId, msg: Message) -> Result<(), String> {
            let x = to as usize;
            match msg {
                Message::PageRequest { page, want, .. } => {
                    let out = self.dirs[x]
                        .request(page, from, want)
                        .map_err(|e| e.to_string())?;
                    self.send(to, out);
                }
                Message::InvalidateAck { page } => {
                    let out = self.dirs[x]
                        .invalidate_ack(page, from)
                        .map_err(|e| e.to_string())?;
                    self.send(to, out);
                }
                Message::Done { page } => {
                    let out = self.dirs[x].done(page, from).map_err(|e| e.to_string())?;
                    self.send(to, out);
                }
                Message::Fetch {
                    page,
                    want,
                    requester,
                    copies,
                } => {
                    let c = &mut self.caches[x];
                    let p = page as usize;
                    if c.state[p] == St::Invalid {
                        return Err(format!("node {to} asked to send page {page} it lacks"));
                    }
                    let v = c.value[p];
                    c.state[p] = if want == Access::Read {
                        St::Shared
                    } else {
                        St::Invalid
                    };
                    self.send(
                        to,
                        vec![(
                            requester,
                            Message::PageData {
                                page,
                                want,
                                data: data(v),
                                copies,
                            },
                        )],
                    );
                }
                Message::Invalidate { page, .. } => {
                    self.caches[x].state[page as usize] = St::Invalid;
                    self.send(
                        to,
                        vec![(home(page, self.n), Message::InvalidateAck { page })],
                    );
                }
                Message::PageData {
                    page, want, data, ..
                } => {
                    let c = &mut self.caches[x];
                    let p = page as usize;
                    if c.state[p] != St::Invalid || c.pending[p].is_none() {
                        return Err(format!("page {page} arrived at node {to} unexpectedly"));
                    }
                    c.state[p] = if want == Access::Read {
                        St::Shared
                    } else {
                        St::Owned
                    };
                    c.value[p] = u64::from_le_bytes(data[..8].try_into().unwrap());
                    c.arrived[p] = true;
                }
                Message::Grant { page, .. } => {
                    let c = &mut self.caches[x];
                    let p = page as usize;
                    let Some(want) = c.pending[p] else {
                        return Err(format!("unrequested grant of page {page} at node {to}"));
                    };
                    if c.state[p] == St::Invalid {
                        return Err(format!("grant of page {page} at node {to}, which lacks it"));
                    }
                    if want == Access::Write {
                        c.state[p] = St::Owned;
                    }
                    c.arrived[p] = true;
                }
                Message::Claim { page, count, want } => {
                    // The home: as `serve_claim` does.
                    let mut mask = 0u64;
                    for i in 0..count as u64 {
                        let q = page + i;
                        if q >= self.pages || home(q, self.n) != to {
                            break;
                        }
                        let fresh = self.caches[x].state[q as usize] == St::Owned
                            && self.caches[x].value[q as usize] == 0;
                        if fresh && self.dirs[x].claim(q, from).map_err(|e| e.to_string())? {
                            self.caches[x].state[q as usize] = St::Invalid;
                            mask |= 1 << i;
                        }
                    }
                    self.send(to, vec![(from, Message::Claimed { page, count, mask })]);
                    if mask & 1 == 0 {
                        let out = self.dirs[x]
                            .request(page, from, want)
                            .map_err(|e| e.to_string())?;
                        self.send(to, out);
                    }
                }
                Message::Claimed { page, count, mask } => {
                    // The requester: as `take_claimed` does.
                    let c = &mut self.caches[x];
                    for i in 0..count as u64 {
                        let q = (page + i) as usize;
                        if mask & (1 << i) != 0 {
                            if c.state[q] != St::Invalid || c.pending[q].is_none() {
                                return Err(format!("claimed page {q} at node {to} unexpectedly"));
                            }
                            c.state[q] = St::Owned;
                            c.value[q] = 0;
                            c.pending[q] = None;
                        } else if i > 0 {
                            c.pending[q] = None;
                        }
                    }
                    if mask != 0 {
                        self.send(to, vec![(from, Message::ClaimDone { page, count, mask })]);
                    }
                }
                Message::ClaimDone { page, count, mask } => {
                    for i in (0..count as u64).filter(|i| mask & (1 << i) != 0) {
                        let out = self.dirs[x]
                            .done(page + i, from)
                            .map_err(|e| e.to_string())?;
                        self.send(to, out);
                    }
                }
                other => return Err(format!("unexpected {}", other.name())),
            }
            Ok(())
        }

        /// Node `x` claims page `p` and the pages after it with the same home (fresh
        /// memory, as `claim_extent` asks for it).
        fn claim(&mut self, x: NodeId, p: u64) {
            let h = home(p, self.n);
            let c = &mut self.caches[x as usize];
            if h == x || c.pending[p as usize].is_some() || c.state[p as usize] != St::Invalid {
                return;
            }
            let mut count = 0u8;
            while p + (count as u64) < self.pages
                && home(p + count as u64, self.n) == h
                && c.pending[(p + count as u64) as usize].is_none()
                && c.state[(p + count as u64) as usize] == St::Invalid
            {
                c.pending[(p + count as u64) as usize] = Some(Access::Write);
                count += 1;
            }
            self.send(
                x,
                vec![(
                    h,
                    Message::Claim {
                        page: p,
                        count,
                        want: Access::Write,
                    },
                )],
            );
        }

        fn allows(s: St, w: Access) -> bool {
            matches!((s, w), (St::Owned, _) | (St::Shared, Access::Read))
        }

        /// Node `x` wants page `p`: start a request, or use a page that arrived.
        fn want(&mut self, x: NodeId, p: u64, w: Access) -> Result<(), String> {
            let c = &mut self.caches[x as usize];
            let i = p as usize;
            if c.arrived[i] {
                // Use the page we asked for, then tell the home.
                let w = c.pending[i].take().unwrap();
                c.arrived[i] = false;
                if !Self::allows(c.state[i], w) {
                    return Err(format!("node {x}: page {p} arrived unusable for {w:?}"));
                }
                if w == Access::Write {
                    self.writes += 1;
                    c.value[i] = self.writes;
                    self.last[i] = self.writes;
                } else if c.value[i] != self.last[i] {
                    return Err(format!("node {x} read a stale page {p}"));
                }
                self.send(x, vec![(home(p, self.n), Message::Done { page: p })]);
            } else if c.pending[i].is_none() && !Self::allows(c.state[i], w) {
                c.pending[i] = Some(w);
                self.send(
                    x,
                    vec![(
                        home(p, self.n),
                        Message::PageRequest {
                            page: p,
                            want: w,
                            requester: x,
                        },
                    )],
                );
            }
            Ok(())
        }

        fn check(&self) -> Result<(), String> {
            for p in 0..self.pages as usize {
                let owned = self
                    .caches
                    .iter()
                    .filter(|c| c.state[p] == St::Owned)
                    .count();
                let shared = self
                    .caches
                    .iter()
                    .filter(|c| c.state[p] == St::Shared)
                    .count();
                if owned > 1 || (owned == 1 && shared > 0) {
                    return Err(format!(
                        "page {p}: {owned} writable and {shared} read-only copies"
                    ));
                }
                for (x, c) in self.caches.iter().enumerate() {
                    if c.state[p] != St::Invalid && c.value[p] != self.last[p] {
                        return Err(format!("node {x} holds a stale copy of page {p}"));
                    }
                }
                let in_flight = self.links.values().flatten().any(|m| match m {
                    Message::PageData { page, .. } => *page as usize == p,
                    Message::Claimed { page, count, mask } => {
                        let q = p as u64;
                        q >= *page && q < page + *count as u64 && mask & (1 << (q - page)) != 0
                    }
                    _ => false,
                });
                if owned + shared == 0 && !in_flight {
                    return Err(format!("page {p} is lost"));
                }
            }
            Ok(())
        }

        fn deliver_one(&mut self, pick: usize) -> Result<bool, String> {
            let mut keys: Vec<_> = self
                .links
                .iter()
                .filter(|(_, q)| !q.is_empty())
                .map(|(k, _)| *k)
                .collect();
            if keys.is_empty() {
                return Ok(false);
            }
            keys.sort_unstable();
            let (from, to) = keys[pick % keys.len()];
            let msg = self
                .links
                .get_mut(&(from, to))
                .unwrap()
                .pop_front()
                .unwrap();
            self.deliver(from, to, msg)?;
            Ok(true)
        }
    }

    fn run(n: u16, pages: u64, steps: &[(u8, u8, u8, bool)]) -> Result<(), String> {
        let mut w = World::new(n, pages);
        for &(kind, a, b, write) in steps {
            if kind % 3 == 0 {
                let want = if write { Access::Write } else { Access::Read };
                w.want(a as NodeId % n, b as u64 % pages, want)?;
            } else if kind % 11 == 1 {
                w.claim(a as NodeId % n, b as u64 % pages);
            } else {
                w.deliver_one(a as usize * 7 + b as usize)?;
            }
            w.check()?;
        }
        // Drain: deliver everything and use every page that arrived, until quiet.
        for round in 0.. {
            if round > 100_000 {
                return Err("no progress: requests never complete (deadlock)".into());
            }
            if w.deliver_one(round)? {
                w.check()?;
                continue;
            }
            let mut used = false;
            for x in 0..n {
                for p in 0..pages {
                    if w.caches[x as usize].arrived[p as usize] {
                        w.want(x, p, Access::Read)?;
                        used = true;
                    }
                }
            }
            if !used {
                break;
            }
        }
        let stuck = w
            .caches
            .iter()
            .flat_map(|c| &c.pending)
            .filter(|p| p.is_some())
            .count();
        if stuck > 0 {
            return Err(format!("{stuck} requests never completed"));
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn coherence_holds_under_any_interleaving(
            n in 1u16..=4,
            pages in 1u64..=6,
            steps in proptest::collection::vec((any::<u8>(), any::<u8>(), any::<u8>(), any::<bool>()), 0..300),
        ) {
            prop_assert_eq!(run(n, pages, &steps), Ok(()));
        }
    }

    #[test]
    fn everyone_writes_the_same_page_at_once() {
        // Four nodes ask for write ownership of page 0 together, then all messages flow.
        let mut w = World::new(4, 1);
        for x in 1..4 {
            w.want(x, 0, Access::Write).unwrap();
        }
        for round in 0..10_000 {
            if !w.deliver_one(round).unwrap() {
                let mut any = false;
                for x in 0..4 {
                    if w.caches[x as usize].arrived[0] {
                        w.want(x, 0, Access::Write).unwrap();
                        any = true;
                    }
                }
                if !any {
                    break;
                }
            }
            w.check().unwrap();
        }
        assert_eq!(w.writes, 3);
        assert!(w.caches.iter().all(|c| c.pending[0].is_none()));
    }

    #[test]
    fn misbehaving_peers_are_named() {
        let mut d = PageDirectory::new(0, 2, 0, 4, |p| (p % 2 == 0).then_some((0, 1)));
        assert!(matches!(
            d.request(1, 1, Access::Read),
            Err(ProtocolError::NotHome { .. })
        ));
        assert!(matches!(
            d.done(0, 1),
            Err(ProtocolError::Unexpected { .. })
        ));
        assert!(matches!(
            d.invalidate_ack(0, 1),
            Err(ProtocolError::Unexpected { .. })
        ));
        assert!(matches!(
            d.request(0, 9, Access::Read),
            Err(ProtocolError::BadNode { .. })
        ));
        let out = d.request(0, 1, Access::Write).unwrap();
        assert_eq!(out.len(), 1);
        assert!(matches!(
            d.done(0, 0),
            Err(ProtocolError::Unexpected { .. })
        ));
        d.done(0, 1).unwrap();
        assert_eq!(d.entry(0), Some((1, 0b10)));
    }

    #[test]
    fn an_entry_read_can_be_put_back_but_not_during_a_transaction() {
        let mut d = PageDirectory::new(0, 2, 0, 2, |_| Some((0, 0b01)));
        let before = d.entry(0).unwrap();
        d.request(0, 1, Access::Write).unwrap();
        assert_eq!(
            d.set_entry(0, before.0, before.1),
            Err(ProtocolError::BadRestore { page: 0 }),
            "the write is in flight"
        );
        d.done(0, 1).unwrap();
        assert_eq!(d.entry(0), Some((1, 0b10)));
        d.set_entry(0, before.0, before.1).unwrap();
        assert_eq!(d.entry(0), Some(before));
        assert!(d.set_entry(1, 0, 0b10).is_err(), "owner not in its copyset");
        assert!(
            d.set_entry(1, 0, 0b101).is_err(),
            "node 2 of a 2-node cluster"
        );
    }

    #[test]
    fn only_a_page_the_home_alone_holds_and_nobody_asks_for_can_be_claimed() {
        // Pages 0..4 homed at node 0 of 3, owned by it; page 3 also copied to node 2.
        let mut d = PageDirectory::new(0, 3, 0, 4, |p| {
            Some((0, if p == 3 { 0b101 } else { 0b001 }))
        });
        assert_eq!(d.claim(0, 1), Ok(true));
        assert_eq!(d.entry(0), Some((1, 0b010)));
        assert_eq!(d.claim(0, 2), Ok(false), "node 1 owns it now");
        // Until node 1 says it installed the page, a request for it waits; then it is
        // served from node 1 like any other.
        assert_eq!(d.request(0, 2, Access::Read), Ok(Vec::new()));
        let out = d.done(0, 1).unwrap();
        assert!(
            matches!(
                out[..],
                [(
                    1,
                    Message::Fetch {
                        page: 0,
                        requester: 2,
                        ..
                    }
                )]
            ),
            "{out:?}"
        );
        d.done(0, 2).unwrap();
        // A transaction in progress (node 2 asked for page 1): no claim until it is done.
        assert_eq!(d.request(1, 2, Access::Write).unwrap().len(), 1);
        assert_eq!(d.claim(1, 1), Ok(false));
        d.done(1, 2).unwrap();
        assert_eq!(d.claim(1, 1), Ok(false), "node 2 owns it");
        assert_eq!(d.claim(3, 1), Ok(false), "node 2 holds a copy");
        assert_eq!(d.claim(2, 2), Ok(true));
        assert!(matches!(d.claim(2, 7), Err(ProtocolError::BadNode { .. })));
        assert!(matches!(
            d.done(2, 1),
            Err(ProtocolError::Unexpected { .. })
        ));
        d.done(2, 2).unwrap();
    }
}
