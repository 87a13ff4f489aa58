//! Sizes from the command line: memory sizes as people write them, and the guest RAM a
//! workload gets when none is given.

use flotilla_workloads::Prepared;

/// Guest RAM the engine keeps for itself, the image and the stacks, on top of what a
/// workload needs (rounded).
const ENGINE_HEADROOM_BYTES: u64 = 16 << 20;
/// Guest RAM of an external image, or of a small workload, when `--mem` is not given.
pub const MIN_DEFAULT_MEM_BYTES: u64 = 256 << 20;

/// Parses a memory size: bytes, or a number with K, M, G (binary units, optional "iB").
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 10),
        Some('m') => (&stripped[..stripped.len() - 1], 20),
        Some('g') => (&stripped[..stripped.len() - 1], 30),
        _ => (stripped, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 512M, 2G, 1073741824)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

/// Guest RAM a workload needs on `vcpus` vCPUs: its shared region plus the engine's
/// headroom, rounded to the 2 MiB granularity of guest RAM.
pub fn guest_mem_needed(prepared: &Prepared, vcpus: u32) -> u64 {
    (prepared.mem_bytes(vcpus as usize) as u64 + ENGINE_HEADROOM_BYTES).next_multiple_of(2 << 20)
}

/// Guest RAM a workload gets when no `--mem` is given.
pub fn default_guest_mem(prepared: &Prepared, vcpus: u32) -> u64 {
    guest_mem_needed(prepared, vcpus).max(MIN_DEFAULT_MEM_BYTES)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("16g"), Ok(16 << 30));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }
}
