//! The Flotilla engine: a KVM-based, unikernel-style VMM for one node.
//!
//! Data flows from a guest image to a running guest like this: [`loader`] validates the
//! ELF image, [`boot`] lays out guest RAM ([`memory`]) and writes the page tables, GDT and
//! boot info, [`kvm`] creates the VM and vCPUs, and [`machine`] runs one host thread per
//! vCPU, handling exits: hypercalls ([`hypercall`], [`futex`]) and everything that ends a
//! run. Every vCPU's full state can be captured as a [`kvm::VcpuState`] and restored into
//! another VM, which is what lets later layers move vCPUs between nodes.

pub mod boot;
pub mod cluster;
pub mod futex;
pub mod hypercall;
pub mod kvm;
pub mod loader;
pub mod machine;
pub mod memory;

pub use kvm::{Vcpu, VcpuState};
pub use machine::{ConsoleMode, Error, Machine, MachineConfig, Outcome, RunningMachine, Snapshot};
pub use memory::GuestMemory;
