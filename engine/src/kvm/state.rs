//! [`VcpuState`]: everything KVM exposes for an x86 vCPU, as one value that can be
//! serialized, sent to another node, and restored into a vCPU of another VM.
//!
//! Wire form ([`VcpuState::encode`]): the 4 bytes `FLVS`, a little-endian u16 format
//! version, then the state in postcard (serde) encoding, where each KVM structure is a
//! length-prefixed byte string of its C layout.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 4] = b"FLVS";
/// Version of the encoded form.
pub const STATE_VERSION: u16 = 1;
/// Upper bound on MSRs in a decoded state (KVM_MAX_MSR_ENTRIES).
const MAX_MSRS: usize = 256;

/// Why bytes are not a vCPU state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("vCPU state is {0} bytes, too short for its header")]
    Truncated(usize),
    #[error("not a vCPU state (bad magic)")]
    BadMagic,
    #[error("vCPU state format version {0} is not the supported version {STATE_VERSION}")]
    Version(u16),
    #[error("malformed vCPU state: {0}")]
    Malformed(String),
    #[error("vCPU state has {0} MSRs, more than {MAX_MSRS}")]
    TooManyMsrs(usize),
}

/// The complete architectural state of one x86 vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's id in the guest.
    pub id: u32,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        VcpuState {
            // kvm_xsave ends in a flexible array member and so is not Clone; the legacy
            // 4 KiB region is all of it here.
            xsave: kvm_xsave {
                region: self.xsave.region,
                ..Default::default()
            },
            msrs: self.msrs.clone(),
            ..*self
        }
    }
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

impl VcpuState {
    /// Encodes the state for storage or transfer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + 8192);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        // Serializing plain structs and a Vec into a Vec cannot fail.
        postcard::to_io(self, &mut out).expect("postcard encoding into a Vec");
        out
    }

    /// Decodes and validates an encoded state.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        if bytes.len() < 6 {
            return Err(StateError::Truncated(bytes.len()));
        }
        if &bytes[..4] != MAGIC {
            return Err(StateError::BadMagic);
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != STATE_VERSION {
            return Err(StateError::Version(version));
        }
        let (state, rest): (VcpuState, &[u8]) = postcard::take_from_bytes(&bytes[6..])
            .map_err(|e| StateError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(StateError::Malformed(format!(
                "{} trailing bytes",
                rest.len()
            )));
        }
        if state.msrs.len() > MAX_MSRS {
            return Err(StateError::TooManyMsrs(state.msrs.len()));
        }
        Ok(state)
    }
}
