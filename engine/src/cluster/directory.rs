//! The home directory: for every page this node is home of, who owns it and who holds
//! read-only copies, and the one transaction in progress on it (docs/protocol.md).
//!
//! A pure state machine: it takes requests, acknowledgements and completions and returns
//! the messages to send (possibly to this node itself), so it can be tested exhaustively
//! without a network. One transaction per page at a time, from the request until the
//! requester's `Done`; later requests wait in a FIFO queue. That serialization is what
//! rules out two writable copies and lost pages, and the queue is what rules out
//! starvation and deadlock (see the protocol document for the argument).

use flotilla_transport::{Message, NodeId, Want};
use std::collections::{HashMap, VecDeque};

/// A message the directory wants sent.
pub type Outgoing = (NodeId, Message);

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
}

#[derive(Debug)]
struct Transaction {
    requester: NodeId,
    /// Invalidation acknowledgements still missing.
    acks: u32,
    /// Sent once every acknowledgement is in.
    then: Option<Outgoing>,
    queue: VecDeque<(NodeId, Want)>,
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

    /// Whether a transaction is in progress on `page`.
    pub fn is_busy(&self, page: u64) -> bool {
        self.busy.contains_key(&page)
    }

    /// `from` asks for `page`.
    pub fn request(
        &mut self,
        page: u64,
        from: NodeId,
        want: Want,
    ) -> Result<Vec<Outgoing>, ProtocolError> {
        let i = self.index(page, from, "PageRequest")?;
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
        want: Want,
        queue: VecDeque<(NodeId, Want)>,
    ) -> Vec<Outgoing> {
        let bit = |n: NodeId| 1u64 << n;
        let owner = self.owner[i];
        let copyset = self.copyset[i];
        let has_copy = copyset & bit(requester) != 0;
        let mut out = Vec::new();
        let mut acks = 0;
        let then = match want {
            Want::Read => {
                self.copyset[i] |= bit(requester);
                if has_copy {
                    (requester, Message::Grant { page })
                } else {
                    (
                        owner,
                        Message::Fetch {
                            page,
                            want,
                            requester,
                        },
                    )
                }
            }
            Want::Write => {
                // Everyone but the requester drops their copy; the owner's copy is
                // dropped by the Fetch that moves it, unless the requester already has
                // the contents.
                let mut drop = copyset & !bit(requester);
                if !has_copy {
                    drop &= !bit(owner);
                }
                for node in 0..self.nodes {
                    if drop & bit(node) != 0 {
                        out.push((
                            node,
                            Message::Invalidate {
                                page,
                                owner: requester,
                            },
                        ));
                        acks += 1;
                    }
                }
                self.owner[i] = requester;
                self.copyset[i] = bit(requester);
                if has_copy {
                    (requester, Message::Grant { page })
                } else {
                    (
                        owner,
                        Message::Fetch {
                            page,
                            want,
                            requester,
                        },
                    )
                }
            }
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
