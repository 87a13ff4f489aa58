//! The `flotilla` command as a user runs it: real processes, real KVM.

mod common;

use common::{build_c, flotilla, json, kvm, stderr};
use serde_json::Value;

#[test]
fn workloads_lists_one_name_a_line() {
    let out = flotilla(&["workloads"]);
    assert!(out.status.success());
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        names,
        ["stream", "matmul", "bfs", "kvstore", "sort", "queue", "chase"]
    );
}

#[test]
fn every_workload_verifies_on_4_vcpus() {
    if !kvm() {
        return;
    }
    let out = flotilla(&["workloads"]);
    for name in String::from_utf8_lossy(&out.stdout).lines() {
        let out = flotilla(&["run", "--workload", name, "--vcpus", "4", "--json"]);
        let v = json(&out);
        assert!(out.status.success(), "{name}: {v} {}", stderr(&out));
        assert_eq!(v["workload"], name);
        assert_eq!(v["vcpus"], 4);
        assert_eq!(v["nodes"], 1);
        assert_eq!(v["exit_code"], 0);
        assert_eq!(v["verified"], true, "{name}: {v}");
        assert_eq!(v["checksum"], v["reference_checksum"]);
        assert!(v["wall_ms"].as_f64().is_some_and(|ms| ms > 0.0));
    }
}

#[test]
fn default_demo_runs() {
    if !kvm() {
        return;
    }
    let out = flotilla(&["run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", stderr(&out));
    assert!(
        text.contains("verified against the host reference"),
        "{text}"
    );
    // What a newcomer should see: the nodes, the moves, and 1 node against 2.
    assert!(text.contains("on 2 nodes"), "{text}");
    assert!(text.contains("vCPU moves"), "{text}");
    assert!(text.contains("the same guest on 1 node"), "{text}");
}

#[test]
fn bad_command_lines_get_clear_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--workload", "stream", "--vcpus", "0"], "1 to 64"),
        (&["run", "--workload", "stream", "--vcpus", "65"], "1 to 64"),
        (&["run", "--workload", "nope"], "unknown workload 'nope'"),
        (
            &["run", "--workload", "stream", "--mem", "lots"],
            "not a size",
        ),
        (
            &[
                "run",
                "--workload",
                "stream",
                "--mem",
                "8M",
                "--args",
                "n=10m",
            ],
            "needs about",
        ),
        (
            &["run", "--workload", "stream", "--args", "n=banana"],
            "n='banana'",
        ),
        (
            &["run", "--workload", "stream", "--args", "colour=blue"],
            "unknown argument 'colour'",
        ),
        (
            &["run", "--image", "/nonexistent/guest.elf"],
            "cannot read guest image",
        ),
        (
            &["run", "--workload", "stream", "--timeout", "0"],
            "positive",
        ),
        (&["run", "--workload", "stream", "--timeout=-1"], "positive"),
        (
            &["run", "--workload", "stream", "--link-delay-us", "5"],
            "a node alone has no links",
        ),
        (
            &[
                "run",
                "--workload",
                "stream",
                "--nodes",
                "2",
                "--link-delay-us",
                "1000001",
            ],
            "at most 1000000 µs",
        ),
        (
            &[
                "run",
                "--workload",
                "stream",
                "--nodes",
                "2",
                "--link-delay-us=-3",
            ],
            "invalid value '-3' for '--link-delay-us",
        ),
        (
            &["run", "--image", "/dev/null"],
            "too short for an ELF header",
        ),
        (
            &["run", "--workload", "stream", "--stack-size", "1000"],
            "the lowest 4 KiB is a guard page",
        ),
    ];
    for (args, expected) in cases {
        let out = flotilla(args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            err.contains(expected),
            "{args:?}: stderr {err:?} lacks {expected:?}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn a_non_elf_image_is_refused_in_json_too() {
    let dir = std::env::temp_dir().join(format!("flotilla-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("not-an-elf");
    std::fs::write(&path, vec![0x42u8; 4096]).unwrap();
    let out = flotilla(&["run", "--image", path.to_str().unwrap(), "--json"]);
    assert!(!out.status.success());
    let v = json(&out);
    assert!(
        v["error"].as_str().unwrap_or("").contains("bad magic"),
        "{v}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn external_c_guest_runs() {
    if !kvm() {
        return;
    }
    let elf = build_c("hello");
    let out = flotilla(&[
        "run",
        "--image",
        elf.to_str().unwrap(),
        "--vcpus",
        "4",
        "--json",
    ]);
    let v = json(&out);
    assert!(out.status.success(), "{v} {}", stderr(&out));
    assert_eq!(v["exit_code"], 0);
    assert_eq!(
        v["checksum"], "0x000000000000000a",
        "sum of 1..=4 reported: {v}"
    );
    assert_eq!(
        v["verified"],
        Value::Null,
        "external images have no reference"
    );
    assert!(
        v["console"]
            .as_str()
            .unwrap()
            .contains("hello from C on 4 vCPUs"),
        "{v}"
    );

    let out = flotilla(&[
        "run",
        "--image",
        elf.to_str().unwrap(),
        "--vcpus",
        "2",
        "--args",
        "fail",
        "--json",
    ]);
    assert_eq!(json(&out)["exit_code"], 3);
    assert!(!out.status.success());
    let _ = std::fs::remove_file(elf);
}

#[test]
fn a_stack_overflow_is_named_and_a_bigger_stack_fixes_it() {
    if !kvm() {
        return;
    }
    // vCPU 0 needs about 300 KiB of stack; the default is 256 KiB with a guard page at
    // the bottom. Before guard pages it wrote over the image below its stack, silently.
    let elf = build_c("deep");
    let image = elf.to_str().unwrap();
    for nodes in ["1", "2"] {
        let out = flotilla(&[
            "run", "--image", image, "--vcpus", "2", "--nodes", nodes, "--json",
        ]);
        let v = json(&out);
        assert_eq!(out.status.code(), Some(2), "{v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("vCPU 0 ran into the guard page below its stack")
                && error.contains("--stack-size"),
            "{nodes} node(s): {v}"
        );
        let out = flotilla(&[
            "run",
            "--image",
            image,
            "--vcpus",
            "2",
            "--nodes",
            nodes,
            "--stack-size",
            "1M",
            "--json",
        ]);
        let v = json(&out);
        assert_eq!(v["exit_code"], 0, "{nodes} node(s): {v}");
        assert_eq!(v["checksum"], "0x0000000000000930", "{v}");
    }
    // In process (no --nodes) too, with the console and counters of the failed run kept.
    let out = flotilla(&["run", "--image", image, "--vcpus", "2", "--json"]);
    let v = json(&out);
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("guard page"),
        "{v}"
    );
    assert_eq!(v["missing_counters"], serde_json::json!([]), "{v}");
    let _ = std::fs::remove_file(elf);
}

#[test]
fn a_guest_learns_which_node_each_vcpu_runs_on() {
    if !kvm() {
        return;
    }
    // vCPU 1 starts on node 1 (round robin) and writes a word in node 0's memory: the
    // word comes to it under always-page, it goes to the word under always-vcpu.
    let elf = build_c("where");
    let image = elf.to_str().unwrap();
    for (nodes, policy, vcpu1, code) in [
        (
            "1",
            "always-page",
            "vcpu 1: node 0 then node 0 of 1",
            "0x0000000000000000",
        ),
        (
            "2",
            "always-page",
            "vcpu 1: node 1 then node 1 of 2",
            "0x0000000000001100",
        ),
        (
            "2",
            "always-vcpu",
            "vcpu 1: node 1 then node 0 of 2",
            "0x0000000000001000",
        ),
    ] {
        let out = flotilla(&[
            "run", "--image", image, "--vcpus", "2", "--nodes", nodes, "--policy", policy, "--json",
        ]);
        let v = json(&out);
        assert_eq!(v["exit_code"], 0, "{nodes} node(s), {policy}: {v}");
        let console = v["console"].as_str().unwrap_or_default();
        assert!(
            console.contains("vcpu 0: node 0 then node 0 of") && console.contains(vcpu1),
            "{nodes} node(s), {policy}: {console}"
        );
        assert_eq!(v["checksum"], code, "{nodes} node(s), {policy}: {v}");
    }
    // In process, as text: the console is shown once, as the guest wrote it.
    let out = flotilla(&["run", "--image", image, "--vcpus", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.matches("vcpu 1: node 0 then node 0 of 1").count(),
        1,
        "{text}"
    );
    assert!(text.contains("2 vCPUs on 1 node, exit code 0"), "{text}");
    let _ = std::fs::remove_file(elf);
}
