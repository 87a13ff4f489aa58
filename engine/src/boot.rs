//! The boot layout: what the engine writes into guest RAM before the first instruction,
//! and where. Everything below `IMAGE_MIN_ADDR` is the engine's: the GDT, the boot info
//! page with the argument string, the return trampoline, and identity-mapping page
//! tables (2 MiB pages over all of RAM). Above the image come the vCPU stacks, and the
//! rest of RAM is the guest's free range. `flotilla-abi` holds the addresses.
//!
//! The lowest page of each stack is a guard page, not mapped in the guest's page tables
//! (the 2 MiB pages around guard pages are split into 4 KiB ones): a vCPU that overflows
//! its stack faults there instead of writing over the next stack down or the image.

use crate::loader::Image;
use crate::memory::{GuestMemory, MemoryError};
use flotilla_abi::*;
use x86_64::structures::gdt::DescriptorFlags;
use x86_64::structures::paging::PageTableFlags;

/// The GDT the engine installs: null, 64-bit user code (selector 0x0b), user data
/// (selector 0x13). Guests run at CPL 3: on PVM hosts (software-nested KVM) x87 and SSE
/// instructions raise #UD at CPL 0, and a unikernel guest needs no privilege anyway.
/// IOPL is 3, so the port I/O of hypercalls works.
pub const GDT: [u64; 3] = [
    0,
    DescriptorFlags::USER_CODE64.bits(),
    DescriptorFlags::USER_DATA.bits(),
];
pub const CODE_SELECTOR: u16 = 0x08 | 3;
pub const DATA_SELECTOR: u16 = 0x10 | 3;

/// Why a guest cannot be laid out.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{0} vCPUs requested; a guest has 1 to {VCPUS_MAX}")]
    VcpuCount(u32),
    #[error(
        "guest RAM of {ram} bytes is too small: the image ends at {image_end:#x} and {vcpus} stacks of \
         {stack_bytes} bytes need RAM up to {need:#x}"
    )]
    RamTooSmall {
        ram: u64,
        image_end: u64,
        vcpus: u32,
        stack_bytes: u64,
        need: u64,
    },
    #[error("guest RAM must be between {RAM_MIN_BYTES} and {RAM_MAX_BYTES} bytes and a multiple of 2 MiB, not {0}")]
    RamSize(u64),
    #[error(
        "the image and stacks end at {0:#x}, above 4 GiB: hypercall parameter blocks on the stack \
         must have 32-bit addresses; link the image lower or use fewer or smaller stacks"
    )]
    StacksAbove4GiB(u64),
    #[error("stack size {0} must be a multiple of 4096 bytes from 8 KiB (the lowest 4 KiB is a guard page) to 64 MiB")]
    StackSize(u64),
    #[error("argument string is {0} bytes; the most is {ARGS_MAX_BYTES}")]
    ArgsTooLong(usize),
    #[error("argument string contains a NUL byte")]
    ArgsNul,
    #[error("writing the boot layout: {0}")]
    Memory(#[from] MemoryError),
}

/// Where things go for one guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootLayout {
    pub vcpus: u32,
    pub ram_bytes: u64,
    pub entry: u64,
    pub image_start: u64,
    pub image_end: u64,
    pub stacks_start: u64,
    pub stack_bytes: u64,
    pub free_start: u64,
}

impl BootLayout {
    /// Lays out a guest with `vcpus` vCPUs around `image` in `ram_bytes` of RAM.
    pub fn new(
        image: &Image,
        vcpus: u32,
        ram_bytes: u64,
        stack_bytes: u64,
    ) -> Result<Self, BootError> {
        check_machine(vcpus, ram_bytes)?;
        if stack_bytes < 2 * PAGE_SIZE
            || !stack_bytes.is_multiple_of(PAGE_SIZE)
            || stack_bytes > 64 << 20
        {
            return Err(BootError::StackSize(stack_bytes));
        }
        let stacks_start = image.end().next_multiple_of(PAGE_SIZE);
        let need = stacks_start + vcpus as u64 * stack_bytes;
        if need > ram_bytes {
            return Err(BootError::RamTooSmall {
                ram: ram_bytes,
                image_end: image.end(),
                vcpus,
                stack_bytes,
                need,
            });
        }
        if need > 1 << 32 {
            return Err(BootError::StacksAbove4GiB(need));
        }
        Ok(BootLayout {
            vcpus,
            ram_bytes,
            entry: image.entry,
            image_start: image.start(),
            image_end: image.end(),
            stacks_start,
            stack_bytes,
            free_start: need,
        })
    }

    /// Initial stack pointer of `vcpu`: the top of its stack, minus the return address
    /// slot (so the entry function sees a normal SysV call frame).
    pub fn stack_pointer(&self, vcpu: u32) -> u64 {
        self.stacks_start + (vcpu as u64 + 1) * self.stack_bytes - 8
    }

    /// The guard page at the bottom of each vCPU's stack, by vCPU.
    pub fn guard_pages(&self) -> Vec<u64> {
        (0..self.vcpus as u64)
            .map(|v| self.stacks_start + v * self.stack_bytes)
            .collect()
    }

    /// The vCPU whose stack's guard page holds `addr`, if any.
    pub fn guard_of(&self, addr: u64) -> Option<u32> {
        let off = addr.checked_sub(self.stacks_start)?;
        let vcpu = off / self.stack_bytes;
        (vcpu < self.vcpus as u64 && off % self.stack_bytes < PAGE_SIZE).then_some(vcpu as u32)
    }

    /// The boot info the guest reads at `BOOT_INFO_ADDR`.
    pub fn boot_info(&self, args_len: usize) -> BootInfo {
        BootInfo {
            magic: BOOT_INFO_MAGIC,
            abi_version: ABI_VERSION,
            vcpu_count: self.vcpus,
            ram_bytes: self.ram_bytes,
            free_start: self.free_start,
            free_end: self.ram_bytes,
            image_start: self.image_start,
            image_end: self.image_end,
            stacks_start: self.stacks_start,
            stack_bytes: self.stack_bytes,
            args_addr: ARGS_ADDR,
            args_len: args_len as u64,
        }
    }

    /// Writes the GDT, boot info, argument string, trampoline, page tables and each
    /// vCPU's return address into guest RAM.
    pub fn write(&self, memory: &GuestMemory, args: &str) -> Result<(), BootError> {
        check_args(args)?;
        for (i, descriptor) in GDT.iter().enumerate() {
            memory.write_obj(GDT_ADDR + 8 * i as u64, descriptor)?;
        }
        memory.write_obj(BOOT_INFO_ADDR, &self.boot_info(args.len()))?;
        memory.write(ARGS_ADDR, args.as_bytes())?;
        memory.write(ARGS_ADDR + args.len() as u64, &[0])?;
        memory.write(RETURN_TRAMPOLINE_ADDR, &RETURN_TRAMPOLINE_CODE)?;
        write_page_tables(memory, self.ram_bytes, &self.guard_pages())?;
        for vcpu in 0..self.vcpus {
            memory.write_obj(self.stack_pointer(vcpu), &RETURN_TRAMPOLINE_ADDR)?;
        }
        Ok(())
    }
}

/// Checks the vCPU count and RAM size a guest asks for.
pub fn check_machine(vcpus: u32, ram_bytes: u64) -> Result<(), BootError> {
    if vcpus == 0 || vcpus > VCPUS_MAX {
        return Err(BootError::VcpuCount(vcpus));
    }
    if !(RAM_MIN_BYTES..=RAM_MAX_BYTES).contains(&ram_bytes) || !ram_bytes.is_multiple_of(2 << 20) {
        return Err(BootError::RamSize(ram_bytes));
    }
    Ok(())
}

/// Checks an argument string against the boot info page's limits.
pub fn check_args(args: &str) -> Result<(), BootError> {
    if args.len() as u64 > ARGS_MAX_BYTES {
        return Err(BootError::ArgsTooLong(args.len()));
    }
    if args.contains('\0') {
        return Err(BootError::ArgsNul);
    }
    Ok(())
}

/// Identity map of `[0, ram_bytes)` with 2 MiB pages: PML4 → one PDPT → one PD per GiB,
/// except that the 2 MiB pages holding a guard page get a table of 4 KiB pages (after the
/// PDs of the largest RAM), in which the guard pages are not present.
fn write_page_tables(
    memory: &GuestMemory,
    ram_bytes: u64,
    guards: &[u64],
) -> Result<(), MemoryError> {
    // Accessed and dirty are preset so walks never write the tables. The engine's own
    // first 2 MiB (GDT, boot info, page tables) is read-only to the guest: every node of
    // a cluster keeps a private copy of it, outside page coherence.
    let table = PageTableFlags::PRESENT
        | PageTableFlags::WRITABLE
        | PageTableFlags::USER_ACCESSIBLE
        | PageTableFlags::ACCESSED;
    let huge = table | PageTableFlags::HUGE_PAGE | PageTableFlags::DIRTY;
    let engine_area = huge - PageTableFlags::WRITABLE - PageTableFlags::DIRTY;
    let pml4 = PAGE_TABLES_ADDR;
    let pdpt = pml4 + PAGE_SIZE;
    let pds = pdpt + PAGE_SIZE;
    let pts = pds + RAM_MAX_BYTES.div_ceil(1 << 30) * PAGE_SIZE;
    let mut split: Vec<u64> = guards.iter().map(|g| g & !((2 << 20) - 1)).collect();
    split.dedup();
    // At most one table per vCPU, inside the engine's area.
    debug_assert!(pts + split.len() as u64 * PAGE_SIZE <= IMAGE_MIN_ADDR);
    let small = table | PageTableFlags::DIRTY;
    memory.write_obj(pml4, &(pdpt | table.bits()))?;
    let gibs = ram_bytes.div_ceil(1 << 30);
    for g in 0..gibs {
        let pd = pds + g * PAGE_SIZE;
        memory.write_obj(pdpt + 8 * g, &(pd | table.bits()))?;
        for e in 0..512u64 {
            let addr = (g << 30) | (e << 21);
            if addr >= ram_bytes {
                break;
            }
            if let Some(i) = split.iter().position(|&r| r == addr) {
                let pt = pts + i as u64 * PAGE_SIZE;
                for p in 0..512u64 {
                    let page = addr + p * PAGE_SIZE;
                    let entry = if guards.contains(&page) {
                        0
                    } else {
                        page | small.bits()
                    };
                    memory.write_obj(pt + 8 * p, &entry)?;
                }
                memory.write_obj(pd + 8 * e, &(pt | table.bits()))?;
                continue;
            }
            let flags = if addr < IMAGE_MIN_ADDR {
                engine_area
            } else {
                huge
            };
            memory.write_obj(pd + 8 * e, &(addr | flags.bits()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::tests::elf;

    #[test]
    fn stacks_follow_the_image_and_ram_is_checked() {
        let bytes = elf(0x40_0000, &[(1, 5, 0x40_0000, 0x100, 0x1800)]);
        let image = Image::parse(&bytes, 8 << 20).unwrap();
        let layout = BootLayout::new(&image, 4, 8 << 20, 64 << 10).unwrap();
        assert_eq!(layout.stacks_start, 0x40_2000);
        assert_eq!(layout.free_start, 0x40_2000 + 4 * (64 << 10));
        assert_eq!(
            layout.stack_pointer(0) % 16,
            8,
            "SysV: rsp+8 is 16-aligned at entry"
        );
        assert!(matches!(
            BootLayout::new(&image, 64, 8 << 20, 64 << 10),
            Err(BootError::RamTooSmall { .. })
        ));
        assert!(matches!(
            BootLayout::new(&image, 0, 8 << 20, 4096),
            Err(BootError::VcpuCount(0))
        ));
        assert!(matches!(
            BootLayout::new(&image, 65, 8 << 20, 4096),
            Err(BootError::VcpuCount(65))
        ));
        assert!(matches!(
            BootLayout::new(&image, 1, 8 << 20, 100),
            Err(BootError::StackSize(100))
        ));
    }

    #[test]
    fn page_tables_identity_map_ram() {
        let memory = GuestMemory::new(3 << 30).unwrap();
        write_page_tables(&memory, 3 << 30, &[]).unwrap();
        let pdpt = memory.read_obj::<u64>(PAGE_TABLES_ADDR).unwrap() & !0xFFF;
        let pd2 = memory.read_obj::<u64>(pdpt + 16).unwrap() & !0xFFF;
        let last = memory.read_obj::<u64>(pd2 + 8 * 511).unwrap();
        assert_eq!(last & !0xFFF, (2 << 30) + 511 * (2 << 20));
        assert_eq!(
            memory.read_obj::<u64>(pdpt + 24).unwrap(),
            0,
            "nothing mapped past RAM"
        );
    }

    #[test]
    fn each_stack_starts_with_an_unmapped_guard_page() {
        let bytes = elf(0x40_0000, &[(1, 5, 0x40_0000, 0x100, 0x1800)]);
        let image = Image::parse(&bytes, 8 << 20).unwrap();
        let layout = BootLayout::new(&image, 3, 8 << 20, 64 << 10).unwrap();
        let guards = layout.guard_pages();
        assert_eq!(guards, [0x40_2000, 0x41_2000, 0x42_2000]);
        assert_eq!(layout.guard_of(0x41_2fff), Some(1));
        assert_eq!(layout.guard_of(0x41_3000), None, "the stack proper");
        assert_eq!(layout.guard_of(0x40_1000), None, "the image");
        assert_eq!(layout.guard_of(0x43_2000), None, "free memory");
        let memory = GuestMemory::new(8 << 20).unwrap();
        write_page_tables(&memory, 8 << 20, &guards).unwrap();
        // Walk 4 KiB translations: PML4 → PDPT → PD → PT.
        let entry = |table: u64, i: u64| memory.read_obj::<u64>(table + 8 * i).unwrap();
        let pdpt = entry(PAGE_TABLES_ADDR, 0) & !0xFFF;
        let pd = entry(pdpt, 0) & !0xFFF;
        let pde = entry(pd, 2); // 4 MiB .. 6 MiB
        assert_eq!(
            pde & PageTableFlags::HUGE_PAGE.bits(),
            0,
            "split into 4 KiB pages"
        );
        let pt = pde & !0xFFF;
        for page in 0..512u64 {
            let addr = (4 << 20) + page * PAGE_SIZE;
            let pte = entry(pt, page);
            if guards.contains(&addr) {
                assert_eq!(pte, 0, "{addr:#x} is a guard page");
            } else {
                assert_eq!(pte & !0xFFF, addr, "{addr:#x} identity-mapped");
                assert_ne!(pte & PageTableFlags::PRESENT.bits(), 0);
            }
        }
        assert_ne!(
            entry(pd, 3) & PageTableFlags::HUGE_PAGE.bits(),
            0,
            "6 MiB: no guard"
        );
        assert!(matches!(
            BootLayout::new(&image, 1, 8 << 20, 4096),
            Err(BootError::StackSize(4096))
        ));
    }

    #[test]
    fn args_are_checked() {
        assert!(check_args("n=1").is_ok());
        assert!(matches!(check_args("a\0b"), Err(BootError::ArgsNul)));
        let long = "x".repeat(ARGS_MAX_BYTES as usize + 1);
        assert!(matches!(check_args(&long), Err(BootError::ArgsTooLong(_))));
    }
}
