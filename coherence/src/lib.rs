//! The vocabulary of page coherence that every layer of Flotilla shares: the engine's
//! fault path, the wire protocol, the placement policies and the fault trace all name
//! nodes, access kinds and decisions with these types, so they cannot disagree.
//!
//! No dependencies: the policies, the transport and the trace format sit on top of it.

/// A node's index in its cluster (0-based).
pub type NodeId = u16;

/// Most nodes in a cluster (a copyset is one `u64` bit mask).
pub const MAX_NODES: usize = 64;

/// What an instruction did to a page, or what a node asks of the page's home.
///
/// The numeric codes are part of the trace format (docs/trace-format.md) and the wire
/// protocol (docs/protocol.md): 0 read, 1 write, 2 execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Access {
    Read = 0,
    Write = 1,
    /// An instruction fetch.
    Execute = 2,
}

impl Access {
    pub const ALL: [Access; 3] = [Access::Read, Access::Write, Access::Execute];

    /// The code in traces and on the wire.
    pub const fn code(self) -> u8 {
        self as u8
    }

    pub const fn from_code(code: u8) -> Option<Access> {
        match code {
            0 => Some(Access::Read),
            1 => Some(Access::Write),
            2 => Some(Access::Execute),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Execute => "execute",
        }
    }

    pub const fn is_write(self) -> bool {
        matches!(self, Access::Write)
    }

    /// The permission this access needs from coherence: a fetch needs a readable copy.
    pub const fn permission(self) -> Access {
        match self {
            Access::Write => Access::Write,
            Access::Read | Access::Execute => Access::Read,
        }
    }
}

/// What is done at a remote fault.
///
/// The codes are part of the trace format: 1 move page, 2 move vCPU (0 there means an
/// event that is not a decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Decision {
    /// Bring the page (or write ownership of it) to the faulting vCPU's node.
    MovePage = 1,
    /// Send the vCPU, with its full state, to the node that holds the page; the faulting
    /// instruction re-executes there.
    MoveVcpu = 2,
}

impl Decision {
    pub const ALL: [Decision; 2] = [Decision::MovePage, Decision::MoveVcpu];

    pub const fn code(self) -> u8 {
        self as u8
    }

    pub const fn from_code(code: u8) -> Option<Decision> {
        match code {
            1 => Some(Decision::MovePage),
            2 => Some(Decision::MoveVcpu),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Decision::MovePage => "move_page",
            Decision::MoveVcpu => "move_vcpu",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_unknown_codes_are_refused() {
        for a in Access::ALL {
            assert_eq!(Access::from_code(a.code()), Some(a));
        }
        for d in Decision::ALL {
            assert_eq!(Decision::from_code(d.code()), Some(d));
        }
        assert_eq!(Access::from_code(3), None);
        assert_eq!(Decision::from_code(0), None);
        assert_eq!(Access::Execute.permission(), Access::Read);
        assert!(Access::Write.permission().is_write());
    }
}
