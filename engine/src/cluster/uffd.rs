//! userfaultfd over guest RAM, in the mode docs/host-kvm.md describes: with
//! `UFFD_FEATURE_SIGBUS`, a guest access to a page that is not installed comes back to
//! the vCPU thread as an MMIO exit at the faulting instruction (no handler thread, no
//! blocking in the kernel), and a write to a write-protected page does the same. The
//! engine installs pages with `UFFDIO_COPY` (optionally write-protected, for read-only
//! replicas), flips protection with `UFFDIO_WRITEPROTECT`, and drops pages with
//! `MADV_DONTNEED`, after which they are missing again.
//!
//! The ioctl numbers and structures are declared here (libc has none) and checked
//! against the kernel's `_IOWR` encoding at compile time.

use crate::memory::GuestMemory;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;
const UFFDIO_COPY_MODE_WP: u64 = 2;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}
const UFFDIO_API: u64 = iowr(0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, std::mem::size_of::<UffdioWriteprotect>());
// The values <linux/userfaultfd.h> gives on x86-64.
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_COPY == 0xc028_aa03);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);

/// Most bytes of zeros installed by one `UFFDIO_COPY`.
const ZERO_RUN_BYTES: usize = 64 << 10;

pub const PAGE: u64 = 4096;

/// A failed userfaultfd call, naming the call and the guest page.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error(
        "cannot create a userfaultfd: {0}. The distributed engine needs userfaultfd \
         (root, or vm.unprivileged_userfaultfd=1)"
    )]
    Create(std::io::Error),
    #[error("userfaultfd {op} failed: {source}")]
    Setup {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("the kernel's userfaultfd lacks SIGBUS mode (features {0:#x})")]
    NoSigbus(u64),
    #[error("userfaultfd {op} on guest page {gpa:#x} failed: {source}")]
    Page {
        op: &'static str,
        gpa: u64,
        source: std::io::Error,
    },
}

/// userfaultfd registered over `[start, end)` of one guest's RAM.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
    host: u64,
    start: u64,
    end: u64,
}

impl Userfault {
    /// Registers guest-physical `[start, end)` (page aligned) for missing and
    /// write-protect faults in SIGBUS mode.
    pub fn register(memory: &GuestMemory, start: u64, end: u64) -> Result<Self, UffdError> {
        // SAFETY: plain syscall; the result is checked.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if raw < 0 {
            return Err(UffdError::Create(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        let uffd = Userfault {
            fd,
            host: memory.host_address(),
            start,
            end,
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_SIGBUS,
            ioctls: 0,
        };
        uffd.ioctl(UFFDIO_API, &mut api)
            .map_err(|source| UffdError::Setup {
                op: "UFFDIO_API",
                source,
            })?;
        if api.features & UFFD_FEATURE_SIGBUS == 0 {
            return Err(UffdError::NoSigbus(api.features));
        }
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: uffd.host + start,
                len: end - start,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        uffd.ioctl(UFFDIO_REGISTER, &mut reg)
            .map_err(|source| UffdError::Setup {
                op: "UFFDIO_REGISTER",
                source,
            })?;
        Ok(uffd)
    }

    fn ioctl<T>(&self, request: u64, arg: &mut T) -> std::io::Result<()> {
        // SAFETY: `arg` is the repr(C) structure `request` expects (sizes are part of the
        // checked request numbers), valid for the call.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, arg as *mut T) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn check(&self, gpa: u64, len: u64) {
        debug_assert!(gpa.is_multiple_of(PAGE) && gpa >= self.start && gpa + len <= self.end);
    }

    /// Installs `data` at the missing page `gpa`, write-protected if `read_only`.
    pub fn install(
        &self,
        gpa: u64,
        data: &[u8; PAGE as usize],
        read_only: bool,
    ) -> Result<(), UffdError> {
        self.check(gpa, PAGE);
        let mut copy = UffdioCopy {
            dst: self.host + gpa,
            src: data.as_ptr() as u64,
            len: PAGE,
            mode: if read_only { UFFDIO_COPY_MODE_WP } else { 0 },
            copy: 0,
        };
        self.ioctl(UFFDIO_COPY, &mut copy)
            .map_err(|source| UffdError::Page {
                op: "UFFDIO_COPY",
                gpa,
                source,
            })
    }

    /// Installs zeros at the missing pages `[gpa, gpa + len)`, write-protected if
    /// `read_only`, in one call.
    pub fn install_zeros(&self, gpa: u64, len: u64, read_only: bool) -> Result<(), UffdError> {
        static ZEROS: [u8; ZERO_RUN_BYTES] = [0; ZERO_RUN_BYTES];
        self.check(gpa, len);
        let (mut done, mut retries) = (0, 0);
        while done < len {
            let n = (len - done).min(ZERO_RUN_BYTES as u64);
            let mut copy = UffdioCopy {
                dst: self.host + gpa + done,
                src: ZEROS.as_ptr() as u64,
                len: n,
                mode: if read_only { UFFDIO_COPY_MODE_WP } else { 0 },
                copy: 0,
            };
            match self.ioctl(UFFDIO_COPY, &mut copy) {
                Ok(()) => done += n,
                // A range copy may stop part way (EAGAIN, `copy` says how far it got).
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && retries < 100 => {
                    retries += 1;
                    done += copy.copy.max(0) as u64;
                }
                Err(source) => {
                    return Err(UffdError::Page {
                        op: "UFFDIO_COPY",
                        gpa: gpa + done,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Write-protects (or unprotects) the installed pages `[gpa, gpa + len)`.
    pub fn protect(&self, gpa: u64, len: u64, read_only: bool) -> Result<(), UffdError> {
        self.check(gpa, len);
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: self.host + gpa,
                len,
            },
            mode: if read_only {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        self.ioctl(UFFDIO_WRITEPROTECT, &mut wp)
            .map_err(|source| UffdError::Page {
                op: "UFFDIO_WRITEPROTECT",
                gpa,
                source,
            })
    }

    /// Drops pages `[gpa, gpa + len)`: they are missing again.
    pub fn drop_pages(&self, gpa: u64, len: u64) -> Result<(), UffdError> {
        self.check(gpa, len);
        // SAFETY: a page-aligned range inside guest RAM; guest RAM is private anonymous
        // memory, whose contents the engine owns.
        let r = unsafe {
            libc::madvise(
                (self.host + gpa) as *mut libc::c_void,
                len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if r < 0 {
            return Err(UffdError::Page {
                op: "MADV_DONTNEED",
                gpa,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Which pages of `[gpa, gpa + len)` are installed (mincore).
    pub fn resident(&self, gpa: u64, len: u64) -> Result<Vec<bool>, UffdError> {
        self.check(gpa, len);
        let mut vec = vec![0u8; (len / PAGE) as usize];
        // SAFETY: the range is inside guest RAM's mapping; `vec` has one byte per page.
        let r = unsafe {
            libc::mincore(
                (self.host + gpa) as *mut libc::c_void,
                len as usize,
                vec.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(UffdError::Page {
                op: "mincore",
                gpa,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
    }
}
