//! Clusters of real node processes running real KVM guests (issue: distribution).

mod common;

use common::{build_c, children, flotilla, json, kvm, loopback_addrs, node_with_id, signal};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Small arguments: every workload shares pages across nodes within a second or so.
const SMALL: [(&str, &str); 7] = [
    ("stream", "n=3000 reps=2"),
    ("matmul", "n=20"),
    ("bfs", "vertices=1500 degree=4"),
    ("kvstore", "ops=4000 keys=800"),
    ("sort", "n=4000"),
    ("queue", "items=1500 capacity=16"),
    ("chase", "nodes=800 steps=1500"),
];

fn run_cluster(workload: &str, args: &str, nodes: u16, policy: &str, transport: &str) -> Value {
    let n = nodes.to_string();
    let out = flotilla(&[
        "run",
        "--workload",
        workload,
        "--args",
        args,
        "--vcpus",
        &n,
        "--nodes",
        &n,
        "--policy",
        policy,
        "--transport",
        transport,
        "--timeout",
        "60",
        "--json",
    ]);
    json(&out)
}

#[test]
fn every_workload_verifies_on_1_to_4_nodes_under_every_policy_and_transport() {
    if !kvm() {
        return;
    }
    let mut failures = Vec::new();
    let mut runs = 0;
    for (workload, args) in SMALL {
        for nodes in 1..=4u16 {
            for policy in [
                "always-page",
                "always-vcpu",
                "random",
                "heuristic",
                "numa-balancing",
                "tidalscale",
                "elasticos",
            ] {
                for transport in ["tcp", "shm"] {
                    let v = run_cluster(workload, args, nodes, policy, transport);
                    runs += 1;
                    if v["verified"] != Value::Bool(true) || v["nodes"] != nodes {
                        failures.push(format!(
                            "{workload} on {nodes} nodes, {policy}, {transport}: {}",
                            v["error"].as_str().unwrap_or(&v.to_string())
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {runs} runs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn json_summary_has_the_distribution_fields() {
    if !kvm() {
        return;
    }
    let v = run_cluster("sort", "n=20000", 3, "always-page", "tcp");
    assert_eq!(v["verified"], true, "{v}");
    for key in [
        "nodes",
        "policy",
        "transport",
        "remote_faults",
        "page_moves",
        "replicas_made",
        "invalidations",
        "vcpu_moves",
        "bytes_sent",
    ] {
        assert!(
            v[key].is_number() || v[key].is_string(),
            "{key} missing: {v}"
        );
    }
    assert!(v["remote_faults"].as_u64().unwrap() > 0, "{v}");
    assert!(v["page_moves"].as_u64().unwrap() > 0, "{v}");
    assert!(v["bytes_sent"].as_u64().unwrap() > 4096, "{v}");
    assert!(v["fault_service_us"]["p50"].as_u64().unwrap() > 0, "{v}");
    let v = run_cluster("stream", "n=3000 reps=2", 2, "always-vcpu", "tcp");
    assert!(v["vcpu_moves"].as_u64().unwrap() > 0, "{v}");
    assert!(v["vcpu_move_us"]["p99"].as_u64().is_some(), "{v}");
}

#[test]
fn locked_instructions_and_spin_locks_hold_across_nodes() {
    if !kvm() {
        return;
    }
    let elf = build_c("stress");
    for (nodes, policy, transport) in [
        (2, "always-page", "tcp"),
        (4, "always-page", "shm"),
        (4, "heuristic", "tcp"),
        (3, "random", "shm"),
    ] {
        let n = nodes.to_string();
        let vcpus = (2 * nodes).to_string();
        let out = flotilla(&[
            "run",
            "--image",
            elf.to_str().unwrap(),
            "--args",
            "1500",
            "--vcpus",
            &vcpus,
            "--nodes",
            &n,
            "--policy",
            policy,
            "--transport",
            transport,
            "--timeout",
            "120",
            "--json",
        ]);
        let v = json(&out);
        let total = 1500 * 2 * nodes as u64;
        assert_eq!(
            v["exit_code"], 0,
            "{nodes} nodes, {policy}, {transport}: {v}"
        );
        assert_eq!(v["checksum"], format!("{total:#018x}"), "{v}");
        assert!(v["invalidations"].as_u64().unwrap() > 0, "{v}");
    }
    let _ = std::fs::remove_file(elf);
}

#[test]
fn seeded_chaos_with_the_random_policy_is_correct() {
    if !kvm() {
        return;
    }
    for seed in ["1", "2", "3", "12345"] {
        let out = flotilla(&[
            "run",
            "--workload",
            "kvstore",
            "--args",
            "ops=20000 keys=3000",
            "--vcpus",
            "6",
            "--nodes",
            "3",
            "--policy",
            "random",
            "--seed",
            seed,
            "--timeout",
            "120",
            "--json",
        ]);
        let v = json(&out);
        assert_eq!(v["verified"], true, "seed {seed}: {v}");
        assert!(
            v["vcpu_moves"].as_u64().unwrap() > 0 && v["page_moves"].as_u64().unwrap() > 0,
            "{v}"
        );
    }
}

#[test]
fn killing_a_node_ends_the_run_with_an_error_naming_it() {
    if !kvm() {
        return;
    }
    let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "run",
            "--workload",
            "kvstore",
            "--args",
            "ops=50000000 keys=100000",
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
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(20);
    let nodes = loop {
        let c = children(pid);
        if c.len() == 3 || Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(nodes.len(), 3, "the three nodes did not start");
    std::thread::sleep(Duration::from_millis(1500));
    let node2 = node_with_id(&nodes, 2).expect("a node process with --id 2");
    let killed = Instant::now();
    signal(node2, 9);
    let out = child.wait_with_output().unwrap();
    let took = killed.elapsed();
    let v = json(&out);
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.contains("node 2"), "error does not name node 2: {v}");
    assert!(!out.status.success());
    assert!(
        took < Duration::from_secs(10),
        "the run took {took:?} to end after the kill"
    );
}

#[test]
fn a_node_with_the_wrong_secret_is_refused() {
    if !kvm() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("flotilla-secret-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ports = loopback_addrs(2);
    use std::os::unix::fs::PermissionsExt;
    let mut configs = Vec::new();
    for (id, secret) in [
        (0, "right-secret-0123456789"),
        (1, "wrong-secret-0123456789"),
    ] {
        let secret_file = dir.join(format!("secret{id}"));
        std::fs::write(&secret_file, secret).unwrap();
        std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = dir.join(format!("node{id}.json"));
        let body = serde_json::json!({
            "id": id, "nodes": ports, "secret_file": secret_file, "workload": "sort",
            "args": "n=1000", "vcpus": 2,
        });
        std::fs::write(&config, body.to_string()).unwrap();
        configs.push(config);
    }
    let node0 = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["node", "--config", configs[0].to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out1 = flotilla(&["node", "--config", configs[1].to_str().unwrap()]);
    let err1 = String::from_utf8_lossy(&out1.stderr).to_string();
    assert!(!out1.status.success());
    assert!(err1.contains("failed authentication"), "{err1}");
    // Node 0 logs the refusal (it may do so just after node 1 has given up), then keeps
    // waiting for the real node 1.
    use std::io::BufRead;
    let mut node0 = node0;
    let stderr0 = node0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr0)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut err0 = String::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(10)) {
        err0 += &line;
        if line.contains("refused a connection") {
            break;
        }
    }
    signal(node0.id(), 9);
    let out0 = node0.wait_with_output().unwrap();
    assert!(err0.contains("refused a connection"), "{err0}");
    assert!(
        !String::from_utf8_lossy(&out0.stdout).contains("exit_code"),
        "node 0 ran a guest"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_cluster_options_are_named() {
    for (args, needle) in [
        (vec!["run", "--nodes", "0"], "--nodes 0"),
        (
            vec!["run", "--nodes", "2", "--policy", "nope"],
            "unknown policy",
        ),
        (
            vec!["run", "--nodes", "2", "--transport", "carrier-pigeon"],
            "transport",
        ),
        (
            vec!["run", "--nodes", "2", "--vcpu-nodes", "0,5,0,0"],
            "node 5",
        ),
        (
            vec!["node", "--config", "/nonexistent/cluster.json"],
            "cannot read",
        ),
    ] {
        let out = flotilla(&args);
        let text = String::from_utf8_lossy(&out.stderr).to_string()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{args:?}");
        assert!(text.contains(needle), "{args:?}: {text}");
    }
}

/// The CPUs a process (or thread) may run on, from /proc.
fn cpus_allowed(status_path: &str) -> String {
    std::fs::read_to_string(status_path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn pinned_nodes_run_every_thread_on_their_own_cpus() {
    if !kvm() {
        return;
    }
    let here = cpus_allowed("/proc/self/status");
    let ncpus = here
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
            None => 1,
        })
        .sum::<usize>();
    // A layout the host cannot give is refused, saying what it can give.
    let too_many = (ncpus + 1).to_string();
    let out = flotilla(&[
        "run",
        "--workload",
        "stream",
        "--nodes",
        &too_many,
        "--cpus-per-node",
        "1",
    ]);
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("needs {} CPUs", ncpus + 1)), "{err}");
    assert!(err.contains(&format!("at most {ncpus} node")), "{err}");
    if ncpus < 2 {
        return;
    }
    let child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "run",
            "--workload",
            "stream",
            "--args",
            "n=2m reps=120",
            "--vcpus",
            "2",
        ])
        .args([
            "--nodes",
            "2",
            "--cpus-per-node",
            "1",
            "--json",
            "--timeout",
            "60",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While it runs, every thread of each node is confined to one CPU, and the two differ.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen: Vec<String> = Vec::new();
    while Instant::now() < deadline && seen.len() < 2 {
        let nodes = children(child.id());
        if nodes.len() == 2 {
            std::thread::sleep(Duration::from_millis(100));
            seen.clear();
            for n in nodes {
                let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{n}/task"))
                    .map(|d| {
                        d.filter_map(|e| e.ok())
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                let sets: std::collections::BTreeSet<String> = tasks
                    .iter()
                    .map(|t| cpus_allowed(&format!("/proc/{n}/task/{t}/status")))
                    .filter(|s| !s.is_empty())
                    .collect();
                assert!(
                    sets.len() <= 1,
                    "node {n}'s threads run on different sets: {sets:?}"
                );
                seen.extend(sets);
            }
        } else {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let out = child.wait_with_output().unwrap();
    let v = json(&out);
    assert_eq!(v["verified"], true, "{v}");
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_ne!(seen[0], seen[1], "both nodes on the same CPU");
    let sets = v["cpu_sets"].as_array().expect("cpu_sets in the JSON");
    assert_eq!(sets.len(), 2);
    let reported: Vec<String> = sets
        .iter()
        .map(|s| s[0].as_u64().unwrap().to_string())
        .collect();
    let mut seen_sorted = seen.clone();
    seen_sorted.sort();
    let mut reported_sorted = reported.clone();
    reported_sorted.sort();
    assert_eq!(
        seen_sorted, reported_sorted,
        "the JSON names the CPUs the nodes ran on"
    );
}

#[test]
fn a_moved_vcpu_takes_its_stack_along() {
    if !kvm() {
        return;
    }
    // Under always-vcpu every remote touch sends the vCPU to the page. Were its stack to
    // stay on the node it started on, the next push would send it straight back: this
    // run made 178,000 vCPU moves in 30 s without finishing before the stack followed.
    let v = run_cluster("stream", "n=200000 reps=5", 2, "always-vcpu", "tcp");
    assert_eq!(v["verified"], true, "{v}");
    let moves = v["vcpu_moves"].as_u64().unwrap();
    assert!(
        moves < 100,
        "{moves} vCPU moves: the stack did not follow: {v}"
    );
}

#[test]
fn a_failing_guest_ends_cleanly_with_its_console_and_counters() {
    if !kvm() {
        return;
    }
    // vCPU 1 faults while the others still move pages: the stop races with transfers in
    // flight. The run must end with the guest's error, keep what the guest printed and
    // what the nodes counted, and log nothing else (before, about 3 runs in 10 logged
    // "page … arrived as Invalid" and "unexpected Done": the stop woke page waiters as
    // if their page had come).
    let elf = build_c("fault");
    for (policy, transport) in [
        ("always-page", "tcp"),
        ("random", "shm"),
        ("always-page", "shm"),
        ("random", "tcp"),
        ("always-page", "tcp"),
    ] {
        let out = flotilla(&[
            "run",
            "--image",
            elf.to_str().unwrap(),
            "--vcpus",
            "4",
            "--nodes",
            "2",
            "--policy",
            policy,
            "--transport",
            transport,
            "--timeout",
            "60",
            "--json",
        ]);
        let v = json(&out);
        let err = common::stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("vCPU 1") && error.contains("triple fault"),
            "{v}"
        );
        assert_eq!(v["console"], "about to fault\n", "{v}");
        assert!(v["verified"].is_null(), "an external image: {v}");
        assert!(v["exits"].as_u64().unwrap() > 0, "{v}");
        assert_eq!(v["missing_counters"], serde_json::json!([]), "{v}");
        assert!(
            err.trim().is_empty(),
            "{policy}/{transport}: stderr is not empty:\n{err}"
        );
    }
    let _ = std::fs::remove_file(elf);
}

#[test]
fn an_emulated_link_delay_is_paid_by_every_remote_fault() {
    if !kvm() {
        return;
    }
    // Each remote fault is at least a request and an answer: two one-way delays.
    for transport in ["tcp", "shm"] {
        let out = flotilla(&[
            "run",
            "--workload",
            "matmul",
            "--args",
            "n=200",
            "--vcpus",
            "2",
            "--nodes",
            "2",
            "--policy",
            "always-page",
            "--transport",
            transport,
            "--link-delay-us",
            "300",
            "--json",
        ]);
        let v = json(&out);
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(v["link_delay_us"], 300, "{v}");
        let p50 = v["fault_service_us"]["p50"].as_u64().unwrap_or(0);
        assert!(
            p50 >= 600,
            "{transport}: fault p50 {p50} µs with 300 µs each way: {v}"
        );
    }
}
