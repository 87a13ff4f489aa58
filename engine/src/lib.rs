//! The Flotilla engine: a KVM-based, unikernel-style VMM, one engine for a node alone and
//! for a node of a cluster.
//!
//! Data flows from a guest image to a running guest like this: [`loader`] validates the
//! ELF image, [`boot`] lays out guest RAM ([`memory`]) and writes the page tables, GDT and
//! boot info, [`kvm`] creates the VM and vCPUs, and [`cluster`] runs one host thread per
//! vCPU, handling exits: hypercalls ([`hypercall`]), faults on pages held by other nodes,
//! and everything that ends a run. [`machine`] is that engine as one node alone in this
//! process. Every vCPU's full state can be captured as a [`kvm::VcpuState`] and restored
//! into another VM, which is what lets vCPUs move between nodes. See
//! `docs/architecture.md` for one remote fault and one vCPU move, step by step.

pub mod affinity;
pub mod boot;
pub mod cluster;
mod error;
pub mod hypercall;
pub mod kvm;
pub mod loader;
pub mod machine;
pub mod memory;

pub use cluster::Snapshot;
pub use error::Error;
pub use kvm::{Vcpu, VcpuState};
pub use machine::{ConsoleMode, Machine, MachineConfig, Outcome, RunningMachine};
pub use memory::GuestMemory;
