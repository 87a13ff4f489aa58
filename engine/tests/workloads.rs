//! Every workload of the suite, run as a guest, gives the checksum the same code
//! computes natively on host threads.

mod common;

use common::{config, kvm};
use flotilla_engine::Machine;
use flotilla_workloads::{native, Workload};

/// Small problem sizes: seconds for the whole suite, yet every phase runs.
fn small_args(w: Workload) -> &'static str {
    match w {
        Workload::Stream => "n=200k reps=4",
        Workload::Matmul => "n=96",
        Workload::Bfs => "vertices=50k degree=6",
        Workload::Kvstore => "ops=200k keys=30k",
        Workload::Sort => "n=300k",
        Workload::Queue => "items=30k capacity=64",
        Workload::Chase => "nodes=20k steps=100k",
    }
}

fn check(w: Workload, vcpus: u32, args: &str) {
    let prepared = w.prepare(args).expect("valid arguments");
    let reference = native::run(&prepared, vcpus as usize)
        .expect("native run")
        .checksum;
    let mem = (prepared.mem_bytes(vcpus as usize) as u64 + (16 << 20)).next_multiple_of(2 << 20);
    let image = flotilla_guest_images::image(w);
    let outcome = Machine::boot(config(vcpus, mem, args), image)
        .unwrap()
        .run()
        .unwrap();
    let console = String::from_utf8_lossy(&outcome.console);
    assert_eq!(
        outcome.exit_code,
        0,
        "{} on {vcpus} vCPUs: {console}",
        w.name()
    );
    assert_eq!(
        outcome.report,
        Some(reference),
        "{} on {vcpus} vCPUs: {console}",
        w.name()
    );
    assert!(console.contains("self-check=ok"), "{console}");
}

#[test]
fn every_workload_matches_the_host_reference_on_1_and_4_vcpus() {
    if !kvm() {
        return;
    }
    for w in Workload::ALL {
        for vcpus in [1, 4] {
            check(w, vcpus, small_args(w));
        }
    }
}

#[test]
fn odd_vcpu_counts_work() {
    if !kvm() {
        return;
    }
    check(Workload::Sort, 3, "n=100001");
    check(Workload::Queue, 5, "items=10k capacity=7");
    check(Workload::Bfs, 7, "vertices=20k degree=3");
}

#[test]
fn bad_arguments_end_the_guest_with_code_2() {
    if !kvm() {
        return;
    }
    let image = flotilla_guest_images::image(Workload::Stream);
    let outcome = Machine::boot(config(2, 64 << 20, "n=banana"), image)
        .unwrap()
        .run()
        .unwrap();
    assert_eq!(outcome.exit_code, 2);
    assert!(String::from_utf8_lossy(&outcome.console).contains("n='banana'"));
    // Too little guest memory for the problem size: code 3, with both sizes named.
    let outcome = Machine::boot(config(2, 64 << 20, "n=100m"), image)
        .unwrap()
        .run()
        .unwrap();
    assert_eq!(outcome.exit_code, 3);
    assert!(String::from_utf8_lossy(&outcome.console).contains("needs"));
}

#[test]
fn sixty_four_vcpus_and_sixteen_gib_of_lazy_ram() {
    if !kvm() {
        return;
    }
    let (w, vcpus, args) = (Workload::Stream, 64, "n=100k reps=2");
    let reference = native::run(&w.prepare(args).unwrap(), vcpus)
        .unwrap()
        .checksum;
    let outcome = Machine::boot(
        config(vcpus as u32, 16 << 30, args),
        flotilla_guest_images::image(w),
    )
    .unwrap()
    .run()
    .unwrap();
    assert_eq!((outcome.exit_code, outcome.report), (0, Some(reference)));
}

/// The CPUs a thread of this process may run on, from /proc, by thread name.
fn allowed_cpus_of(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        if status.lines().next() == Some(&format!("Name:\t{name}")) {
            if let Some(l) = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")) {
                out.push(l.split_whitespace().nth(1).unwrap_or("").to_string());
            }
        }
    }
    out
}

#[test]
fn pinned_vcpus_and_native_threads_run_where_they_are_told() {
    if !kvm() {
        return;
    }
    let (w, args) = (Workload::Kvstore, "ops=3m keys=100k");
    let prepared = w.prepare(args).unwrap();
    let reference = native::run_pinned(&prepared, 2, &[0]).unwrap().checksum;
    let mut cfg = config(2, 64 << 20, args);
    cfg.vcpu_cpus = vec![0];
    let running = Machine::boot(cfg, flotilla_guest_images::image(w))
        .unwrap()
        .start()
        .unwrap();
    // Other tests of this process run machines too (their vCPU threads have the same
    // names, unpinned): look for ours, the ones confined to CPU 0.
    let pinned = |name: &str| allowed_cpus_of(name).iter().any(|c| c == "0");
    let mut seen = (false, false);
    for _ in 0..100 {
        seen = (pinned("n0vcpu0"), pinned("n0vcpu1"));
        if seen == (true, true) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let outcome = running.wait().unwrap();
    assert_eq!(outcome.report, Some(reference));
    assert_eq!(seen, (true, true), "both vCPU threads on CPU 0");
    // A CPU the host does not have is refused, not ignored.
    let e = native::run_pinned(&prepared, 2, &[100_000]).unwrap_err();
    assert!(e.to_string().contains("pin"), "{e}");
}
