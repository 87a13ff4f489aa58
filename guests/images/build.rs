//! Builds the workload suite as Flotilla guest images with the same stable toolchain and
//! the x86_64-unknown-linux-gnu target as the rest of the workspace: `no_std`, `no_main`,
//! static, no start files, linked at 4 MiB by `guest/guest.ld`. The guest crates have no
//! dependencies, so plain `rustc` calls suffice (no nested cargo, no lock contention).

use std::path::{Path, PathBuf};
use std::process::Command;

const WORKLOADS: [&str; 7] = [
    "stream", "matmul", "bfs", "kvstore", "sort", "queue", "chase",
];

fn rustc(out: &Path) -> Command {
    let mut cmd = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()));
    cmd.args(["--edition", "2021", "--target", "x86_64-unknown-linux-gnu"])
        .args([
            "-C",
            "opt-level=3",
            "-C",
            "panic=abort",
            "-C",
            "relocation-model=static",
        ])
        .args(["-C", "debuginfo=1", "--cap-lints", "warn"])
        .arg("-L")
        .arg(out)
        // Cargo's own flags for the host build (e.g. coverage) must not leak into guests.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS");
    cmd
}

fn run(mut cmd: Command, what: &str) {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start rustc for {what}: {e}"));
    if !output.status.success() {
        panic!(
            "building guest {what} failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let guests = manifest.parent().expect("guests/");
    for dir in [
        "abi/src",
        "workloads/src",
        "images/guest",
        "c/pull.c",
        "include",
    ] {
        println!("cargo:rerun-if-changed={}", guests.join(dir).display());
    }

    for (name, src) in [
        ("flotilla_abi", guests.join("abi/src/lib.rs")),
        ("flotilla_workloads", guests.join("workloads/src/lib.rs")),
    ] {
        let mut cmd = rustc(&out);
        cmd.args(["--crate-type", "rlib", "--crate-name", name])
            .arg("-o")
            .arg(out.join(format!("lib{name}.rlib")))
            .arg(src);
        run(cmd, name);
    }

    let script = manifest.join("guest/guest.ld");
    for workload in WORKLOADS {
        let mut cmd = rustc(&out);
        cmd.args([
            "--crate-type",
            "bin",
            "--crate-name",
            &format!("guest_{workload}"),
        ])
        .arg("--extern")
        .arg(format!(
            "flotilla_abi={}",
            out.join("libflotilla_abi.rlib").display()
        ))
        .arg("--extern")
        .arg(format!(
            "flotilla_workloads={}",
            out.join("libflotilla_workloads.rlib").display()
        ))
        .args([
            "-C",
            "link-arg=-nostartfiles",
            "-C",
            "link-arg=-nostdlib",
            "-C",
            "link-arg=-static",
        ])
        .args([
            "-C",
            "link-arg=-no-pie",
            "-C",
            "link-arg=-Wl,--build-id=none",
        ])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", script.display()))
        .env("FLOTILLA_WORKLOAD", workload)
        .arg("-o")
        .arg(out.join(format!("{workload}.elf")))
        .arg(manifest.join("guest/main.rs"));
        run(cmd, workload);
    }

    // The benchmark probe, in C with the guest ABI header (docs/guest-abi.md).
    {
        let probe = "pull";
        let mut cmd = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
        cmd.args([
            "-ffreestanding",
            "-nostdlib",
            "-static",
            "-fno-pie",
            "-no-pie",
            "-O2",
            "-fno-stack-protector",
        ])
        .arg("-I")
        .arg(guests.join("include"))
        .args(["-Wl,-Ttext-segment=0x400000", "-Wl,--build-id=none", "-o"])
        .arg(out.join(format!("{probe}.elf")))
        .arg(guests.join(format!("c/{probe}.c")));
        let output = cmd.output().unwrap_or_else(|e| {
            panic!("cannot start the C compiler for {probe}.c (apt-get install gcc): {e}")
        });
        if !output.status.success() {
            panic!(
                "building guests/c/{probe}.c failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}
