//! One vCPU: its boot state (64-bit long mode, identity-mapped RAM, SSE on, interrupts
//! off), the run loop primitive, and capture/restore of its full architectural state in
//! the order KVM requires (the same order as Firecracker's snapshots).

use super::kick;
use super::state::VcpuState;
use super::{Hypervisor, KvmError};
use crate::boot::{BootLayout, CODE_SELECTOR, DATA_SELECTOR, GDT};
use flotilla_abi::{BOOT_INFO_ADDR, GDT_ADDR, PAGE_TABLES_ADDR};
use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run, kvm_segment, Msrs,
    KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::Arc;
use x86_64::registers::control::{Cr0Flags, Cr4Flags};
use x86_64::registers::model_specific::EferFlags;

const XCR0_X87: u64 = 1;
const XCR0_SSE: u64 = 1 << 1;
const XCR0_AVX: u64 = 1 << 2;
const XCR0_WANTED: u64 = XCR0_X87 | XCR0_SSE | XCR0_AVX;

/// Why a vCPU left the guest, in the engine's words.
#[derive(Debug)]
pub enum Exit<'a> {
    /// `out` to `port`.
    IoOut { port: u16, data: &'a [u8] },
    /// `in` from `port`: fill `data` before running again.
    IoIn { port: u16, data: &'a mut [u8] },
    /// An access to guest-physical `addr` that no memory backs (or, later, that this
    /// node does not hold).
    Mmio { addr: u64, write: bool, len: usize },
    /// `KVM_EXIT_MEMORY_FAULT`: the same, reported by newer kernels.
    MemoryFault { addr: u64, len: u64 },
    /// The run was interrupted by a kick (or `immediate_exit`).
    Interrupted,
    /// `KVM_RUN` failed with `EFAULT` and no address: on PVM hosts, a plain write (or
    /// an SSE read) of a page userfaultfd reports missing (SIGBUS mode) ends this way,
    /// with RIP still at the instruction.
    WriteFault,
    /// Triple fault.
    Shutdown,
    /// `hlt` reported to user space (not with the in-kernel LAPIC the engine creates).
    Halt,
    /// KVM could not emulate or deliver something.
    InternalError { suberror: u32 },
    /// VM entry failed.
    FailEntry { reason: u64 },
    /// Anything else, with KVM's name for it.
    Other(String),
}

/// How a [`Vcpu::flush`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flushed {
    /// The pending instruction completed.
    Done,
    /// The instruction needs another MMIO access (a second fragment or page).
    Mmio {
        addr: u64,
        write: bool,
        len: usize,
    },
    /// KVM could not finish emulating it (a locked RMW on a page that is not here).
    EmulationFailed,
    Other(String),
}

/// One KVM vCPU.
pub struct Vcpu {
    id: u32,
    fd: VcpuFd,
    hypervisor: Arc<Hypervisor>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("id", &self.id).finish()
    }
}

impl Vcpu {
    pub(super) fn new(
        id: u32,
        mut fd: VcpuFd,
        hypervisor: Arc<Hypervisor>,
    ) -> Result<Self, KvmError> {
        if hypervisor.sync_regs {
            fd.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
        }
        let vcpu = Vcpu { id, fd, hypervisor };
        vcpu.set_cpuid()?;
        Ok(vcpu)
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    fn err(&self, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
        let vcpu = self.id;
        move |source| KvmError::Vcpu { vcpu, op, source }
    }

    /// The host's supported CPUID with this vCPU's APIC id in leaves 1, 0xB and 0x1F.
    fn set_cpuid(&self) -> Result<(), KvmError> {
        let mut cpuid = self.hypervisor.cpuid.clone();
        for entry in cpuid.as_mut_slice() {
            match entry.function {
                1 => entry.ebx = (entry.ebx & 0x00FF_FFFF) | (self.id << 24),
                0xB | 0x1F => entry.edx = self.id,
                _ => {}
            }
        }
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.err("KVM_SET_CPUID2"))
    }

    /// Puts the vCPU at the guest's entry point in 64-bit mode (docs/guest-abi.md,
    /// "Machine state at entry").
    pub fn set_boot_state(&self, layout: &BootLayout) -> Result<(), KvmError> {
        let mut sregs = self.fd.get_sregs().map_err(self.err("KVM_GET_SREGS"))?;
        sregs.cs = segment(CODE_SELECTOR);
        let data = segment(DATA_SELECTOR);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.gdt.base = GDT_ADDR;
        sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr3 = PAGE_TABLES_ADDR;
        sregs.cr4 = (Cr4Flags::PHYSICAL_ADDRESS_EXTENSION
            | Cr4Flags::OSFXSR
            | Cr4Flags::OSXMMEXCPT_ENABLE
            | Cr4Flags::OSXSAVE)
            .bits();
        sregs.cr0 = (Cr0Flags::PROTECTED_MODE_ENABLE
            | Cr0Flags::MONITOR_COPROCESSOR
            | Cr0Flags::EXTENSION_TYPE
            | Cr0Flags::NUMERIC_ERROR
            | Cr0Flags::WRITE_PROTECT
            | Cr0Flags::PAGING)
            .bits();
        // No SCE: there is no syscall entry point, so `syscall` is a clean #UD.
        sregs.efer = (EferFlags::LONG_MODE_ENABLE | EferFlags::LONG_MODE_ACTIVE).bits();
        self.fd
            .set_sregs(&sregs)
            .map_err(self.err("KVM_SET_SREGS"))?;

        let fpu = kvm_fpu {
            fcw: 0x37F,
            mxcsr: 0x1F80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(self.err("KVM_SET_FPU"))?;
        // Under PVM the guest runs on the host CPU with CR4.OSXSAVE set, so SSE works
        // only if XCR0 enables it; enable x87, SSE and AVX state (as far as supported).
        let mut xcrs = self.fd.get_xcrs().map_err(self.err("KVM_GET_XCRS"))?;
        xcrs.nr_xcrs = 1;
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = self.supported_xcr0() & XCR0_WANTED;
        self.fd.set_xcrs(&xcrs).map_err(self.err("KVM_SET_XCRS"))?;

        let regs = kvm_regs {
            rip: layout.entry,
            rsp: layout.stack_pointer(self.id),
            rdi: BOOT_INFO_ADDR,
            rsi: self.id as u64,
            // Reserved bit 1, IOPL 3 (port I/O at CPL 3), IF clear: interrupts off.
            rflags: 0x2 | (3 << 12),
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(self.err("KVM_SET_REGS"))?;
        // With an in-kernel LAPIC, application processors start in wait-for-SIPI.
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(self.err("KVM_SET_MP_STATE"))
    }

    /// XCR0 bits the host supports (CPUID leaf 0xD, sub-leaf 0, EAX).
    fn supported_xcr0(&self) -> u64 {
        self.hypervisor
            .cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0xD && e.index == 0)
            .map_or(XCR0_X87 | XCR0_SSE, |e| e.eax as u64 | XCR0_X87)
    }

    /// Binds this vCPU's `kvm_run` to the calling thread, so [`kick::kick`] reaches it.
    pub fn bind_to_thread(&mut self) {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        // SAFETY: the kvm_run mapping lives as long as `self`; the vCPU thread unbinds
        // (`unbind_from_thread`) before dropping or handing off the vCPU.
        unsafe { kick::bind(Some(run)) };
    }

    /// Undoes [`Vcpu::bind_to_thread`].
    pub fn unbind_from_thread(&mut self) {
        // SAFETY: unbinding never dangles.
        unsafe { kick::bind(None) };
    }

    /// Runs the guest until the next exit.
    pub fn run(&mut self) -> Result<Exit<'_>, KvmError> {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        let id = self.id;
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => Ok(Exit::IoOut { port, data }),
            Ok(VcpuExit::IoIn(port, data)) => Ok(Exit::IoIn { port, data }),
            Ok(VcpuExit::MmioRead(addr, data)) => Ok(Exit::Mmio {
                addr,
                write: false,
                len: data.len(),
            }),
            Ok(VcpuExit::MmioWrite(addr, data)) => Ok(Exit::Mmio {
                addr,
                write: true,
                len: data.len(),
            }),
            Ok(VcpuExit::MemoryFault { gpa, size, .. }) => Ok(Exit::MemoryFault {
                addr: gpa,
                len: size,
            }),
            Ok(VcpuExit::Shutdown) => Ok(Exit::Shutdown),
            Ok(VcpuExit::Hlt) => Ok(Exit::Halt),
            Ok(VcpuExit::Intr) => Ok(Exit::Interrupted),
            Ok(VcpuExit::FailEntry(reason, _)) => Ok(Exit::FailEntry { reason }),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: KVM filled the `internal` member for KVM_EXIT_INTERNAL_ERROR;
                // the mapping is live for `self`.
                let suberror = unsafe { (*run).__bindgen_anon_1.internal.suberror };
                Ok(Exit::InternalError { suberror })
            }
            Ok(other) => Ok(Exit::Other(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: the kvm_run mapping is live for `self`; a kick's handler may have
                // set the flag, and this thread clears it before the next entry.
                unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 0) };
                Ok(Exit::Interrupted)
            }
            Err(e) if e.errno() == libc::EFAULT => Ok(Exit::WriteFault),
            Err(source) => Err(KvmError::Vcpu {
                vcpu: id,
                op: "KVM_RUN",
                source,
            }),
        }
    }

    /// The general-purpose registers.
    pub fn regs(&self) -> Result<kvm_regs, KvmError> {
        self.fd.get_regs().map_err(self.err("KVM_GET_REGS"))
    }

    /// Completes any pending I/O so the captured state is consistent: KVM finishes an
    /// `in`/`out` only when `KVM_RUN` is entered again, so enter it with
    /// `immediate_exit` set and expect `EINTR` back.
    pub fn complete_pending_io(&mut self) -> Result<(), KvmError> {
        self.fd.set_kvm_immediate_exit(1);
        let result = self.fd.run();
        let outcome = match result {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(source) => Err(KvmError::Vcpu {
                vcpu: self.id,
                op: "KVM_RUN (completing I/O)",
                source,
            }),
            Ok(_) => Ok(()),
        };
        self.fd.set_kvm_immediate_exit(0);
        outcome
    }

    /// The data of the MMIO exit the vCPU stopped at: for a read, fill it before running
    /// again (KVM hands it to the instruction); for a write, it holds what the
    /// instruction stores. `None` if the last exit was not MMIO.
    pub fn mmio_data(&mut self) -> Option<&mut [u8]> {
        let run: *mut kvm_run = self.fd.get_kvm_run();
        // SAFETY: the kvm_run mapping is live for `self`; `mmio` is the active member when
        // the exit reason is KVM_EXIT_MMIO, and its `len` is at most 8 (KVM's fragment).
        unsafe {
            if (*run).exit_reason != kvm_bindings::KVM_EXIT_MMIO {
                return None;
            }
            let mmio = &mut (*run).__bindgen_anon_1.mmio;
            let len = (mmio.len as usize).min(mmio.data.len());
            Some(&mut mmio.data[..len])
        }
    }

    /// Enters `KVM_RUN` with `immediate_exit` set: KVM completes the pending MMIO (or
    /// I/O) instruction and returns before running any further guest code. See
    /// docs/host-kvm.md: a locked read-modify-write whose page is not here
    /// ends in an emulation failure, which leaves the vCPU usable.
    pub fn flush(&mut self) -> Result<Flushed, KvmError> {
        self.fd.set_kvm_immediate_exit(1);
        let result = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(Flushed::Done),
            Ok(VcpuExit::MmioRead(addr, data)) => Ok(Flushed::Mmio {
                addr,
                write: false,
                len: data.len(),
            }),
            Ok(VcpuExit::MmioWrite(addr, data)) => Ok(Flushed::Mmio {
                addr,
                write: true,
                len: data.len(),
            }),
            Ok(VcpuExit::InternalError) => Ok(Flushed::EmulationFailed),
            Ok(other) => Ok(Flushed::Other(format!("{other:?}"))),
            Err(source) => Err(KvmError::Vcpu {
                vcpu: self.id,
                op: "KVM_RUN (flush)",
                source,
            }),
        };
        self.fd.set_kvm_immediate_exit(0);
        result
    }

    /// The address of the guest's last page fault (CR2), for diagnostics.
    pub fn cr2(&self) -> Result<u64, KvmError> {
        Ok(self.fd.get_sregs().map_err(self.err("KVM_GET_SREGS"))?.cr2)
    }

    /// The guest's instruction pointer (for diagnostics).
    /// The general registers as the last exit left them: read from the run page where
    /// KVM copies them at every exit (`KVM_CAP_SYNC_REGS`), else with `KVM_GET_REGS`.
    /// Only right after `KVM_RUN` returned: a restore since then is not reflected.
    pub fn exit_regs(&self) -> Result<kvm_regs, KvmError> {
        if self.hypervisor.sync_regs {
            Ok(self.fd.sync_regs().regs)
        } else {
            self.regs()
        }
    }

    pub fn rip(&self) -> Result<u64, KvmError> {
        Ok(self.fd.get_regs().map_err(self.err("KVM_GET_REGS"))?.rip)
    }

    /// The MSRs readable on a vCPU of this host, found once by reading each listed MSR.
    fn saveable_msrs(&self) -> Result<&[u32], KvmError> {
        if let Some(list) = self.hypervisor.saveable_msrs.get() {
            return Ok(list);
        }
        let mut readable = Vec::new();
        for index in self.hypervisor.msr_index_list()? {
            let mut one = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }])
            .map_err(|_| KvmError::Msrs {
                vcpu: self.id,
                got: 0,
                want: 1,
                index,
            })?;
            if self.fd.get_msrs(&mut one) == Ok(1) {
                readable.push(index);
            }
        }
        tracing::debug!(vcpu = self.id, msrs = readable.len(), "saveable MSRs found");
        Ok(self.hypervisor.saveable_msrs.get_or_init(|| readable))
    }

    /// Captures everything KVM exposes for this vCPU. Call only while the vCPU is not
    /// running and after [`Vcpu::complete_pending_io`] if it stopped at an I/O exit.
    pub fn capture(&self) -> Result<VcpuState, KvmError> {
        // Order as Firecracker: MP state first (it may accept pending LAPIC events),
        // LAPIC before MSRs (TSC deadline), vCPU events last.
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(self.err("KVM_GET_MP_STATE"))?;
        let regs = self.fd.get_regs().map_err(self.err("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(self.err("KVM_GET_SREGS"))?;
        let xsave = self.fd.get_xsave().map_err(self.err("KVM_GET_XSAVE"))?;
        let xcrs = self.fd.get_xcrs().map_err(self.err("KVM_GET_XCRS"))?;
        let debug_regs = self
            .fd
            .get_debug_regs()
            .map_err(self.err("KVM_GET_DEBUGREGS"))?;
        let lapic = self.fd.get_lapic().map_err(self.err("KVM_GET_LAPIC"))?;
        let indices = self.saveable_msrs()?;
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| KvmError::Msrs {
            vcpu: self.id,
            got: 0,
            want: entries.len(),
            index: 0,
        })?;
        let got = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(self.err("KVM_GET_MSRS"))?;
        if got != entries.len() {
            return Err(KvmError::Msrs {
                vcpu: self.id,
                got,
                want: entries.len(),
                index: entries[got].index,
            });
        }
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(self.err("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            id: self.id,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs: msrs.as_slice().to_vec(),
            events,
        })
    }

    /// Restores a captured state into this vCPU (which may belong to another VM).
    pub fn restore(&self, state: &VcpuState) -> Result<(), KvmError> {
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(self.err("KVM_SET_MP_STATE"))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(self.err("KVM_SET_REGS"))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(self.err("KVM_SET_SREGS"))?;
        // SAFETY: a plain 4 KiB kvm_xsave, as returned by KVM_GET_XSAVE; the guest's XCR0
        // never enables the large (AMX) components that would need KVM_SET_XSAVE2.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(self.err("KVM_SET_XSAVE"))?;
        self.fd
            .set_xcrs(&state.xcrs)
            .map_err(self.err("KVM_SET_XCRS"))?;
        self.fd
            .set_debug_regs(&state.debug_regs)
            .map_err(self.err("KVM_SET_DEBUGREGS"))?;
        self.fd
            .set_lapic(&state.lapic)
            .map_err(self.err("KVM_SET_LAPIC"))?;
        self.set_msrs(&state.msrs)?;
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(self.err("KVM_SET_VCPU_EVENTS"))
    }

    /// Sets MSRs in one batch. KVM stops at the first MSR it refuses (on this host the
    /// KVM paravirtual MSR 0x4b564d06); such an MSR is remembered and left out from then on.
    fn set_msrs(&self, saved: &[kvm_msr_entry]) -> Result<(), KvmError> {
        let mut entries: Vec<kvm_msr_entry> = {
            let unsettable = self
                .hypervisor
                .unsettable_msrs
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            saved
                .iter()
                .filter(|e| !unsettable.contains(&e.index))
                .copied()
                .collect()
        };
        while !entries.is_empty() {
            let msrs = Msrs::from_entries(&entries).map_err(|_| KvmError::Msrs {
                vcpu: self.id,
                got: 0,
                want: entries.len(),
                index: 0,
            })?;
            let set = self.fd.set_msrs(&msrs).map_err(self.err("KVM_SET_MSRS"))?;
            if set == entries.len() {
                break;
            }
            let refused = entries[set].index;
            tracing::debug!(
                vcpu = self.id,
                msr = format_args!("{refused:#x}"),
                "KVM refuses to set MSR; leaving it out"
            );
            self.hypervisor
                .unsettable_msrs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(refused);
            entries.drain(..=set);
        }
        Ok(())
    }
}

/// A flat 64-bit CPL-3 segment for `selector`, matching the engine's GDT.
fn segment(selector: u16) -> kvm_segment {
    let code = selector == CODE_SELECTOR;
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_: if code { 0b1011 } else { 0b0011 }, // execute/read accessed, read/write accessed
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}
