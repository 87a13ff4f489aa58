//! Telemetry end to end, with real node processes and real KVM: a live Prometheus scrape
//! of a multi-node run checked by a strict exposition parser (and `promtool`), a recorded trace that agrees with the run's
//! own counters, trace tools, and refused corrupt traces and bad options.

mod common;

use common::{flotilla, json, kvm, stderr};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("flotilla-tel-{}-{name}", std::process::id()))
}

/// A base port with `n` free ports after it, below the ephemeral range, so the clusters
/// other tests start (whose nodes listen on ephemeral ports) cannot take them meanwhile.
fn free_base(n: u16) -> u16 {
    let start = 20000 + (std::process::id() % 5000) as u16;
    for base in (start..30000).step_by(n as usize + 1) {
        let all: Vec<_> = (0..n)
            .map(|i| TcpListener::bind(("127.0.0.1", base + i)))
            .collect();
        if all.iter().all(|r| r.is_ok()) {
            return base;
        }
    }
    panic!("no {n} consecutive free ports between {start} and 30000");
}

fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(200),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    Some(body.to_string())
}

/// Samples of the text exposition: `name{labels}` → value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {l}"));
            (
                k.to_string(),
                v.parse().unwrap_or_else(|_| panic!("bad value in {l}")),
            )
        })
        .collect()
}

fn sum(s: &HashMap<String, f64>, name: &str) -> f64 {
    s.iter()
        .filter(|(k, _)| k.split('{').next() == Some(name))
        .map(|(_, v)| v)
        .sum()
}

/// Checks the exposition with Flotilla's strict parser, and with `promtool check metrics`
/// where it is installed (`.ci/run` installs it). Without promtool the test says so on
/// stderr and relies on the parser alone: never a silent skip.
fn exposition_check(text: &str) {
    if let Err(e) = flotilla_telemetry::exposition::check(text) {
        panic!("the exposition is not valid: {e}\n--- text ---\n{text}");
    }
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "NOTE: promtool not found ({e}); the exposition was checked by flotilla_telemetry::exposition only (apt-get install prometheus for both)"
            );
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- text ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_live_multi_node_run_is_scraped_and_its_exposition_is_valid() {
    if !kvm() {
        return;
    }
    let base = free_base(3);
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "run",
            "--workload",
            "kvstore",
            "--args",
            "ops=60000 keys=20000",
            "--vcpus",
            "3",
            "--nodes",
            "3",
            "--policy",
            "always-page",
            "--metrics",
            &format!("127.0.0.1:{base}"),
            "--inject-health",
            "1:thermal_max_celsius=97.5",
            "--sample-rate",
            "1000",
            "--timeout",
            "120",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Scrape every node while the guest runs, until each has served remote faults.
    let mut got: Vec<Option<String>> = vec![None; 3];
    let deadline = Instant::now() + Duration::from_secs(120);
    while got.iter().any(Option::is_none) && Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        for (k, slot) in got.iter_mut().enumerate() {
            if slot.is_none() {
                if let Some(text) = scrape(base + k as u16) {
                    // A fault is counted before its request goes out: wait for a page
                    // that came in, so the byte counters have moved too.
                    let s = samples(&text);
                    if sum(&s, "flotilla_remote_faults_total") > 0.0
                        && sum(&s, "flotilla_page_moves_total") > 0.0
                        && sum(&s, "flotilla_bytes_total") > 0.0
                    {
                        *slot = Some(text);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let v = json(&out);
    assert_eq!(v["verified"], true, "{v}\n{}", stderr(&out));
    let err = stderr(&out);
    for k in 0..3 {
        assert!(
            err.contains(&format!(
                "node {k} metrics at http://127.0.0.1:{}/metrics",
                base + k
            )),
            "{err}"
        );
    }
    for (k, text) in got.iter().enumerate() {
        let text = text
            .as_ref()
            .unwrap_or_else(|| panic!("node {k} was never scraped with faults during the run"));
        exposition_check(text);
        let s = samples(text);
        let label = format!("node=\"{k}\"");
        for key in s.keys() {
            assert!(
                key.contains(&label),
                "node {k}: sample without its node label: {key}"
            );
        }
        for name in [
            "flotilla_remote_faults_total",
            "flotilla_page_moves_total",
            "flotilla_vcpu_moves_total",
            "flotilla_invalidations_total",
            "flotilla_bytes_total",
            "flotilla_fault_service_seconds_count",
            "flotilla_vcpu_move_seconds_count",
            "flotilla_policy_decision_seconds_count",
            "flotilla_pages_resident",
            "flotilla_vcpus_resident",
        ] {
            assert!(
                s.keys().any(|key| key.split('{').next() == Some(name)),
                "node {k}: {name} missing"
            );
        }
        for kind in ["read", "write"] {
            assert!(s.contains_key(&format!(
                "flotilla_remote_faults_total{{kind=\"{kind}\",{label}}}"
            )));
        }
        assert!(sum(&s, "flotilla_pages_resident") > 0.0, "node {k}");
        assert!(
            s[&format!("flotilla_bytes_total{{direction=\"sent\",{label}}}")]
                + s[&format!("flotilla_bytes_total{{direction=\"received\",{label}}}")]
                > 0.0,
            "node {k}"
        );
        // Histogram buckets are cumulative and end at the count.
        let count = s[&format!("flotilla_fault_service_seconds_count{{{label}}}")];
        let inf = s[&format!("flotilla_fault_service_seconds_bucket{{{label},le=\"+Inf\"}}")];
        assert_eq!(count, inf, "node {k}");
        let injected = format!("flotilla_node_health{{{label},signal=\"thermal_max_celsius\"}}");
        if k == 1 {
            assert_eq!(
                s.get(&injected),
                Some(&97.5),
                "node 1: injected health signal"
            );
        } else {
            assert_ne!(
                s.get(&injected),
                Some(&97.5),
                "node {k} got node 1's injection"
            );
        }
    }
}

fn run_json(args: &[&str]) -> Value {
    let out = flotilla(args);
    let v = json(&out);
    assert_eq!(v["verified"], true, "{v}\n{}", stderr(&out));
    v
}

#[test]
fn a_recorded_trace_agrees_with_the_run_and_exports() {
    if !kvm() {
        return;
    }
    // A .gz name: written compressed, read back as it is.
    let file = temp("bfs.ftrace.gz");
    for (policy, transport) in [("heuristic", "tcp"), ("always-vcpu", "shm")] {
        let v = run_json(&[
            "run",
            "--workload",
            "bfs",
            "--args",
            "vertices=30000 degree=4",
            "--vcpus",
            "4",
            "--nodes",
            "2",
            "--policy",
            policy,
            "--transport",
            transport,
            "--trace",
            file.to_str().unwrap(),
            "--sample-rate",
            "5000",
            "--timeout",
            "120",
            "--json",
        ]);
        assert!(
            std::fs::read(&file).unwrap().starts_with(&[0x1f, 0x8b]),
            "not gzip"
        );
        let out = flotilla(&["trace", "stats", file.to_str().unwrap(), "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let s = json(&out);
        assert_eq!(s["events"], v["trace_events"], "{s}");
        assert_eq!(s["workload"], "bfs");
        assert_eq!(s["policy"], policy);
        assert_eq!(s["transport"], transport);
        assert_eq!(s["nodes"], 2);
        assert_eq!(s["vcpus"], 4);
        assert_eq!(s["outcome"], "completed", "{s}");
        let total = |field: &str| -> u64 {
            s["per_node"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n[field].as_u64().unwrap())
                .sum()
        };
        // Every fault, move and invalidation the run counted is in the trace.
        assert_eq!(
            total("remote_faults"),
            v["remote_faults"].as_u64().unwrap(),
            "{policy}: {s}\n{v}"
        );
        assert_eq!(
            total("pages_in"),
            v["page_moves"].as_u64().unwrap(),
            "{policy}"
        );
        assert_eq!(
            total("pages_out"),
            v["page_moves"].as_u64().unwrap(),
            "{policy}"
        );
        assert_eq!(
            total("invalidations"),
            v["invalidations"].as_u64().unwrap(),
            "{policy}"
        );
        assert_eq!(
            total("vcpus_out"),
            v["vcpu_moves"].as_u64().unwrap(),
            "{policy}"
        );
        assert_eq!(
            total("vcpus_in"),
            v["vcpu_moves"].as_u64().unwrap(),
            "{policy}"
        );
        assert!(total("remote_faults") > 0, "{s}");
        if policy == "always-vcpu" {
            assert!(total("decided_move_vcpu") > 0, "{s}");
        }
        // The sampler saw local accesses as well.
        assert!(
            s["by_kind"]["access_sample"].as_u64().unwrap_or(0) > 0,
            "{s}"
        );
        let text = flotilla(&["trace", "stats", file.to_str().unwrap()]);
        assert!(String::from_utf8_lossy(&text.stdout).contains("sharing degree"));
    }
    // Exports: a CSV row per event, and a Parquet file.
    let csv = temp("bfs.csv");
    let out = flotilla(&[
        "trace",
        "export",
        file.to_str().unwrap(),
        "--format",
        "csv",
        "-o",
        csv.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let events = flotilla_json_events(&file);
    let text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(text.lines().count() as u64, events + 1);
    assert!(
        text.starts_with("t_ns,kind,node,vcpu,page,access,rip,peer,replicas,decision,service_ns")
    );
    let pq = temp("bfs.parquet");
    let out = flotilla(&[
        "trace",
        "export",
        file.to_str().unwrap(),
        "--format",
        "parquet",
        "-o",
        pq.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bytes = std::fs::read(&pq).unwrap();
    assert!(bytes.starts_with(b"PAR1") && bytes.ends_with(b"PAR1"));
    for f in [file, csv, pq] {
        let _ = std::fs::remove_file(f);
    }
}

fn flotilla_json_events(file: &std::path::Path) -> u64 {
    let out = flotilla(&["trace", "stats", file.to_str().unwrap(), "--json"]);
    json(&out)["events"].as_u64().unwrap()
}

#[test]
fn corrupt_truncated_and_foreign_traces_are_refused_by_name() {
    if !kvm() {
        return;
    }
    let file = temp("sort.ftrace");
    run_json(&[
        "run",
        "--workload",
        "sort",
        "--args",
        "n=20000",
        "--vcpus",
        "2",
        "--nodes",
        "2",
        "--trace",
        file.to_str().unwrap(),
        "--json",
    ]);
    let good = std::fs::read(&file).unwrap();
    let bad = temp("bad.ftrace");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (good[..good.len() / 2].to_vec(), "truncated"),
        (good[..good.len() - 16].to_vec(), "truncated"),
        (
            {
                let mut b = good.clone();
                b[40] ^= 0xff;
                b
            },
            "checksum",
        ),
        (
            {
                let mut b = good.clone();
                b[8] = 7;
                b
            },
            "version 7",
        ),
        (
            b"#!/bin/sh\necho not a trace\n".to_vec(),
            "not a Flotilla trace",
        ),
        (Vec::new(), "truncated"),
    ];
    for (bytes, expect) in cases {
        std::fs::write(&bad, &bytes).unwrap();
        for cmd in [
            vec!["trace", "stats"],
            vec!["trace", "export", "--format", "csv", "-o", "-"],
        ] {
            let mut args = cmd.clone();
            args.push(bad.to_str().unwrap());
            let out = flotilla(&args);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
            assert!(
                stderr(&out).contains(expect),
                "{args:?}: expected '{expect}': {}",
                stderr(&out)
            );
        }
    }
    let out = flotilla(&["trace", "stats", "/nonexistent/trace"]);
    assert!(
        stderr(&out).contains("/nonexistent/trace"),
        "{}",
        stderr(&out)
    );
    for f in [file, bad] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn bad_telemetry_options_are_named() {
    let cases: [(&[&str], &str); 7] = [
        (
            &["run", "--workload", "sort", "--trace", "/tmp"],
            "is a directory",
        ),
        (
            &[
                "trace", "export", "t.ftrace", "--format", "csv", "-o", "t.ftrace",
            ],
            "is the trace itself",
        ),
        (
            &[
                "run",
                "--workload",
                "sort",
                "--nodes",
                "2",
                "--metrics",
                "127.0.0.1:0",
            ],
            "real base port",
        ),
        (
            &[
                "run",
                "--workload",
                "sort",
                "--nodes",
                "2",
                "--metrics",
                "localhost",
            ],
            "--metrics",
        ),
        (
            &[
                "run",
                "--workload",
                "sort",
                "--trace",
                "/nonexistent/dir/t.ftrace",
            ],
            "does not exist",
        ),
        (
            &[
                "run",
                "--workload",
                "sort",
                "--nodes",
                "2",
                "--inject-health",
                "5:x=1",
            ],
            "node 5",
        ),
        (
            &[
                "run",
                "--workload",
                "sort",
                "--inject-health",
                "0:Bad-Name=1",
            ],
            "signal name",
        ),
    ];
    for (args, expect) in cases {
        let out = flotilla(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&out).contains(expect),
            "{args:?}: expected '{expect}': {}",
            stderr(&out)
        );
    }
}

#[test]
fn metrics_linger_after_the_run_with_the_final_counters() {
    if !kvm() {
        return;
    }
    let base = free_base(2);
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args([
            "run",
            "--workload",
            "sort",
            "--args",
            "n=20000",
            "--vcpus",
            "2",
            "--nodes",
            "2",
            "--metrics",
            &format!("127.0.0.1:{base}"),
            "--metrics-linger",
            "3",
            "--json",
        ])
        .env("FLOTILLA_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The nodes log when their run is over and their metrics linger: scrape node 1 then.
    let stderr_pipe = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr_pipe)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut log = String::new();
    let scraped = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
                if line.contains("metrics linger") && line.contains("node=1") {
                    break scrape(base + 1);
                }
            }
            Err(_) => panic!("node 1 never said its metrics linger:\n{log}"),
        }
    };
    let out = child.wait_with_output().unwrap();
    assert_eq!(json(&out)["verified"], true, "{log}");
    let s = samples(&scraped.expect("node 1's metrics were not served after its run"));
    assert_eq!(sum(&s, "flotilla_vcpus_resident"), 0.0);
    assert!(sum(&s, "flotilla_bytes_total") > 0.0);
    let out = flotilla(&["run", "--workload", "sort", "--metrics-linger", "5"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--metrics"), "{}", stderr(&out));
}

/// The Python reader's view of a trace, as JSON: `None` when python3 is missing (said
/// on stderr: CI installs it).
fn python_meta(file: &std::path::Path) -> Option<Value> {
    let reader = common::repo().join("telemetry/python");
    let script = "import json, sys; sys.path.insert(0, sys.argv[1]); import flotilla_trace as t; \
                  m, e = t.read(sys.argv[2]); m['events'] = len(e); print(json.dumps(m))";
    match Command::new("python3")
        .args(["-c", script])
        .arg(&reader)
        .arg(file)
        .output()
    {
        Ok(out) => {
            assert!(out.status.success(), "python reader: {}", stderr(&out));
            Some(serde_json::from_slice(&out.stdout).expect("python reader prints JSON"))
        }
        Err(e) => {
            eprintln!("python3 not found ({e}): the Python trace reader was not checked (apt-get install python3)");
            None
        }
    }
}

#[test]
fn a_failed_run_keeps_its_trace_marked_as_failed() {
    if !kvm() {
        return;
    }
    // vCPU 1 triple-faults while the others move pages. The trace is kept (before, none was
    // written and the guest's error was replaced by "a node did not end cleanly").
    let elf = common::build_c("fault");
    let file = temp("failed.ftrace");
    let v = json(&flotilla(&[
        "run",
        "--image",
        elf.to_str().unwrap(),
        "--vcpus",
        "4",
        "--nodes",
        "2",
        "--trace",
        file.to_str().unwrap(),
        "--json",
    ]));
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.contains("triple fault"), "{v}");
    assert_eq!(v["trace_error"], Value::Null, "{v}");
    let out = flotilla(&["trace", "stats", file.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = json(&out);
    assert_eq!(s["outcome"], "failed", "{s}");
    assert_eq!(s["error"], error, "{s}");
    assert_eq!(s["missing_nodes"], serde_json::json!([]), "{s}");
    assert_eq!(s["events"], v["trace_events"], "{s}");
    let text = flotilla(&["trace", "stats", file.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("the run failed: "));
    if let Some(m) = python_meta(&file) {
        let run = &m["run"];
        assert_eq!(run["outcome"], "failed", "{m}");
        assert_eq!(run["error"], error, "{m}");
        assert_eq!(run["vcpu_nodes"], serde_json::json!([0, 1, 0, 1]), "{m}");
        assert_eq!(run["ram"], "contiguous", "{m}");
        assert!(run["costs"]["rtt_4k_ns"].as_u64().unwrap() > 0, "{m}");
        assert_eq!(m["events"], v["trace_events"], "{m}");
    }
    let _ = std::fs::remove_file(file);
    let _ = std::fs::remove_file(elf);
}

#[test]
fn both_readers_read_the_datasets_and_a_version_1_trace() {
    let dir = common::repo().join("datasets/traces");
    let current = std::fs::read_dir(&dir)
        .expect("datasets/traces")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with(".ftrace.gz"))
        .expect("a dataset trace");
    let v1 = common::repo().join("telemetry/tests/data/v1-matmul-2n-random.ftrace.gz");
    for file in [current, v1] {
        let out = flotilla(&["trace", "stats", file.to_str().unwrap(), "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let s = json(&out);
        if let Some(m) = python_meta(&file) {
            assert_eq!(m["events"], s["events"], "{m}");
            assert_eq!(m["nodes"], s["nodes"], "{m}");
        }
    }
}

#[test]
fn a_reference_stream_records_touches_the_policy_never_faulted_on() {
    if !kvm() {
        return;
    }
    // Under always-vcpu the vCPUs gather where the data is, so faults alone show few
    // pages; the reference stream shows every page touched in each 2 ms epoch.
    let file = temp("touch.ftrace");
    let v = run_json(&[
        "run",
        "--workload",
        "bfs",
        "--args",
        "vertices=30000 degree=4",
        "--vcpus",
        "2",
        "--nodes",
        "2",
        "--policy",
        "always-vcpu",
        "--trace",
        file.to_str().unwrap(),
        "--touch-epoch-ms",
        "2",
        "--json",
    ]);
    let out = flotilla(&["trace", "stats", file.to_str().unwrap(), "--json"]);
    let s = json(&out);
    let touches = s["by_kind"]["access_sample"].as_u64().unwrap_or(0);
    let faults = v["remote_faults"].as_u64().unwrap();
    assert!(touches > faults, "{touches} touches, {faults} faults: {s}");
    if let Some(m) = python_meta(&file) {
        assert_eq!(m["run"]["touch_epoch_ns"], 2_000_000, "{m}");
    }
    let out = flotilla(&["run", "--workload", "bfs", "--touch-epoch-ms", "2"]);
    assert!(stderr(&out).contains("--trace"), "{}", stderr(&out));
    let _ = std::fs::remove_file(file);
}

#[test]
fn a_reference_stream_replays_in_the_simulator() {
    if !kvm() {
        return;
    }
    let file = temp("replay.ftrace");
    let live = run_json(&[
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
        "--trace",
        file.to_str().unwrap(),
        "--touch-epoch-ms",
        "2",
        "--json",
    ]);
    let replay = |extra: &[&str]| {
        let mut args = vec!["replay", file.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        let out = flotilla(&args);
        assert!(out.status.success(), "{extra:?}: {}", stderr(&out));
        json(&out)
    };
    // Under its own policy the replay reproduces the recording's counts: the stated
    // tolerance is 35 % on remote faults and page moves (docs/simulator.md; measured
    // here -27 to -31 % on remote faults, bfs at its fidelity size -2 %).
    let same = replay(&[]);
    assert_eq!(same["policy"], "always-page", "{same}");
    assert_eq!(same["reference_stream"], true, "{same}");
    for field in ["remote_faults", "page_moves"] {
        let (l, r) = (live[field].as_f64().unwrap(), same[field].as_f64().unwrap());
        assert!(
            (r - l).abs() <= 0.35 * l,
            "{field}: recorded {l}, replayed {r}: {same}"
        );
    }
    for field in [
        "wall_ms",
        "page_moves",
        "vcpu_moves",
        "invalidations",
        "bytes_sent",
    ] {
        assert!(same[field].is_number(), "{field}: {same}");
    }
    // Another policy and shape; a slower link costs more.
    let vcpu = replay(&["--policy", "always-vcpu"]);
    assert!(vcpu["vcpu_moves"].as_u64().unwrap() > 0, "{vcpu}");
    let slow = replay(&["--link-us", "500"]);
    assert!(
        slow["wall_ms"].as_f64() > same["wall_ms"].as_f64(),
        "{slow} {same}"
    );
    let wide = replay(&["--nodes", "8", "--cpus-per-node", "4"]);
    assert_eq!(wide["nodes"], 8);
    // The oracle looks ahead; its labels are a Parquet table, one row per decided fault.
    let labels = temp("replay-labels.parquet");
    let oracle = replay(&["--policy", "oracle", "--labels", labels.to_str().unwrap()]);
    assert_eq!(oracle["policy"], "oracle", "{oracle}");
    assert!(oracle["labels"].as_u64().unwrap() > 0, "{oracle}");
    let bytes = std::fs::read(&labels).unwrap();
    assert!(bytes.starts_with(b"PAR1") && bytes.ends_with(b"PAR1"));
    let out = flotilla(&[
        "replay",
        file.to_str().unwrap(),
        "--labels",
        "/nonexistent/l.parquet",
    ]);
    assert!(
        stderr(&out).contains("--labels /nonexistent/l.parquet"),
        "{}",
        stderr(&out)
    );
    // `flotilla ab` by replay over a directory holding this trace: a ratio, and a report.
    let dir = temp("ab-traces");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&file, dir.join("matmul-2n.ftrace")).unwrap();
    let report = temp("ab-report");
    let ab = flotilla(&[
        "ab",
        "--a",
        "always-page",
        "--b",
        "always-vcpu",
        "--workloads",
        "matmul",
        "--no-live",
        "--traces",
        dir.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--json",
    ]);
    assert!(ab.status.success(), "{}", stderr(&ab));
    let ab = json(&ab);
    let row = &ab["rows"][0];
    assert_eq!(row["arm"], "replay", "{ab}");
    let ratio = row["ratio"].as_f64().unwrap();
    let expect = row["b_median_ms"].as_f64().unwrap() / row["a_median_ms"].as_f64().unwrap();
    assert!((ratio - expect).abs() < 0.01, "{ab}");
    for f in ["report.md", "ratio.svg", "stall.svg", "ab.json"] {
        assert!(report.join(f).exists(), "{f} missing from the report");
    }
    let svg = std::fs::read_to_string(report.join("ratio.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("matmul"), "{svg}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&report);
    let _ = std::fs::remove_file(labels);
    // Bad input gets a clear error.
    let out = flotilla(&["replay", file.to_str().unwrap(), "--policy", "nope"]);
    assert!(
        stderr(&out).contains("unknown policy 'nope'"),
        "{}",
        stderr(&out)
    );
    let out = flotilla(&["replay", "/nonexistent.ftrace"]);
    assert!(
        stderr(&out).contains("/nonexistent.ftrace"),
        "{}",
        stderr(&out)
    );
    let _ = std::fs::remove_file(file);
}

#[test]
fn a_policy_decides_a_lone_vcpus_faults_the_same_live_and_in_replay() {
    if !kvm() {
        return;
    }
    use flotilla_telemetry::trace::{flags, EventKind};
    // One vCPU, started on node 1, its data in node 0's half of RAM: no other vCPU's
    // timing can change what it faults on, so the live decisions are a fixed sequence.
    let file = temp("same-decisions.ftrace");
    run_json(&[
        "run",
        "--workload",
        "stream",
        "--args",
        "n=100000 reps=2",
        "--vcpus",
        "1",
        "--vcpu-nodes",
        "1",
        "--nodes",
        "2",
        "--policy",
        "heuristic",
        "--trace",
        file.to_str().unwrap(),
        "--touch-epoch-ms",
        "2",
        "--json",
    ]);
    let trace = flotilla_telemetry::trace::read_file(&file).unwrap();
    let live: Vec<(u64, &str)> = trace
        .events
        .iter()
        .filter(|e| e.kind() == Some(EventKind::RemoteFault) && e.flags & flags::FORCED == 0)
        .map(|e| (e.page, e.decision_name()))
        .collect();
    assert!(
        live.len() >= 6,
        "too few decided faults to compare: {live:?}"
    );
    let mut make = |n| flotilla_placement::by_name("heuristic", 1, n).unwrap();
    let (_, labels) = flotilla_sim::replay_labelled(
        &trace,
        &flotilla_sim::Shape::new(2, 1),
        &flotilla_sim::Costs::from_trace(&trace),
        flotilla_sim::Decider::Policy(&mut make),
        flotilla_sim::LookAhead::fixed(1),
        true,
    )
    .unwrap();
    let replayed: Vec<(u64, &str)> = labels
        .iter()
        .map(|l| {
            let d = match l.taken {
                flotilla_sim::Decision::MovePage => "move_page",
                flotilla_sim::Decision::MoveVcpu => "move_vcpu",
            };
            (l.page, d)
        })
        .collect();
    // The same rules (the image replicated, the stack following its vCPU, claims of
    // fresh memory and first-touch runs, the history travelling with the vCPU) give the
    // same decisions: exactly at first, then the engine's timing-dependent details (a
    // fault served under its page's lock, which claims nothing; which neighbours a first
    // touch mapped) let them drift. The stated tolerance: the first 50 decisions agree
    // exactly, and the counts of decided faults and of vCPU moves within a factor of 2
    // (measured: 503 decided faults live, 701 replayed; 28 vCPU moves live, 44 replayed).
    let n = 50.min(live.len()).min(replayed.len());
    assert_eq!(live[..n], replayed[..n], "the first {n} decisions differ");
    let moves = |d: &[(u64, &str)]| d.iter().filter(|x| x.1 == "move_vcpu").count() as f64;
    for (what, l, r) in [
        ("decided faults", live.len() as f64, replayed.len() as f64),
        ("vCPU moves", moves(&live), moves(&replayed)),
    ] {
        eprintln!("{what}: live {l}, replayed {r}");
        assert!(
            r >= l / 2.0 && r <= l * 2.0,
            "{what}: live {l}, replayed {r}"
        );
    }
    let _ = std::fs::remove_file(file);
}
