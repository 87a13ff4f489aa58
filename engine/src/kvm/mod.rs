//! Everything that talks to KVM. The rest of the engine speaks [`Hypervisor`], [`Vm`],
//! [`Vcpu`] and [`VcpuState`] and never issues an ioctl itself.
//!
//! - [`Hypervisor`]: the open `/dev/kvm`, with what it supports (CPUID, saveable MSRs).
//! - [`Vm`]: one KVM VM with guest RAM registered and an in-kernel LAPIC.
//! - [`Vcpu`]: one vCPU: boot state, run, capture and restore of its full state.
//! - [`kick`]: the signal that forces a vCPU out of `KVM_RUN` from another thread.

pub mod kick;
mod state;
mod vcpu;

pub use state::{StateError, VcpuState};
pub use vcpu::{Exit, Flushed, Vcpu};

use crate::memory::GuestMemory;
use kvm_bindings::{kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use std::sync::{Arc, Mutex, OnceLock};

/// A failed KVM call, naming the call and the vCPU where there is one.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error(
        "cannot open /dev/kvm: {0}. Flotilla needs a Linux x86-64 host with KVM and read-write \
         access to /dev/kvm"
    )]
    Open(kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("{op} failed: {source}")]
    System {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: {op} failed: {source}")]
    Vcpu {
        vcpu: u32,
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(
        "vCPU {vcpu}: KVM_GET_MSRS read {got} of {want} MSRs (first failing index {index:#x})"
    )]
    Msrs {
        vcpu: u32,
        got: usize,
        want: usize,
        index: u32,
    },
}

pub(crate) fn sys(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::System { op, source }
}

/// The host's KVM, shared by every VM of this process.
pub struct Hypervisor {
    kvm: Kvm,
    cpuid: CpuId,
    /// MSRs that can be read on a vCPU here (found on the first vCPU).
    saveable_msrs: OnceLock<Vec<u32>>,
    /// MSRs KVM refuses to set here (learned on the first restore); never sent again.
    unsettable_msrs: Mutex<Vec<u32>>,
    /// `KVM_CAP_SYNC_REGS`: KVM copies the registers into the shared run page at every
    /// exit, so the fault path reads them without a `KVM_GET_REGS` call.
    sync_regs: bool,
}

impl std::fmt::Debug for Hypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hypervisor")
            .field("cpuid_entries", &self.cpuid.as_slice().len())
            .finish()
    }
}

impl Hypervisor {
    /// Opens `/dev/kvm` and reads what it supports.
    pub fn open() -> Result<Arc<Self>, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(KvmError::ApiVersion(version));
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(sys("KVM_GET_SUPPORTED_CPUID"))?;
        kick::install().map_err(sys("installing the vCPU kick signal handler"))?;
        let sync_regs = kvm.check_extension(kvm_ioctls::Cap::SyncRegs);
        Ok(Arc::new(Hypervisor {
            kvm,
            cpuid,
            saveable_msrs: OnceLock::new(),
            unsettable_msrs: Mutex::new(Vec::new()),
            sync_regs,
        }))
    }

    /// Creates a VM over `memory` with an in-kernel LAPIC.
    pub fn create_vm(self: &Arc<Self>, memory: &GuestMemory) -> Result<Vm, KvmError> {
        let fd = self.kvm.create_vm().map_err(sys("KVM_CREATE_VM"))?;
        fd.create_irq_chip().map_err(sys("KVM_CREATE_IRQCHIP"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: memory.size(),
            userspace_addr: memory.host_address(),
        };
        // SAFETY: the region is guest RAM's own mapping, which outlives the VM: the
        // machine that owns this VM holds an Arc of the memory.
        unsafe { fd.set_user_memory_region(region) }.map_err(sys("KVM_SET_USER_MEMORY_REGION"))?;
        Ok(Vm {
            fd,
            hypervisor: Arc::clone(self),
        })
    }

    fn msr_index_list(&self) -> Result<Vec<u32>, KvmError> {
        let list = self
            .kvm
            .get_msr_index_list()
            .map_err(sys("KVM_GET_MSR_INDEX_LIST"))?;
        Ok(list.as_slice().to_vec())
    }
}

/// One KVM VM.
pub struct Vm {
    fd: VmFd,
    hypervisor: Arc<Hypervisor>,
}

impl Vm {
    /// Creates vCPU `id` with the host's supported CPUID (APIC ids patched in).
    pub fn create_vcpu(&self, id: u32) -> Result<Vcpu, KvmError> {
        let fd = self
            .fd
            .create_vcpu(id as u64)
            .map_err(|source| KvmError::Vcpu {
                vcpu: id,
                op: "KVM_CREATE_VCPU",
                source,
            })?;
        Vcpu::new(id, fd, Arc::clone(&self.hypervisor))
    }
}
