//! What the CLI integration tests share: running `flotilla`, the KVM guard, parsing its
//! JSON, and building the C guests the way docs/guest-abi.md tells a programmer to.
#![allow(dead_code)] // Each test file uses its own subset.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn flotilla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .output()
        .expect("flotilla runs")
}

pub fn kvm() -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
    {
        return true;
    }
    if std::env::var("FLOTILLA_SKIP_KVM").as_deref() == Ok("1") {
        eprintln!("SKIPPED: /dev/kvm is not usable and FLOTILLA_SKIP_KVM=1");
        return false;
    }
    panic!("this test needs read-write /dev/kvm; set FLOTILLA_SKIP_KVM=1 to skip KVM tests");
}

/// Stdout as the one JSON object it must be.
pub fn json(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON object ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds guests/c/NAME.c with gcc into a temporary ELF file.
pub fn build_c(name: &str) -> PathBuf {
    let out = std::env::temp_dir().join(format!("flotilla-{name}-{}.elf", std::process::id()));
    let status = Command::new("gcc")
        .args([
            "-ffreestanding",
            "-nostdlib",
            "-static",
            "-fno-pie",
            "-no-pie",
            "-O2",
            "-fno-stack-protector",
        ])
        .arg("-I")
        .arg(repo().join("guests/include"))
        .args(["-Wl,-Ttext-segment=0x400000", "-Wl,--build-id=none", "-o"])
        .arg(&out)
        .arg(repo().join(format!("guests/c/{name}.c")))
        .status()
        .expect("gcc runs (apt-get install gcc)");
    assert!(status.success(), "building guests/c/{name}.c failed");
    out
}

/// The processes `pid` started (a launcher's node processes).
pub fn children(pid: u32) -> Vec<u32> {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    text.split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The one of `pids` that is `flotilla node … --id ID` (the launcher puts `--id` last).
pub fn node_with_id(pids: &[u32], id: u16) -> Option<u32> {
    let tail = format!("--id\0{id}\0");
    pids.iter().copied().find(|p| {
        std::fs::read(format!("/proc/{p}/cmdline"))
            .unwrap_or_default()
            .ends_with(tail.as_bytes())
    })
}

/// Sends signal `sig` to a process the test started (or one its child started).
pub fn signal(pid: u32, sig: i32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: kill has no memory-safety preconditions; the pid is one of the test's own
    // processes.
    unsafe { kill(pid as i32, sig) };
}

/// `n` distinct free loopback addresses, for a hand-written cluster configuration.
pub fn loopback_addrs(n: usize) -> Vec<String> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect()
}
