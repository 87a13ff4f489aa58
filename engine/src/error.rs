//! The engine's one error type: why a node could not be built, why a guest's run failed,
//! and why a cluster run failed, each naming the vCPU, page, peer or call involved. A
//! cluster run's errors are wrapped in [`Error::OnNode`] by the node they happened on;
//! a node alone (and so [`crate::Machine`]) returns them as they are.

use crate::boot::BootError;
use crate::cluster::uffd::UffdError;
use crate::hypercall::HypercallError;
use crate::kvm::{KvmError, StateError};
use crate::loader::LoadError;
use crate::memory::MemoryError;
use flotilla_transport::{NodeId, TransportError};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // Building a node.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error("guest image: {0}")]
    Load(#[from] LoadError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot start the {what} thread: {source}")]
    Thread {
        what: &'static str,
        source: std::io::Error,
    },

    // What the guest did.
    #[error("vCPU {vcpu}: guest triple fault (rip {rip:#x}); the guest ended")]
    TripleFault { vcpu: u32, rip: u64 },
    #[error("vCPU {vcpu}: unhandled exit at rip {rip:#x}: {exit}")]
    UnhandledExit { vcpu: u32, rip: u64, exit: String },
    #[error("vCPU {vcpu}: bad hypercall at rip {rip:#x}: {source}")]
    BadHypercall {
        vcpu: u32,
        rip: u64,
        source: HypercallError,
    },
    #[error("vCPU {vcpu}: access of {len} bytes at guest-physical {addr:#x}, outside guest RAM (size {ram:#x}) or read-only")]
    OutsideRam {
        vcpu: u32,
        addr: u64,
        len: u64,
        ram: u64,
    },
    #[error("vCPU {vcpu}: {source}")]
    GuestMemory { vcpu: u32, source: MemoryError },
    #[error("vCPU {vcpu} ran into the guard page below {whose} stack at {addr:#x} (rip {rip:#x}): stacks are {stack_bytes} bytes, the lowest 4 KiB of each a guard page; give the guest bigger ones (--stack-size)")]
    StackOverflow {
        vcpu: u32,
        /// "its" or "vCPU N's".
        whose: String,
        addr: u64,
        rip: u64,
        stack_bytes: u64,
    },
    #[error("deadlock: every running vCPU waits in futex_wait with no timeout (last: vCPU {vcpu} on {addr:#x})")]
    Deadlock { vcpu: u32, addr: u64 },
    #[error("the guest did not finish within {0:?}")]
    Timeout(Duration),

    // The engine's own work on a vCPU or a page.
    #[error("vCPU {vcpu}: {call} failed: {source}")]
    VcpuCall {
        vcpu: u32,
        call: &'static str,
        source: KvmError,
    },
    #[error("vCPU {vcpu} at rip {rip:#x}: {what}")]
    Emulation { vcpu: u32, rip: u64, what: String },
    #[error("vCPU {vcpu} arrived with a bad state: {source}")]
    BadState { vcpu: u32, source: StateError },
    #[error("page {page:#x}: {what}")]
    Page { page: u64, what: String },
    #[error("vCPU {0} thread panicked")]
    ThreadPanicked(u32),
    #[error("the run stopped")]
    Stopped,

    // Pause and restore.
    #[error("the guest ended before it could be paused")]
    EndedBeforePause,
    #[error("snapshot has {got} vCPUs, the configuration {want}")]
    SnapshotMismatch { got: usize, want: u32 },
    #[error("pause and restore need a node alone; this node is one of {0}")]
    PauseNeedsOneNode(u16),

    // Across nodes.
    #[error("node {from} sent {what}")]
    Protocol { from: NodeId, what: String },
    #[error("lost node {peer}: {source}")]
    LinkLost {
        peer: NodeId,
        source: TransportError,
    },
    #[error("node {node}: {source}")]
    OnNode { node: NodeId, source: Box<Error> },
    /// A failure another node reported, in its words (they name that node).
    #[error("{0}")]
    Remote(String),
    /// The run failed on this node (not node 0), and node 0 was sent the failure, so it
    /// is in the run's result too.
    #[error("{0}")]
    Reported(String),
}

impl Error {
    /// The error without the [`Error::OnNode`] wrapping, for matching on its kind.
    pub fn kind(&self) -> &Error {
        match self {
            Error::OnNode { source, .. } => source.kind(),
            e => e,
        }
    }
}
