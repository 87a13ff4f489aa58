//! Guest RAM: one flat guest-physical range `[0, size)` backed by one anonymous host
//! mapping that the engine fully controls. Pages are allocated by the host kernel on
//! first touch, so a 16 GiB guest costs only what it uses.
//!
//! Every host-side access to guest RAM (loading the image, reading hypercall parameter
//! blocks, console buffers, futex words) goes through the bounds-checked methods here, so
//! a bad guest pointer is an error naming the range, never a host fault. This is also the
//! single place where a later distributed engine checks residency before touching a page.

use std::ptr::NonNull;
use std::sync::atomic::AtomicU32;

/// What went wrong with guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest RAM size {0:#x} is not a positive multiple of 2 MiB")]
    BadSize(u64),
    #[error("cannot map {size:#x} bytes of guest RAM: {source}")]
    Mmap { size: u64, source: std::io::Error },
    #[error("guest range [{addr:#x}, {addr:#x} + {len:#x}) is outside guest RAM (size {size:#x})")]
    OutOfRange { addr: u64, len: u64, size: u64 },
    #[error("guest address {addr:#x} is not {align}-byte aligned")]
    Misaligned { addr: u64, align: u64 },
    #[error("guest page {page:#x} could not be fetched: {reason}")]
    Unavailable { page: u64, reason: String },
}

/// Plain data that may be copied to and from guest RAM byte for byte.
///
/// # Safety
/// Implementors must be `repr(C)` with no padding-sensitive invariants, and every bit
/// pattern must be a valid value.
pub unsafe trait Pod: Copy + 'static {}
// SAFETY: repr(C) structs of integers; any bit pattern is valid.
unsafe impl Pod for flotilla_abi::BootInfo {}
// SAFETY: as above.
unsafe impl Pod for flotilla_abi::WriteArgs {}
// SAFETY: as above.
unsafe impl Pod for flotilla_abi::ClockArgs {}
// SAFETY: as above.
unsafe impl Pod for flotilla_abi::FutexWaitArgs {}
// SAFETY: as above.
unsafe impl Pod for flotilla_abi::FutexWakeArgs {}
// SAFETY: as above.
unsafe impl Pod for flotilla_abi::ReportArgs {}
// SAFETY: integers.
unsafe impl Pod for u64 {}
// SAFETY: integers.
unsafe impl Pod for u32 {}

/// Read access to guest RAM by address: plain [`GuestMemory`] on a single node, or a
/// coherent view that fetches pages from other nodes first.
pub trait GuestRead {
    /// Size of guest RAM in bytes.
    fn ram_bytes(&self) -> u64;
    /// Copies `buf.len()` bytes from guest RAM at `addr`.
    fn read_bytes(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError>;

    /// Reads a plain-data value at `addr`.
    fn read_pod<T: Pod>(&self, addr: u64) -> Result<T, MemoryError>
    where
        Self: Sized,
    {
        let mut bytes = vec![0u8; std::mem::size_of::<T>()];
        self.read_bytes(addr, &mut bytes)?;
        // SAFETY: T is Pod: every bit pattern of its size is a valid value.
        Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const T) })
    }

    /// Checks that `[addr, addr + len)` lies in guest RAM.
    fn check(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        match addr.checked_add(len) {
            Some(end) if end <= self.ram_bytes() => Ok(()),
            _ => Err(MemoryError::OutOfRange {
                addr,
                len,
                size: self.ram_bytes(),
            }),
        }
    }
}

impl GuestRead for GuestMemory {
    fn ram_bytes(&self) -> u64 {
        self.size
    }
    fn read_bytes(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.read(addr, buf)
    }
}

/// Guest RAM of one engine.
#[derive(Debug)]
pub struct GuestMemory {
    host: NonNull<u8>,
    size: u64,
}

// SAFETY: the mapping is owned by this struct and lives until drop; concurrent access
// from vCPU threads is the guest's business (as on real hardware), and host-side accesses
// are copies or atomics.
unsafe impl Send for GuestMemory {}
// SAFETY: see above.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Maps `size` bytes of zero-filled, lazily allocated guest RAM.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(2 << 20) || size > flotilla_abi::RAM_MAX_BYTES {
            return Err(MemoryError::BadSize(size));
        }
        // SAFETY: anonymous private mapping; the result is checked below.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(MemoryError::Mmap {
                size,
                source: std::io::Error::last_os_error(),
            });
        }
        // Transparent huge pages cut the host's page-table work for big guests; a host
        // without THP just ignores the advice.
        // SAFETY: advising a range we just mapped.
        unsafe { libc::madvise(host, size as usize, libc::MADV_HUGEPAGE) };
        Ok(GuestMemory {
            host: NonNull::new(host as *mut u8).ok_or(MemoryError::BadSize(size))?,
            size,
        })
    }

    /// Asks the host for 4 KiB pages only. Distributed guest RAM moves 4 KiB pages with
    /// userfaultfd, which huge pages would only make split again.
    pub fn disable_huge_pages(&self) {
        // SAFETY: advising our own mapping; a host without THP ignores it.
        unsafe {
            libc::madvise(
                self.host.as_ptr() as *mut libc::c_void,
                self.size as usize,
                libc::MADV_NOHUGEPAGE,
            )
        };
    }

    /// Size of guest RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host address of guest-physical address 0 (for KVM memory-slot registration).
    pub fn host_address(&self) -> u64 {
        self.host.as_ptr() as u64
    }

    /// Checks that `[addr, addr + len)` lies in guest RAM and returns its host pointer.
    fn host_ptr(&self, addr: u64, len: u64) -> Result<*mut u8, MemoryError> {
        match addr.checked_add(len) {
            Some(end) if end <= self.size => {
                // SAFETY: addr < size, so the offset stays inside the mapping.
                Ok(unsafe { self.host.as_ptr().add(addr as usize) })
            }
            _ => Err(MemoryError::OutOfRange {
                addr,
                len,
                size: self.size,
            }),
        }
    }

    /// Checks that `[addr, addr + len)` lies in guest RAM.
    pub fn check_range(&self, addr: u64, len: u64) -> Result<(), MemoryError> {
        self.host_ptr(addr, len).map(|_| ())
    }

    /// Copies `buf.len()` bytes from guest RAM at `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let src = self.host_ptr(addr, buf.len() as u64)?;
        // SAFETY: the source range is inside the mapping (checked) and cannot overlap a
        // host buffer.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into guest RAM at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        let dst = self.host_ptr(addr, data.len() as u64)?;
        // SAFETY: the destination range is inside the mapping (checked).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// Reads a plain-data value at `addr`.
    pub fn read_obj<T: Pod>(&self, addr: u64) -> Result<T, MemoryError> {
        let src = self.host_ptr(addr, std::mem::size_of::<T>() as u64)?;
        // SAFETY: in range (checked); T is Pod, so any bytes form a valid value.
        Ok(unsafe { std::ptr::read_unaligned(src as *const T) })
    }

    /// Writes a plain-data value at `addr`.
    pub fn write_obj<T: Pod>(&self, addr: u64, value: &T) -> Result<(), MemoryError> {
        let dst = self.host_ptr(addr, std::mem::size_of::<T>() as u64)?;
        // SAFETY: in range (checked).
        unsafe { std::ptr::write_unaligned(dst as *mut T, *value) };
        Ok(())
    }

    /// The 4-byte aligned word at `addr`, for futex operations.
    pub fn atomic_u32(&self, addr: u64) -> Result<&AtomicU32, MemoryError> {
        if !addr.is_multiple_of(4) {
            return Err(MemoryError::Misaligned { addr, align: 4 });
        }
        let ptr = self.host_ptr(addr, 4)?;
        // SAFETY: in range and aligned; guest RAM lives as long as `self`, and atomics are
        // the right way to share a word with vCPUs that may write it concurrently.
        Ok(unsafe { &*(ptr as *const AtomicU32) })
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping this struct owns; no references outlive it.
        unsafe { libc::munmap(self.host.as_ptr() as *mut libc::c_void, self.size as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_validated() {
        assert!(matches!(GuestMemory::new(0), Err(MemoryError::BadSize(0))));
        assert!(matches!(
            GuestMemory::new(4096),
            Err(MemoryError::BadSize(_))
        ));
        assert!(matches!(
            GuestMemory::new(128 << 30),
            Err(MemoryError::BadSize(_))
        ));
    }

    #[test]
    fn accesses_are_bounds_checked() {
        let mem = GuestMemory::new(2 << 20).unwrap();
        mem.write(0x1000, b"hello").unwrap();
        let mut buf = [0u8; 5];
        mem.read(0x1000, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        let end = mem.size();
        assert!(matches!(
            mem.write(end - 2, b"abc"),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            mem.read_obj::<u64>(u64::MAX - 3),
            Err(MemoryError::OutOfRange { .. })
        ));
        assert!(matches!(
            mem.atomic_u32(0x1002),
            Err(MemoryError::Misaligned { .. })
        ));
        mem.write_obj(end - 8, &0xdead_beef_u64).unwrap();
        assert_eq!(mem.read_obj::<u64>(end - 8).unwrap(), 0xdead_beef);
    }

    #[test]
    fn sixteen_gib_is_lazy() {
        let mem = GuestMemory::new(16 << 30).unwrap();
        mem.write_obj((16 << 30) - 8, &1u64).unwrap();
        assert_eq!(mem.read_obj::<u64>(0).unwrap(), 0);
    }
}
