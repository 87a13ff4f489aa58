//! One guest across several node processes. Every node runs this engine over its own KVM
//! VM and its own copy of guest RAM; page coherence makes the copies one memory
//! (docs/protocol.md), and vCPUs move between nodes with their full state.
//!
//! Modules, in the order a remote fault walks through them (docs/architecture.md):
//!
//! - `run`: a node's run, boot to outcome (a node alone is [`crate::Machine`]).
//! - `vcpu`: the vCPU threads: exits, hypercalls, arrivals of moved vCPUs.
//! - `fault`: the one fault path: page or vCPU move, as the policy decides.
//! - `pages`: this node's page table (state of each copy, the fault trap).
//! - `coherence`: this node's side of the page protocol, and guest RAM as the engine's
//!   threads see it.
//! - `node`: the node, and the dispatch of its messages (out: transport or loopback).
//! - [`directory`]: the home directory state machine, pure and property-tested.
//! - `wait`: where threads wait (for a page, a futex result, an arrival, a pause).
//! - `leader` and `futex`: node 0's part: the run's outcome and the futex table.
//! - `stats`, `sampler`: counters and latency samples; sampled access tracking.
//! - [`uffd`]: userfaultfd in SIGBUS mode, the fault trap on this host.

mod coherence;
mod decode;
mod fault;
mod futex;
mod leader;
mod node;
mod pages;
mod run;
mod sampler;
mod stats;
pub mod uffd;
mod vcpu;
mod wait;

use crate::Error;
use flotilla_transport::{Kind, MeshConfig, NodeStats, Samples};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How often waiting threads look at the stop flag.
pub(crate) const POLL: Duration = Duration::from_millis(100);

pub use flotilla_telemetry::trace::TraceMeta;
pub use flotilla_transport::NodeId;
pub use leader::CONSOLE_MAX_BYTES;
pub use node::monotonic_ns;
pub use run::{run_node, BootedNode, RunningNode, Snapshot};

/// How guest RAM is spread over the nodes at boot (vCPU stacks always start on their
/// vCPU's node; the image is replicated read-only everywhere).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamPlacement {
    /// Equal contiguous ranges: node 0 the lowest.
    Contiguous,
    /// Page `p` on node `p % nodes`.
    Interleave,
}

impl RamPlacement {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "contiguous" => Some(RamPlacement::Contiguous),
            "interleave" => Some(RamPlacement::Interleave),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            RamPlacement::Contiguous => "contiguous",
            RamPlacement::Interleave => "interleave",
        }
    }
}

/// What every node of a cluster must agree on (its digest is checked at connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    pub nodes: u16,
    pub vcpus: u32,
    pub mem_bytes: u64,
    pub args: String,
    pub stack_bytes: u64,
    pub policy: String,
    /// For [`LEARNED`](flotilla_placement::LEARNED): a digest of its model file, so
    /// every node serves the same model ("" for the built-in policies).
    pub model: String,
    pub seed: u64,
    /// Initial node of each vCPU.
    pub vcpu_nodes: Vec<NodeId>,
    pub ram: RamPlacement,
}

impl ClusterSpec {
    /// vCPUs spread round-robin.
    pub fn round_robin(nodes: u16, vcpus: u32) -> Vec<NodeId> {
        (0..vcpus).map(|v| (v % nodes as u32) as NodeId).collect()
    }

    /// Checks the spec as node `me` of it: node count, id, vCPU placement, policy.
    pub fn check(&self, me: NodeId) -> Result<(), Error> {
        let spec = self;
        let bad = |s: String| Err(Error::Config(s));
        if spec.nodes == 0 || spec.nodes as usize > flotilla_transport::MAX_NODES {
            return bad(format!("{} nodes; a cluster has 1 to 64", spec.nodes));
        }
        if me >= spec.nodes {
            return bad(format!(
                "node id {me} is not below the node count {}",
                spec.nodes
            ));
        }
        if spec.vcpu_nodes.len() != spec.vcpus as usize {
            return bad(format!(
                "vCPU placement lists {} nodes for {} vCPUs",
                spec.vcpu_nodes.len(),
                spec.vcpus
            ));
        }
        if let Some(n) = spec.vcpu_nodes.iter().find(|&&n| n >= spec.nodes) {
            return bad(format!(
                "vCPU placement names node {n}; there are {}",
                spec.nodes
            ));
        }
        if spec.policy != flotilla_placement::LEARNED {
            flotilla_placement::by_name(&spec.policy, spec.seed, me)
                .map_err(|e| Error::Config(e.to_string()))?;
        }
        Ok(())
    }

    /// Bytes every node must agree on, for the configuration digest.
    pub fn canonical(&self, image: &[u8]) -> Vec<u8> {
        let mut out = format!(
            "nodes={} vcpus={} mem={} stack={} policy={} model={} seed={} ram={} vcpu_nodes={:?} args={:?} image=",
            self.nodes,
            self.vcpus,
            self.mem_bytes,
            self.stack_bytes,
            self.policy,
            self.model,
            self.seed,
            self.ram.name(),
            self.vcpu_nodes,
            self.args
        )
        .into_bytes();
        out.extend_from_slice(&flotilla_transport::auth::digest(image));
        out
    }
}

/// Everything one node needs to run its part.
pub struct NodeSetup {
    pub me: NodeId,
    pub spec: ClusterSpec,
    pub image: Vec<u8>,
    pub transport: Kind,
    pub mesh: MeshConfig,
    /// Node 0 ends the run with an error after this long.
    pub timeout: Option<Duration>,
    /// Bare 4 KiB round trips node 1 measures with node 0 before the guest starts.
    pub echo_rounds: u32,
    /// CLOCK_MONOTONIC nanoseconds at which the guest clock reads 0 (nodes on one host
    /// share it); `None`: this node's start.
    pub epoch_ns: Option<u64>,
    pub observe: Observe,
    /// This node's placement policy, built by the caller (a learned one is); `None`: the
    /// built-in policy `spec.policy` names.
    pub policy: Option<Box<dyn flotilla_placement::Policy>>,
}

/// What a node tells the outside world while it runs (all off by default).
#[derive(Debug, Clone, Default)]
pub struct Observe {
    /// Serve Prometheus metrics at `http://ADDR/metrics`.
    pub metrics_addr: Option<SocketAddr>,
    /// Keep serving them this long after the run.
    pub metrics_linger: Option<Duration>,
    /// Record this node's fault trace into a file.
    pub trace: Option<TraceSetup>,
    /// Sampled access tracking: pages armed per second (0 = off). See `sampler`.
    pub sample_rate: u32,
    /// Reference-stream recording: every epoch, arm every page this node holds and has
    /// mapped, so the first touch of each page in each epoch is recorded. See `sampler`.
    pub touch_epoch: Option<Duration>,
    /// Read health signals from this tree instead of `/sys`.
    pub sysfs_root: Option<PathBuf>,
    /// Health signals to report whatever `/sys` says.
    pub health_inject: Vec<(String, f64)>,
    /// Node 0 also writes the guest's console to its stdout and stderr as it arrives.
    pub forward_console: bool,
    /// Pin the thread of vCPU `i` to CPU `vcpu_cpus[i % len]` (empty: no pinning).
    pub vcpu_cpus: Vec<usize>,
}

/// Where a node records its trace, and the run it describes.
#[derive(Debug, Clone)]
pub struct TraceSetup {
    pub path: PathBuf,
    pub meta: TraceMeta,
}

/// The end of a cluster run, as node 0 reports it: also after a failure, when what the
/// guest printed and what the nodes counted matter most.
#[derive(Debug)]
pub struct ClusterOutcome {
    /// The guest's exit code, or why the run failed.
    pub result: Result<i32, Error>,
    pub report: Option<u64>,
    pub console: Vec<u8>,
    pub console_truncated: bool,
    pub wall: Duration,
    /// Counters summed over the nodes that reported theirs.
    pub totals: NodeStats,
    /// Each node's counters; `None` for a node whose counters never arrived.
    pub per_node: Vec<Option<NodeStats>>,
    pub samples: Samples,
}

impl ClusterOutcome {
    /// Nodes whose counters are missing from `totals`.
    pub fn missing_counters(&self) -> Vec<NodeId> {
        (0..self.per_node.len() as NodeId)
            .filter(|&n| self.per_node[n as usize].is_none())
            .collect()
    }
}

/// The `q`-quantile of `samples` (sorted in place), or 0 if empty.
pub fn quantile(samples: &mut [u32], q: f64) -> u32 {
    if samples.is_empty() {
        return 0;
    }
    samples.sort_unstable();
    let i = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[i.min(samples.len() - 1)]
}

impl Observe {
    /// Whether the sampler runs (access sampling or reference-stream recording), which
    /// needs the fault trap even on a node alone.
    pub fn samples(&self) -> bool {
        self.sample_rate > 0 || self.touch_epoch.is_some()
    }
}
