//! `flotilla run --nodes N` and the benchmarks start local clusters through [`launch`]:
//! it makes a fresh cluster secret, starts N `flotilla node --launched` processes on
//! loopback, hands each the secret and the configuration on its standard input (neither
//! is ever written to disk), reads node 0's result, and makes sure a node that dies ends
//! the run with an error naming it.
//!
//! Nothing outlives the launcher: every node is started with `PR_SET_PDEATHSIG`, so the
//! kernel kills it when the launcher dies however it dies (SIGKILL included), and
//! SIGINT, SIGTERM and SIGHUP make the launcher stop its nodes and remove its private
//! directory (trace parts only) before it dies of the same signal.

use crate::config::{self, ClusterFile, SecretSource};
use crate::node::ObserveArgs;
use crate::report::{Reported, RESULT_PREFIX};
use anyhow::{anyhow, bail, Context, Result};
use flotilla_engine::cluster::{monotonic_ns, quantile};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// A local cluster to start.
#[derive(Debug, Clone)]
pub struct Launch {
    pub nodes: u16,
    pub transport: String,
    pub policy: String,
    /// The model of `--policy learned`.
    pub model: Option<PathBuf>,
    pub seed: u64,
    pub vcpus: u32,
    pub mem: u64,
    /// Bytes of each vCPU's stack, guard page included.
    pub stack_bytes: u64,
    pub args: String,
    pub workload: Option<String>,
    pub image: Option<PathBuf>,
    pub vcpu_nodes: Option<Vec<u16>>,
    pub ram: String,
    pub timeout: Option<Duration>,
    pub echo_rounds: u32,
    /// Pin each node to its own CPUs (`--cpus-per-node`).
    pub cpus_per_node: Option<u32>,
    /// Emulated one-way link delay in µs (`--link-delay-us`).
    pub link_delay_us: u64,
    pub observe: ObserveArgs,
    /// Health signals to inject, by node.
    pub inject_health: Vec<(u16, String, f64)>,
}

impl Launch {
    /// A built-in workload on `nodes` local nodes with the defaults of `flotilla run`
    /// (TCP, heuristic, seed 1, round-robin vCPUs, contiguous RAM, a 300 s timeout, no
    /// pinning or telemetry); callers change what they measure.
    pub fn workload(name: &str, args: &str, nodes: u16, vcpus: u32, mem: u64) -> Self {
        Launch {
            nodes,
            transport: "tcp".into(),
            policy: "heuristic".into(),
            model: None,
            seed: 1,
            vcpus,
            mem,
            stack_bytes: flotilla_abi::STACK_BYTES_DEFAULT,
            args: args.to_string(),
            workload: Some(name.to_string()),
            image: None,
            vcpu_nodes: None,
            ram: "contiguous".into(),
            timeout: Some(Duration::from_secs(300)),
            echo_rounds: 0,
            cpus_per_node: None,
            link_delay_us: 0,
            observe: ObserveArgs::default(),
            inject_health: Vec::new(),
        }
    }
}

/// A private directory (0700) removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "flotilla-{what}-{}-{}",
            std::process::id(),
            random_hex(8)?
        ));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = TempDir(dir);
        std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        Ok(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn free_ports(n: usize) -> Result<Vec<String>> {
    // Bound together so they differ; freed just before the nodes bind them.
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("finding free loopback ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.to_string()))
        .collect()
}

/// The signal that asked the launcher to stop (0: none yet).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn note_stop_signal(sig: libc::c_int) {
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
}

/// While alive, SIGINT, SIGTERM and SIGHUP only set [`STOP_SIGNAL`], which the launcher
/// polls; on drop the previous handlers come back and a caught signal is raised again,
/// so the process still dies of it (after the launcher has cleaned up).
struct StopSignals {
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

impl StopSignals {
    fn catch() -> Self {
        let mut previous = Vec::new();
        for sig in STOP_SIGNALS {
            // SAFETY: a zeroed sigaction is a valid value; the handler only stores to an
            // atomic, which is async-signal-safe; `old` is written by the kernel.
            unsafe {
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction =
                    note_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                libc::sigemptyset(&mut act.sa_mask);
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, &act, &mut old) != 0 {
                    continue;
                }
                if old.sa_sigaction == libc::SIG_IGN {
                    // Ignored by whoever started us (nohup, a background job): keep it so.
                    libc::sigaction(sig, &old, std::ptr::null_mut());
                    continue;
                }
                previous.push((sig, old));
            }
        }
        StopSignals { previous }
    }

    fn caught() -> Option<libc::c_int> {
        match STOP_SIGNAL.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        for (sig, old) in &self.previous {
            // SAFETY: restores a handler the kernel gave us for the same signal.
            unsafe { libc::sigaction(*sig, old, std::ptr::null_mut()) };
        }
        if let Some(sig) = StopSignals::caught() {
            // SAFETY: raising a signal has no memory-safety preconditions.
            unsafe { libc::raise(sig) };
        }
    }
}

/// Starts the cluster, waits for node 0's result, and stops every node. `Err` is for a
/// launch that could not start; a run that failed is a [`Reported`] with an error.
pub fn launch(l: &Launch) -> Result<Reported> {
    let signals = StopSignals::catch();
    let result = launch_caught(l);
    drop(signals);
    result
}

fn launch_caught(l: &Launch) -> Result<Reported> {
    let secret = random_hex(32)?;
    let file = ClusterFile {
        id: None,
        nodes: free_ports(l.nodes as usize)?,
        secret_file: None,
        transport: l.transport.clone(),
        workload: l.workload.clone(),
        image: l.image.clone(),
        vcpus: l.vcpus,
        mem: Some(Value::from(l.mem)),
        args: l.args.clone(),
        policy: l.policy.clone(),
        model: l.model.clone(),
        seed: l.seed,
        vcpu_nodes: l.vcpu_nodes.clone(),
        ram: l.ram.clone(),
        timeout_s: l.timeout.map(|t| t.as_secs_f64()),
        epoch_ns: Some(monotonic_ns()),
        echo_rounds: l.echo_rounds,
        cpus_per_node: l.cpus_per_node,
        stack: Some(Value::from(l.stack_bytes)),
        link_delay_us: (l.link_delay_us > 0).then_some(l.link_delay_us),
    };
    // Validate here first, so a bad option fails once, clearly, before any process.
    config::setup(&file, Some(0), SecretSource::Given(secret.as_bytes()))?;
    let cpu_sets = match l.cpus_per_node {
        Some(c) => Some(crate::cpus::layout(&crate::cpus::allowed()?, l.nodes, c)?),
        None => None,
    };
    let metrics = metrics_addrs(l)?;
    if let Some(path) = &l.observe.trace {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(dir) = parent.filter(|d| !d.is_dir()) {
            bail!(
                "--trace {}: directory {} does not exist",
                path.display(),
                dir.display()
            );
        }
        if path.is_dir() {
            bail!(
                "--trace {}: is a directory; give a file name",
                path.display()
            );
        }
    }
    if let Some((node, _, _)) = l.inject_health.iter().find(|(n, _, _)| *n >= l.nodes) {
        bail!(
            "--inject-health: node {node} is not one of the {} nodes",
            l.nodes
        );
    }
    for (id, addr) in metrics.iter().enumerate() {
        crate::say_err(&format!(
            "flotilla: node {id} metrics at http://{addr}/metrics"
        ));
    }
    // Trace parts, one per node, merged at the end.
    let parts_dir = match l.observe.trace {
        Some(_) => Some(TempDir::new("trace")?),
        None => None,
    };
    let part = |id: u16| {
        parts_dir
            .as_ref()
            .map(|d| d.0.join(format!("trace.node{id}")))
    };
    let input = format!("{secret}\n{}\n", serde_json::to_string(&file)?);
    let exe = std::env::current_exe().context("finding the flotilla executable")?;
    let launcher = std::process::id();
    let mut children: Vec<Child> = Vec::new();
    for id in 0..l.nodes {
        let mut cmd = Command::new(&exe);
        cmd.args([
            "node",
            "--launched",
            "--config",
            "-",
            "--id",
            &id.to_string(),
        ])
        .args(node_observe_args(l, id, &metrics, part(id).as_deref()))
        .stdin(Stdio::piped())
        .stdout(if id == 0 {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::inherit());
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // async-signal-safe functions (prctl, getppid).
        unsafe {
            cmd.pre_exec(move || {
                // The kernel kills this node when the launcher's thread goes away.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The launcher may have died before the line above.
                if libc::getppid() as u32 != launcher {
                    return Err(std::io::Error::other("the launcher is gone"));
                }
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(mut c) => {
                // A node that died at once is noticed below; its pipe error is not news.
                if let Some(mut stdin) = c.stdin.take() {
                    let _ = stdin.write_all(input.as_bytes());
                }
                children.push(c);
            }
            Err(e) => {
                kill_all(&mut children);
                bail!("cannot start node {id}: {e}");
            }
        }
    }
    let stdout = children[0]
        .stdout
        .take()
        .ok_or_else(|| anyhow!("node 0's stdout is not piped"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if let Some(json) = line.strip_prefix(RESULT_PREFIX) {
                let _ = tx.send(json.to_string());
            }
        }
    });
    // Wait for node 0's result; a node that dies first ends the run naming it.
    let line = loop {
        if let Ok(line) = rx.try_recv() {
            break line;
        }
        if let Some(sig) = StopSignals::caught() {
            kill_all(&mut children);
            bail!("stopped by signal {sig}");
        }
        if let Some((id, status)) = first_death(&mut children) {
            // Node 0 names the node it lost (and may have printed its result just
            // before exiting); give it a moment to say so.
            if let Ok(line) = rx.recv_timeout(Duration::from_secs(3)) {
                break line;
            }
            // A node killed by a signal is the cause; nodes that then lost it exit with
            // an error of their own.
            let (id, status) = first_death(&mut children).unwrap_or((id, status));
            kill_all(&mut children);
            let mut failed = Reported::failed(
                l.nodes,
                format!("node {id} died ({status}) before the run ended"),
            );
            failed.cpu_sets = cpu_sets;
            return Ok(failed);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut reported = Reported::from_line(&line)?;
    reported.cpu_sets = cpu_sets;
    // A node whose counters never reached node 0 is dead or hung (node 0 lost its link):
    // waiting for it to exit would only add the grace period below to the run.
    for id in reported.missing_counters() {
        if let Some(c) = children.get_mut(id as usize) {
            let _ = c.kill();
        }
    }
    let linger = Duration::from_secs_f64(l.observe.metrics_linger.unwrap_or(0.0));
    let deadline = Instant::now() + Duration::from_secs(10) + linger;
    for c in children.iter_mut() {
        while Instant::now() < deadline
            && StopSignals::caught().is_none()
            && matches!(c.try_wait(), Ok(None))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    kill_all(&mut children);
    if let Some(sig) = StopSignals::caught() {
        bail!("stopped by signal {sig}");
    }
    if let Some(path) = &l.observe.trace {
        let parts: Vec<PathBuf> = (0..l.nodes).filter_map(part).collect();
        // A failed run's trace is kept too (that is when it is wanted most), marked as
        // such, with the parts of nodes that died named as missing.
        match merge_trace(&parts, path, &reported) {
            Ok(n) => reported.trace_events = Some(n),
            Err(e) => reported.trace_error = Some(format!("{e:#}")),
        }
    }
    Ok(reported)
}

/// Merges the nodes' trace parts into `path`, with what the run's end taught (outcome,
/// measured costs, CPU sets) in its run metadata; returns the number of events.
fn merge_trace(parts: &[PathBuf], path: &Path, reported: &Reported) -> Result<u64> {
    use flotilla_telemetry::trace::{self, Outcome};
    let mut read = Vec::new();
    let mut missing = Vec::new();
    for (k, p) in parts.iter().enumerate() {
        match trace::read_file(p) {
            Ok(t) => read.push((k as u16, format!("node {k}'s trace"), t)),
            Err(e) => {
                tracing::warn!(node = k, error = %e, "node's trace part unreadable; the trace leaves it out");
                missing.push(k as u16);
            }
        }
    }
    let Some((_, _, first)) = read.first() else {
        bail!("no node left a readable trace part");
    };
    let mut meta = first.meta.clone();
    let mut run = meta.run.take().unwrap_or_default();
    run.costs = measured_costs(&reported.samples);
    match &reported.result {
        Ok(code) => run.exit_code = *code,
        Err(e) => {
            run.outcome = Outcome::Failed;
            run.error = e.clone();
        }
    }
    run.cpu_sets = reported
        .cpu_sets
        .iter()
        .flatten()
        .map(|set| set.iter().map(|&c| c as u16).collect())
        .collect();
    run.missing_nodes = missing;
    run.wall_ns = (reported.wall_ms * 1e6) as u64;
    meta.run = Some(run);
    let trace = trace::merge_parts(meta, read)?;
    // Written beside the target (same extension, so .gz compresses), then renamed: a
    // failure never leaves half a file under the name asked for.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let staging = path.with_file_name(format!(".partial-{name}"));
    let written = flotilla_telemetry::trace::write_file(&staging, &trace)
        .map_err(anyhow::Error::from)
        .and_then(|_| std::fs::rename(&staging, path).map_err(anyhow::Error::from));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&staging);
        bail!("writing the trace {}: {e}", path.display());
    }
    Ok(trace.events.len() as u64)
}

/// Each node's metrics address: the base address's port plus the node id.
fn metrics_addrs(l: &Launch) -> Result<Vec<SocketAddr>> {
    let Some(base) = l.observe.metrics else {
        return Ok(Vec::new());
    };
    if base.port() == 0 {
        bail!("--metrics {base}: give a real base port (node K listens on port + K)");
    }
    (0..l.nodes)
        .map(|id| {
            let port = base.port().checked_add(id).ok_or_else(|| {
                anyhow!("--metrics {base}: port + {id} for node {id} is beyond 65535")
            })?;
            Ok(SocketAddr::new(base.ip(), port))
        })
        .collect()
}

/// The telemetry arguments `flotilla node` gets for node `id`.
fn node_observe_args(
    l: &Launch,
    id: u16,
    metrics: &[SocketAddr],
    part: Option<&Path>,
) -> Vec<String> {
    let mut a = Vec::new();
    if let Some(addr) = metrics.get(id as usize) {
        a.extend(["--metrics".to_string(), addr.to_string()]);
        if let Some(s) = l.observe.metrics_linger {
            a.extend(["--metrics-linger".to_string(), s.to_string()]);
        }
    }
    if let Some(part) = part {
        a.extend(["--trace".to_string(), part.display().to_string()]);
    }
    if l.observe.sample_rate > 0 {
        a.extend([
            "--sample-rate".to_string(),
            l.observe.sample_rate.to_string(),
        ]);
    }
    if let Some(ms) = l.observe.touch_epoch_ms {
        a.extend(["--touch-epoch-ms".to_string(), ms.to_string()]);
    }
    for (_, signal, value) in l.inject_health.iter().filter(|(n, _, _)| *n == id) {
        a.extend(["--inject-health".to_string(), format!("{signal}={value}")]);
    }
    a
}

/// The node that ended abnormally, preferring one killed by a signal (the likely cause
/// when several have ended); node 0 ending at all counts, since it owns the result.
fn first_death(children: &mut [Child]) -> Option<(usize, std::process::ExitStatus)> {
    use std::os::unix::process::ExitStatusExt;
    let ended: Vec<(usize, std::process::ExitStatus)> = children
        .iter_mut()
        .enumerate()
        .filter_map(|(id, c)| match c.try_wait() {
            Ok(Some(status)) if id == 0 || !status.success() => Some((id, status)),
            _ => None,
        })
        .collect();
    ended
        .iter()
        .find(|(_, s)| s.signal().is_some())
        .or(ended.first())
        .copied()
}

fn kill_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

/// The medians of a run's cost samples, as a trace's run metadata holds them.
pub fn measured_costs(
    samples: &flotilla_transport::wire::Samples,
) -> flotilla_telemetry::trace::Costs {
    let mut samples = samples.clone();
    let p50_ns = |list: &mut Vec<u32>| u64::from(quantile(list, 0.5)) * 1000;
    flotilla_telemetry::trace::Costs {
        rtt_4k_ns: p50_ns(&mut samples.rtt_4k_us),
        install_ns: p50_ns(&mut samples.install_us),
        capture_ns: p50_ns(&mut samples.capture_us),
        restore_ns: p50_ns(&mut samples.restore_us),
        fault_service_ns: p50_ns(&mut samples.fault_service_us),
        vcpu_move_ns: p50_ns(&mut samples.vcpu_move_us),
    }
}
