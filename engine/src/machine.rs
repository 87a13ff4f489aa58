//! A guest machine on one node, in this process: the cluster engine's node alone
//! (`cluster::run`), with no transport and no fault trap (every page is the node's, and
//! first touches are the kernel's), so exactly the code a cluster runs.
//!
//! [`Machine::boot`] validates and loads an image; [`Machine::start`] starts the vCPU
//! threads and returns a [`RunningMachine`], which can be paused (every vCPU's full state
//! captured into a [`Snapshot`]), resumed, stopped, or waited for. [`Machine::restore`]
//! builds a fresh VM from a snapshot and the same guest memory.
//!
//! A run ends when a vCPU calls EXIT, when every vCPU has returned from the entry point
//! (the code is vCPU 0's return value), or with an [`Error`]: triple fault, an exit the
//! engine does not handle, a bad hypercall, a futex deadlock, or the timeout. (Guests run
//! at CPL 3, so `hlt` faults instead of halting a vCPU forever.)

use crate::cluster::{BootedNode, ClusterSpec, Observe, RamPlacement, RunningNode, Snapshot};
use crate::memory::GuestMemory;
use crate::Error;
use flotilla_abi::STACK_BYTES_DEFAULT;
use std::sync::Arc;
use std::time::Duration;

/// What the guest's console output does besides being kept in the [`Outcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleMode {
    /// Keep it only.
    Capture,
    /// Also write fd 1 to this process's stdout and fd 2 to its stderr as it arrives.
    Forward,
}

/// How to build a machine.
#[derive(Debug, Clone)]
pub struct MachineConfig {
    pub vcpus: u32,
    pub mem_bytes: u64,
    /// The argument string the guest finds in its boot info.
    pub args: String,
    pub stack_bytes: u64,
    /// End the run with [`Error::Timeout`] after this long.
    pub timeout: Option<Duration>,
    pub console: ConsoleMode,
    /// Pin vCPU `i`'s thread to CPU `vcpu_cpus[i % len]` (empty: no pinning).
    pub vcpu_cpus: Vec<usize>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpus: 1,
            mem_bytes: 256 << 20,
            args: String::new(),
            stack_bytes: STACK_BYTES_DEFAULT,
            timeout: None,
            console: ConsoleMode::Capture,
            vcpu_cpus: Vec::new(),
        }
    }
}

impl MachineConfig {
    /// The same guest as a cluster of one node.
    pub fn spec(&self) -> ClusterSpec {
        ClusterSpec {
            nodes: 1,
            vcpus: self.vcpus,
            mem_bytes: self.mem_bytes,
            args: self.args.clone(),
            stack_bytes: self.stack_bytes,
            // Never asked: a node alone has no remote faults.
            policy: "always-page".into(),
            model: String::new(),
            seed: 0,
            vcpu_nodes: vec![0; self.vcpus as usize],
            ram: RamPlacement::Contiguous,
        }
    }

    fn observe(&self) -> Observe {
        Observe {
            forward_console: self.console == ConsoleMode::Forward,
            vcpu_cpus: self.vcpu_cpus.clone(),
            ..Default::default()
        }
    }
}

/// The result of a finished run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The EXIT code, or vCPU 0's return value.
    pub exit_code: i32,
    /// The value the guest reported with REPORT (a workload's checksum).
    pub report: Option<u64>,
    /// Console output, fd 1 and 2 interleaved, at most [`crate::cluster::CONSOLE_MAX_BYTES`].
    pub console: Vec<u8>,
    pub console_truncated: bool,
    /// From the vCPU threads' start to the end of the run.
    pub wall: Duration,
    /// Exits from the guest to the engine, all vCPUs.
    pub exits: u64,
}

/// A built machine, not yet running.
pub struct Machine {
    config: MachineConfig,
    node: BootedNode,
}

impl Machine {
    /// Validates `image` and the configuration, then builds the VM with every vCPU at the
    /// entry point.
    pub fn boot(config: MachineConfig, image: &[u8]) -> Result<Self, Error> {
        let node = BootedNode::boot(0, config.spec(), image, config.observe(), None, None)?;
        Ok(Machine { config, node })
    }

    /// Builds a fresh VM over `memory` and restores every vCPU from `snapshot`.
    pub fn restore(
        config: MachineConfig,
        memory: Arc<GuestMemory>,
        snapshot: &Snapshot,
    ) -> Result<Self, Error> {
        let node = BootedNode::restore(config.spec(), memory, snapshot, config.observe())?;
        Ok(Machine { config, node })
    }

    /// Guest RAM of this machine.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        self.node.memory()
    }

    /// Runs the guest to the end.
    pub fn run(self) -> Result<Outcome, Error> {
        self.start()?.wait()
    }

    /// Starts every vCPU that has not returned on its own thread.
    pub fn start(self) -> Result<RunningMachine, Error> {
        Ok(RunningMachine {
            node: self.node.start(self.config.timeout)?,
        })
    }
}

/// A running machine.
pub struct RunningMachine {
    node: RunningNode,
}

impl RunningMachine {
    /// Pauses every vCPU and captures its complete state. The vCPUs stay paused until
    /// [`RunningMachine::resume`] or [`RunningMachine::stop`].
    pub fn pause(&self) -> Result<Snapshot, Error> {
        self.node.pause()
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.node.resume()
    }

    /// Ends the run wherever it is and returns guest RAM.
    pub fn stop(self) -> Arc<GuestMemory> {
        self.node.stop()
    }

    /// Waits for the run to end.
    pub fn wait(self) -> Result<Outcome, Error> {
        let outcome = self
            .node
            .wait()?
            .ok_or_else(|| Error::Config("a node alone is node 0".into()))?;
        Ok(Outcome {
            exit_code: outcome.result?,
            report: outcome.report,
            console: outcome.console,
            console_truncated: outcome.console_truncated,
            wall: outcome.wall,
            exits: outcome.totals.exits,
        })
    }
}
