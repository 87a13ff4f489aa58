//! ELF64 guest image loading. [`Image::parse`] validates an image against the guest's RAM
//! size without touching memory (so it can be fuzzed on its own); [`Image::load`] then
//! copies the segments into guest RAM.
//!
//! Rules (docs/guest-abi.md, "Image layout"): a static (ET_EXEC) little-endian x86-64
//! ELF64; PT_LOAD segments inside `[IMAGE_MIN_ADDR, RAM size)`, not overlapping each
//! other; the entry point inside an executable loaded segment; no interpreter and no
//! dynamic section. Segments are placed at their virtual addresses (RAM is identity
//! mapped).

use crate::memory::{GuestMemory, MemoryError};
use flotilla_abi::IMAGE_MIN_ADDR;
use goblin::container::{Container, Ctx, Endian};
use goblin::elf::header::{self, Header};
use goblin::elf::program_header::{self, ProgramHeader};

/// Size of an ELF64 file header and of one ELF64 program header.
const EHDR_BYTES: usize = 64;
const PHDR_BYTES: usize = 56;

/// Most PT_LOAD segments an image may have.
pub const MAX_SEGMENTS: usize = 64;

/// Why an image cannot be loaded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoadError {
    #[error("image is {0} bytes, too short for an ELF header")]
    Truncated(usize),
    #[error("not an ELF file (bad magic)")]
    BadMagic,
    #[error("not a 64-bit ELF (class {0})")]
    NotElf64(u8),
    #[error("not a little-endian ELF")]
    NotLittleEndian,
    #[error("not an x86-64 image (machine {0})")]
    NotX86_64(u16),
    #[error("image type {0} is not ET_EXEC: link the guest static and non-PIE (-static -no-pie)")]
    NotExecutable(u16),
    #[error("malformed ELF header or program headers: {0}")]
    Malformed(String),
    #[error("program header table is not 56-byte ELF64 entries (e_phentsize {0})")]
    BadPhentsize(u16),
    #[error("image has no PT_LOAD segment")]
    NoSegments,
    #[error("image has {0} PT_LOAD segments, more than the {MAX_SEGMENTS} allowed")]
    TooManySegments(usize),
    #[error("image is dynamically linked (has PT_INTERP or PT_DYNAMIC): link it static")]
    Dynamic,
    #[error("segment {index}: file size {filesz:#x} exceeds memory size {memsz:#x}")]
    FileLargerThanMemory {
        index: usize,
        filesz: u64,
        memsz: u64,
    },
    #[error("segment {index}: file bytes [{offset:#x}, +{filesz:#x}) run past the end of the {len}-byte image")]
    SegmentPastFileEnd {
        index: usize,
        offset: u64,
        filesz: u64,
        len: usize,
    },
    #[error("segment {index} [{start:#x}, {end:#x}) lies outside guest RAM [{min:#x}, {ram:#x})")]
    SegmentOutsideRam {
        index: usize,
        start: u64,
        end: u64,
        min: u64,
        ram: u64,
    },
    #[error("segments {first} and {second} overlap at [{start:#x}, {end:#x})")]
    SegmentsOverlap {
        first: usize,
        second: usize,
        start: u64,
        end: u64,
    },
    #[error("entry point {0:#x} is not inside an executable loaded segment")]
    EntryOutsideSegments(u64),
    #[error("writing the image into guest RAM: {0}")]
    Memory(String),
}

impl From<MemoryError> for LoadError {
    fn from(e: MemoryError) -> Self {
        LoadError::Memory(e.to_string())
    }
}

/// One loadable segment: `file_range` of the image goes to guest address `addr`, and
/// `[addr + file_range.len(), addr + mem_bytes)` is zero-filled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub mem_bytes: u64,
    pub file_range: std::ops::Range<usize>,
    pub executable: bool,
}

/// A validated guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image<'a> {
    bytes: &'a [u8],
    pub entry: u64,
    pub segments: Vec<Segment>,
}

impl<'a> Image<'a> {
    /// Validates `bytes` as a guest image for a guest with `ram_bytes` of RAM.
    pub fn parse(bytes: &'a [u8], ram_bytes: u64) -> Result<Self, LoadError> {
        if bytes.len() < EHDR_BYTES {
            return Err(LoadError::Truncated(bytes.len()));
        }
        if &bytes[..4] != header::ELFMAG {
            return Err(LoadError::BadMagic);
        }
        if bytes[header::EI_CLASS] != header::ELFCLASS64 {
            return Err(LoadError::NotElf64(bytes[header::EI_CLASS]));
        }
        if bytes[header::EI_DATA] != header::ELFDATA2LSB {
            return Err(LoadError::NotLittleEndian);
        }
        let hdr = goblin::elf::Elf::parse_header(bytes)
            .map_err(|e| LoadError::Malformed(e.to_string()))?;
        check_header(&hdr)?;
        let ctx = Ctx::new(Container::Big, Endian::Little);
        let phoff = usize::try_from(hdr.e_phoff)
            .map_err(|_| LoadError::Malformed("e_phoff too large".into()))?;
        let table_end = (hdr.e_phnum as usize)
            .checked_mul(hdr.e_phentsize as usize)
            .and_then(|n| n.checked_add(phoff));
        if table_end.is_none_or(|end| end > bytes.len()) {
            return Err(LoadError::Malformed(format!(
                "program header table at {phoff:#x} ({} entries) runs past the end of the {}-byte image",
                hdr.e_phnum,
                bytes.len()
            )));
        }
        let phdrs = ProgramHeader::parse(bytes, phoff, hdr.e_phnum as usize, ctx)
            .map_err(|e| LoadError::Malformed(e.to_string()))?;
        if phdrs.iter().any(|p| {
            p.p_type == program_header::PT_INTERP || p.p_type == program_header::PT_DYNAMIC
        }) {
            return Err(LoadError::Dynamic);
        }
        let loads: Vec<&ProgramHeader> = phdrs
            .iter()
            .filter(|p| p.p_type == program_header::PT_LOAD)
            .collect();
        if loads.is_empty() {
            return Err(LoadError::NoSegments);
        }
        if loads.len() > MAX_SEGMENTS {
            return Err(LoadError::TooManySegments(loads.len()));
        }
        let mut segments = Vec::with_capacity(loads.len());
        for (index, p) in loads.iter().enumerate() {
            segments.push(check_segment(index, p, bytes.len(), ram_bytes)?);
        }
        for (i, a) in segments.iter().enumerate() {
            for (j, b) in segments.iter().enumerate().skip(i + 1) {
                let (start, end) = (
                    a.addr.max(b.addr),
                    (a.addr + a.mem_bytes).min(b.addr + b.mem_bytes),
                );
                if start < end {
                    return Err(LoadError::SegmentsOverlap {
                        first: i,
                        second: j,
                        start,
                        end,
                    });
                }
            }
        }
        let entry = hdr.e_entry;
        if !segments
            .iter()
            .any(|s| s.executable && entry >= s.addr && entry < s.addr + s.mem_bytes)
        {
            return Err(LoadError::EntryOutsideSegments(entry));
        }
        Ok(Image {
            bytes,
            entry,
            segments,
        })
    }

    /// Lowest guest address the image occupies.
    pub fn start(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.addr)
            .min()
            .unwrap_or(IMAGE_MIN_ADDR)
    }

    /// End (exclusive) of the highest segment.
    pub fn end(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| s.addr + s.mem_bytes)
            .max()
            .unwrap_or(IMAGE_MIN_ADDR)
    }

    /// Copies the segments into guest RAM and zero-fills their tails.
    pub fn load(&self, memory: &GuestMemory) -> Result<(), LoadError> {
        for s in &self.segments {
            let file = &self.bytes[s.file_range.clone()];
            memory.write(s.addr, file)?;
            let tail = s.mem_bytes - file.len() as u64;
            if tail > 0 {
                zero(memory, s.addr + file.len() as u64, tail)?;
            }
        }
        Ok(())
    }
}

fn zero(memory: &GuestMemory, mut addr: u64, mut len: u64) -> Result<(), MemoryError> {
    const ZEROS: [u8; 4096] = [0; 4096];
    while len > 0 {
        let n = len.min(ZEROS.len() as u64);
        memory.write(addr, &ZEROS[..n as usize])?;
        addr += n;
        len -= n;
    }
    Ok(())
}

fn check_header(hdr: &Header) -> Result<(), LoadError> {
    if hdr.e_machine != header::EM_X86_64 {
        return Err(LoadError::NotX86_64(hdr.e_machine));
    }
    if hdr.e_type != header::ET_EXEC {
        return Err(LoadError::NotExecutable(hdr.e_type));
    }
    if hdr.e_phnum > 0 && hdr.e_phentsize as usize != PHDR_BYTES {
        return Err(LoadError::BadPhentsize(hdr.e_phentsize));
    }
    Ok(())
}

fn check_segment(
    index: usize,
    p: &ProgramHeader,
    file_len: usize,
    ram: u64,
) -> Result<Segment, LoadError> {
    let (offset, filesz, memsz) = (p.p_offset, p.p_filesz, p.p_memsz);
    if filesz > memsz {
        return Err(LoadError::FileLargerThanMemory {
            index,
            filesz,
            memsz,
        });
    }
    let file_end = offset
        .checked_add(filesz)
        .filter(|&end| end <= file_len as u64);
    let Some(file_end) = file_end else {
        return Err(LoadError::SegmentPastFileEnd {
            index,
            offset,
            filesz,
            len: file_len,
        });
    };
    let start = p.p_vaddr;
    let end = start.checked_add(memsz);
    match end {
        Some(end) if start >= IMAGE_MIN_ADDR && end <= ram => Ok(Segment {
            addr: start,
            mem_bytes: memsz,
            file_range: offset as usize..file_end as usize,
            executable: p.p_flags & program_header::PF_X != 0,
        }),
        _ => Err(LoadError::SegmentOutsideRam {
            index,
            start,
            end: end.unwrap_or(u64::MAX),
            min: IMAGE_MIN_ADDR,
            ram,
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a minimal ELF64 image: header, `phdrs` (type, flags, vaddr, filesz, memsz),
    /// and 4 KiB of code at file offset 0x1000 for every segment.
    pub fn elf(entry: u64, phdrs: &[(u32, u32, u64, u64, u64)]) -> Vec<u8> {
        let mut b = vec![0u8; 0x2000];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[20..24].copy_from_slice(&1u32.to_le_bytes());
        b[24..32].copy_from_slice(&entry.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[52..54].copy_from_slice(&64u16.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        for (i, &(ty, flags, vaddr, filesz, memsz)) in phdrs.iter().enumerate() {
            let o = 64 + i * 56;
            b[o..o + 4].copy_from_slice(&ty.to_le_bytes());
            b[o + 4..o + 8].copy_from_slice(&flags.to_le_bytes());
            b[o + 8..o + 16].copy_from_slice(&0x1000u64.to_le_bytes());
            b[o + 16..o + 24].copy_from_slice(&vaddr.to_le_bytes());
            b[o + 24..o + 32].copy_from_slice(&vaddr.to_le_bytes());
            b[o + 32..o + 40].copy_from_slice(&filesz.to_le_bytes());
            b[o + 40..o + 48].copy_from_slice(&memsz.to_le_bytes());
        }
        b
    }

    const RAM: u64 = 64 << 20;
    const RX: u32 = 5;
    const LOAD: u32 = 1;

    #[test]
    fn accepts_a_minimal_image() {
        let bytes = elf(0x40_0000, &[(LOAD, RX, 0x40_0000, 0x100, 0x2000)]);
        let image = Image::parse(&bytes, RAM).unwrap();
        assert_eq!(image.entry, 0x40_0000);
        assert_eq!((image.start(), image.end()), (0x40_0000, 0x40_2000));
        let mem = GuestMemory::new(RAM).unwrap();
        mem.write(0x40_0100, &[0xAA; 16]).unwrap();
        image.load(&mem).unwrap();
        let mut tail = [0xFFu8; 16];
        mem.read(0x40_0100, &mut tail).unwrap();
        assert_eq!(tail, [0; 16], "bss tail is zeroed");
    }

    #[test]
    fn rejects_bad_images_with_named_errors() {
        let ok = elf(0x40_0000, &[(LOAD, RX, 0x40_0000, 0x100, 0x100)]);
        assert_eq!(Image::parse(&ok[..10], RAM), Err(LoadError::Truncated(10)));
        let mut bad = ok.clone();
        bad[0] = 0;
        assert_eq!(Image::parse(&bad, RAM), Err(LoadError::BadMagic));
        let mut bad = ok.clone();
        bad[4] = 1;
        assert_eq!(Image::parse(&bad, RAM), Err(LoadError::NotElf64(1)));
        let mut bad = ok.clone();
        bad[18] = 183; // aarch64
        assert_eq!(Image::parse(&bad, RAM), Err(LoadError::NotX86_64(183)));
        let mut bad = ok.clone();
        bad[16] = 3; // ET_DYN
        assert_eq!(Image::parse(&bad, RAM), Err(LoadError::NotExecutable(3)));
        // Program header table cut off.
        assert!(matches!(
            Image::parse(&ok[..80], RAM),
            Err(LoadError::Malformed(_))
        ));

        let outside = elf(0x40_0000, &[(LOAD, RX, RAM - 0x80, 0x100, 0x100)]);
        assert!(matches!(
            Image::parse(&outside, RAM),
            Err(LoadError::SegmentOutsideRam { .. })
        ));
        let low = elf(0x1000, &[(LOAD, RX, 0x1000, 0x100, 0x100)]);
        assert!(matches!(
            Image::parse(&low, RAM),
            Err(LoadError::SegmentOutsideRam { .. })
        ));
        let wrap = elf(0x40_0000, &[(LOAD, RX, u64::MAX - 0x10, 0x100, 0x100)]);
        assert!(matches!(
            Image::parse(&wrap, RAM),
            Err(LoadError::SegmentOutsideRam { .. })
        ));
        let overlap = elf(
            0x40_0000,
            &[
                (LOAD, RX, 0x40_0000, 0x100, 0x2000),
                (LOAD, 6, 0x40_1000, 0x100, 0x100),
            ],
        );
        assert!(matches!(
            Image::parse(&overlap, RAM),
            Err(LoadError::SegmentsOverlap {
                first: 0,
                second: 1,
                ..
            })
        ));
        let entry = elf(0x50_0000, &[(LOAD, RX, 0x40_0000, 0x100, 0x100)]);
        assert_eq!(
            Image::parse(&entry, RAM),
            Err(LoadError::EntryOutsideSegments(0x50_0000))
        );
        let data_entry = elf(0x40_0000, &[(LOAD, 6, 0x40_0000, 0x100, 0x100)]);
        assert_eq!(
            Image::parse(&data_entry, RAM),
            Err(LoadError::EntryOutsideSegments(0x40_0000))
        );
        let past_end = elf(0x40_0000, &[(LOAD, RX, 0x40_0000, 0x10_0000, 0x10_0000)]);
        assert!(matches!(
            Image::parse(&past_end, RAM),
            Err(LoadError::SegmentPastFileEnd { .. })
        ));
        let bigger = elf(0x40_0000, &[(LOAD, RX, 0x40_0000, 0x200, 0x100)]);
        assert!(matches!(
            Image::parse(&bigger, RAM),
            Err(LoadError::FileLargerThanMemory { .. })
        ));
        let none = elf(0x40_0000, &[(4, 0, 0, 0, 0)]);
        assert_eq!(Image::parse(&none, RAM), Err(LoadError::NoSegments));
        let dynamic = elf(
            0x40_0000,
            &[(LOAD, RX, 0x40_0000, 0x100, 0x100), (3, 4, 0, 0, 0)],
        );
        assert_eq!(Image::parse(&dynamic, RAM), Err(LoadError::Dynamic));
    }
}
