//! The workload suite as Flotilla guest images. `build.rs` compiles each workload of
//! `flotilla-workloads` into a static ELF64 guest; this crate embeds them.

use flotilla_workloads::Workload;

/// The remote-fault probe of `flotilla bench fault-latency` (`guests/c/pull.c`):
/// arguments "PAGES PASSES"; vCPU 0 writes the pages and idles, vCPU 1 reads them.
pub const PULL_PROBE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pull.elf"));

/// The guest image (ELF64) that runs `workload`.
pub fn image(workload: Workload) -> &'static [u8] {
    match workload {
        Workload::Stream => include_bytes!(concat!(env!("OUT_DIR"), "/stream.elf")),
        Workload::Matmul => include_bytes!(concat!(env!("OUT_DIR"), "/matmul.elf")),
        Workload::Bfs => include_bytes!(concat!(env!("OUT_DIR"), "/bfs.elf")),
        Workload::Kvstore => include_bytes!(concat!(env!("OUT_DIR"), "/kvstore.elf")),
        Workload::Sort => include_bytes!(concat!(env!("OUT_DIR"), "/sort.elf")),
        Workload::Queue => include_bytes!(concat!(env!("OUT_DIR"), "/queue.elf")),
        Workload::Chase => include_bytes!(concat!(env!("OUT_DIR"), "/chase.elf")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_workload_has_a_static_x86_64_elf() {
        for w in Workload::ALL {
            let elf = image(w);
            assert_eq!(&elf[..4], b"\x7fELF", "{}", w.name());
            assert_eq!(elf[4], 2, "{} is not ELF64", w.name());
            assert_eq!(
                u16::from_le_bytes([elf[16], elf[17]]),
                2,
                "{} is not ET_EXEC",
                w.name()
            );
            assert_eq!(
                u16::from_le_bytes([elf[18], elf[19]]),
                62,
                "{} is not x86-64",
                w.name()
            );
        }
    }
}
