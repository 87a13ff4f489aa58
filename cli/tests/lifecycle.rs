//! What a cluster run leaves behind, and how it ends: node processes die with their
//! launcher whatever signal ends it, the cluster secret is never on disk, a node run by
//! hand prints the documented summary, a closed stdout is not a panic, and guest
//! arguments may start with a dash. Real node processes, real KVM.

mod common;

use common::{children, flotilla, json, kvm, loopback_addrs, node_with_id, signal, stderr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; it counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A long 2-node run; returns the launcher and its two node processes once both run.
fn long_run() -> (Child, Vec<u32>) {
    let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "run",
            "--workload",
            "kvstore",
            "--args",
            "ops=50000000 keys=100000",
            "--vcpus",
            "2",
            "--nodes",
            "2",
            "--timeout",
            "120",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let nodes = loop {
        let c = children(child.id());
        if c.len() == 2 || Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(nodes.len(), 2, "the two nodes did not start");
    (child, nodes)
}

/// Files in the temporary directory whose name mentions `pid`.
fn temp_entries(pid: u32) -> Vec<String> {
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("flotilla-") && n.contains(&format!("-{pid}-")))
        .collect()
}

fn wait_gone(pids: &[u32], limit: Duration) -> Vec<u32> {
    let deadline = Instant::now() + limit;
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn nodes_die_with_their_launcher_and_no_secret_is_left_on_disk() {
    if !kvm() {
        return;
    }
    for (sig, name) in [(15, "SIGTERM"), (2, "SIGINT"), (9, "SIGKILL")] {
        let (mut launcher, nodes) = long_run();
        std::thread::sleep(Duration::from_millis(500));
        // While it runs: nothing on disk (no trace asked for), the secret in no
        // command line.
        assert_eq!(temp_entries(launcher.id()), Vec::<String>::new(), "{name}");
        for n in &nodes {
            let cmdline = std::fs::read(format!("/proc/{n}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(cmdline.contains("--config -"), "{cmdline}");
        }
        signal(launcher.id(), sig);
        let status = launcher.wait().unwrap();
        assert!(!status.success(), "{name}: {status}");
        let left = wait_gone(&nodes, Duration::from_secs(5));
        assert!(
            left.is_empty(),
            "{name}: nodes {left:?} outlived their launcher"
        );
        assert_eq!(temp_entries(launcher.id()), Vec::<String>::new(), "{name}");
    }
}

#[test]
fn a_traced_run_stopped_by_sigterm_removes_its_directory() {
    if !kvm() {
        return;
    }
    let trace = std::env::temp_dir().join(format!("lifecycle-{}.ftrace", std::process::id()));
    let mut launcher = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "run",
            "--workload",
            "kvstore",
            "--args",
            "ops=50000000 keys=100000",
        ])
        .args(["--vcpus", "2", "--nodes", "2", "--json", "--trace"])
        .arg(&trace)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while children(launcher.id()).len() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let nodes = children(launcher.id());
    assert_eq!(
        temp_entries(launcher.id()).len(),
        1,
        "the trace parts directory"
    );
    signal(launcher.id(), 15);
    launcher.wait().unwrap();
    assert!(wait_gone(&nodes, Duration::from_secs(5)).is_empty());
    assert_eq!(temp_entries(launcher.id()), Vec::<String>::new());
    assert!(!trace.exists(), "no trace of an interrupted run");
}

#[test]
fn a_node_whose_leader_vanished_exits() {
    if !kvm() {
        return;
    }
    let (launcher, nodes) = long_run();
    std::thread::sleep(Duration::from_millis(500));
    let node0 = node_with_id(&nodes, 0).expect("node 0");
    signal(node0, 9);
    let out = launcher.wait_with_output().unwrap();
    let v = json(&out);
    assert!(
        v["error"].as_str().unwrap_or_default().contains("node 0"),
        "{v}"
    );
    assert!(wait_gone(&nodes, Duration::from_secs(5)).is_empty());
}

#[test]
fn a_node_run_by_hand_prints_the_documented_summary() {
    if !kvm() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("flotilla-hand-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ports = loopback_addrs(2);
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, "a-secret-of-enough-bytes").unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.join("cluster.json");
    let body = serde_json::json!({
        "nodes": ports, "secret_file": secret_file, "workload": "sort",
        "args": "n=20000", "vcpus": 2, "policy": "always-page",
    });
    std::fs::write(&config, body.to_string()).unwrap();
    let node1 = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["node", "--config", config.to_str().unwrap(), "--id", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out0 = flotilla(&["node", "--config", config.to_str().unwrap(), "--id", "0"]);
    let out1 = node1.wait_with_output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out1.status.success(), "node 1: {}", stderr(&out1));
    let stdout = String::from_utf8_lossy(&out0.stdout);
    assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout}");
    assert!(stdout.len() < 4096, "a summary, not raw samples: {stdout}");
    let v = json(&out0);
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(v["nodes"], 2);
    assert!(
        v["checksum"].as_str().is_some_and(|c| c.starts_with("0x")),
        "{v}"
    );
    assert!(v["fault_service_us"]["samples"].as_u64().is_some(), "{v}");
    assert!(out0.status.success());
}

#[test]
fn a_closed_stdout_is_not_a_panic() {
    if !kvm() {
        return;
    }
    // The reader of stdout goes away at once: the run must still end normally.
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "run",
            "--workload",
            "sort",
            "--args",
            "n=20000",
            "--vcpus",
            "2",
        ])
        .args(["--nodes", "2", "--timeout", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("Broken pipe"), "{err}");
}

#[test]
fn guest_arguments_may_start_with_a_dash() {
    // Parsed as --args's value: the workload then names the argument it cannot use.
    let out = flotilla(&["run", "--workload", "sort", "--args", "-p4 -n1048576"]);
    let err = stderr(&out);
    assert!(!err.contains("unexpected argument"), "{err}");
    assert!(err.contains("'-p4'"), "{err}");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_hung_node_ends_the_run_within_seconds() {
    if !kvm() {
        return;
    }
    let launcher = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "run",
            "--workload",
            "kvstore",
            "--args",
            "ops=50000000 keys=100000",
        ])
        .args([
            "--vcpus",
            "3",
            "--nodes",
            "3",
            "--policy",
            "always-page",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while children(launcher.id()).len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1000));
    let nodes = children(launcher.id());
    let node2 = node_with_id(&nodes, 2).expect("node 2");
    // SIGSTOP: the node neither dies nor answers, as a hung machine would.
    signal(node2, 19);
    let stopped = Instant::now();
    let out = launcher.wait_with_output().unwrap();
    let took = stopped.elapsed();
    let v = json(&out);
    assert!(
        v["error"].as_str().unwrap_or_default().contains("node 2"),
        "{v}"
    );
    assert_eq!(v["missing_counters"], serde_json::json!([2]), "{v}");
    // Detection takes the 3 s idle timeout; the rest of the run's end must not wait for
    // the hung node (it took 13 to 18 s when it did).
    assert!(
        took < Duration::from_secs(8),
        "the run took {took:?} to end after the hang"
    );
    assert!(wait_gone(&nodes, Duration::from_secs(5)).is_empty());
}

/// What the file descriptors of process `pid` point at.
fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|p| p.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_node_alone_needs_no_userfaultfd_and_no_socket() {
    if !kvm() {
        return;
    }
    for (sample_rate, wants_uffd) in [("0", false), ("1000", true)] {
        let mut launcher = Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args([
                "run",
                "--workload",
                "kvstore",
                "--args",
                "ops=50000000 keys=100000",
            ])
            .args([
                "--vcpus",
                "2",
                "--nodes",
                "1",
                "--json",
                "--sample-rate",
                sample_rate,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let node = loop {
            let c = children(launcher.id());
            // The guest runs once the node has its KVM vCPUs open.
            if let Some(&n) = c.first() {
                if fd_targets(n).iter().any(|t| t.contains("kvm-vcpu")) {
                    break n;
                }
            }
            assert!(Instant::now() < deadline, "the node did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        let fds = fd_targets(node);
        signal(launcher.id(), 15);
        let _ = launcher.wait();
        let uffd = fds.iter().any(|t| t.contains("userfaultfd"));
        assert_eq!(uffd, wants_uffd, "sample rate {sample_rate}: {fds:?}");
        assert!(
            !fds.iter().any(|t| t.starts_with("socket:")),
            "a node alone opened a socket: {fds:?}"
        );
    }
}
