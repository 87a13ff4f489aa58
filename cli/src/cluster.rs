//! Clusters from the command line.
//!
//! - `flotilla node --config FILE [--id N]` runs one node of a cluster whose nodes are
//!   listed in FILE (README.md, "Cluster configuration"). Node 0 prints the run's result
//!   as one JSON line on stdout.
//! - [`launch`] is what `flotilla run --nodes N` and the benchmarks use: it writes a
//!   fresh cluster secret and configuration into a private temporary directory, starts N
//!   `flotilla node` processes on loopback, reads node 0's result, and makes sure a node
//!   that dies ends the run with an error naming it.

use crate::parse_size;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use flotilla_engine::cluster::{
    self, ClusterSpec, NodeSetup, Observe, RamPlacement, TraceMeta, TraceSetup,
};
use flotilla_transport::{Kind, MeshConfig, NodeStats, Samples};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Marks node 0's result line on stdout.
const RESULT_PREFIX: &str = "FLOTILLA-RESULT ";

/// The cluster configuration file (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    /// This node's id; `--id` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u16>,
    /// Every node's listening address, by id.
    pub nodes: Vec<String>,
    /// File holding the cluster secret (at least 16 bytes; not readable by others).
    pub secret_file: PathBuf,
    #[serde(default = "default_transport")]
    pub transport: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    pub vcpus: u32,
    /// Guest RAM: bytes, or a string like "512M".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<Value>,
    #[serde(default)]
    pub args: String,
    #[serde(default = "default_policy")]
    pub policy: String,
    #[serde(default)]
    pub seed: u64,
    /// Initial node of each vCPU (default: round-robin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_nodes: Option<Vec<u16>>,
    /// "contiguous" or "interleave".
    #[serde(default = "default_ram")]
    pub ram: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_ns: Option<u64>,
    #[serde(default)]
    pub echo_rounds: u32,
}

fn default_transport() -> String {
    "tcp".into()
}
fn default_policy() -> String {
    "heuristic".into()
}
fn default_ram() -> String {
    "contiguous".into()
}

#[derive(Args)]
pub struct NodeArgs {
    /// Cluster configuration file (see README.md).
    #[arg(long)]
    pub config: PathBuf,
    /// This node's id (default: the file's `id`).
    #[arg(long)]
    pub id: Option<u16>,
    #[command(flatten)]
    pub observe: ObserveArgs,
    /// Report a health signal with this value whatever /sys says, e.g.
    /// edac_uncorrectable_errors=3 (repeatable; for tests and drills).
    #[arg(long, value_parser = flotilla_telemetry::health::parse_injection)]
    pub inject_health: Vec<(String, f64)>,
    /// Read health signals from this directory instead of /sys.
    #[arg(long)]
    pub sysfs_root: Option<PathBuf>,
}

/// Telemetry options shared by `flotilla node` and `flotilla run`.
#[derive(Args, Clone, Debug, Default)]
pub struct ObserveArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics. For `flotilla run`, the base
    /// address: node K listens on port + K.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Keep serving metrics this many seconds after the run (for scrape intervals
    /// longer than the run).
    #[arg(long, value_name = "SECONDS", requires = "metrics", value_parser = parse_linger)]
    pub metrics_linger: Option<f64>,
    /// Record a fault trace into FILE (docs/trace-format.md).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Sampled access tracking: pages armed per second per node (0 = off).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub sample_rate: u32,
}

fn parse_linger(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}': give 0 to 3600 seconds")),
    }
}

impl ObserveArgs {
    pub fn any(&self) -> bool {
        self.metrics.is_some() || self.trace.is_some() || self.sample_rate > 0
    }
}

/// What a trace records about the run.
fn trace_meta(file: &ClusterFile, spec: &ClusterSpec, sample_rate: u32) -> TraceMeta {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    TraceMeta {
        workload: file.workload.clone().unwrap_or_default(),
        args: spec.args.clone(),
        image: file
            .image
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        policy: spec.policy.clone(),
        transport: file.transport.clone(),
        engine_version: env!("CARGO_PKG_VERSION").to_string(),
        host: format!(
            "{} (Linux {}, {cpus} CPUs)",
            read("/proc/sys/kernel/hostname"),
            read("/proc/sys/kernel/osrelease")
        ),
        nodes: spec.nodes,
        vcpus: spec.vcpus,
        mem_bytes: spec.mem_bytes,
        seed: spec.seed,
        started_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        sample_rate,
    }
}

fn mem_bytes(file: &ClusterFile, vcpus: u32) -> Result<u64> {
    match &file.mem {
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| anyhow!("mem: {n} is not a byte count")),
        Some(Value::String(s)) => parse_size(s).map_err(|e| anyhow!("mem: {e}")),
        Some(other) => bail!("mem: {other} is neither a number nor a size string"),
        None => match &file.workload {
            Some(w) => {
                let w = workload(w)?;
                let prepared = w.prepare(&file.args).map_err(|e| anyhow!("{e}"))?;
                Ok(crate::run::default_guest_mem(&prepared, vcpus))
            }
            None => Ok(256 << 20),
        },
    }
}

fn workload(name: &str) -> Result<flotilla_workloads::Workload> {
    flotilla_workloads::Workload::from_name(name).ok_or_else(|| {
        let known: Vec<&str> = flotilla_workloads::Workload::ALL
            .iter()
            .map(|w| w.name())
            .collect();
        anyhow!("unknown workload '{name}' (known: {})", known.join(", "))
    })
}

fn read_secret(path: &Path) -> Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cluster secret file {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "cluster secret file {} is readable by other users; chmod 600 it",
            path.display()
        );
    }
    let secret = std::fs::read(path)
        .with_context(|| format!("cannot read cluster secret file {}", path.display()))?;
    let secret = secret.trim_ascii().to_vec();
    if secret.len() < 16 {
        bail!(
            "cluster secret file {} holds {} bytes; at least 16 are needed",
            path.display(),
            secret.len()
        );
    }
    Ok(secret)
}

/// Builds this node's setup from a configuration file.
pub fn setup(file: &ClusterFile, id: Option<u16>) -> Result<NodeSetup> {
    let me = id
        .or(file.id)
        .ok_or_else(|| anyhow!("no node id: give --id or put \"id\" in the configuration"))?;
    let nodes = file.nodes.len();
    if nodes == 0 || nodes > flotilla_transport::MAX_NODES {
        bail!(
            "nodes: a cluster has 1 to {} nodes, not {nodes}",
            flotilla_transport::MAX_NODES
        );
    }
    if me as usize >= nodes {
        bail!("node id {me} is not below the number of nodes ({nodes})");
    }
    let addrs = file
        .nodes
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.parse::<SocketAddr>().map_err(|e| {
                anyhow!("nodes[{i}]: '{a}' is not an address like 127.0.0.1:7000 ({e})")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let transport = Kind::from_name(&file.transport)
        .ok_or_else(|| anyhow!("transport '{}': use tcp or shm", file.transport))?;
    let ram = RamPlacement::from_name(&file.ram)
        .ok_or_else(|| anyhow!("ram '{}': use contiguous or interleave", file.ram))?;
    if file.vcpus == 0 || file.vcpus > flotilla_abi::VCPUS_MAX {
        bail!(
            "vcpus {}: a guest has 1 to {}",
            file.vcpus,
            flotilla_abi::VCPUS_MAX
        );
    }
    let vcpu_nodes = match &file.vcpu_nodes {
        Some(v) => v.clone(),
        None => ClusterSpec::round_robin(nodes as u16, file.vcpus),
    };
    let image = match (&file.workload, &file.image) {
        (Some(w), None) => flotilla_guest_images::image(workload(w)?).to_vec(),
        (None, Some(p)) => {
            std::fs::read(p).with_context(|| format!("cannot read guest image {}", p.display()))?
        }
        _ => bail!("give exactly one of \"workload\" and \"image\""),
    };
    let timeout = match file.timeout_s {
        Some(t) if !(t > 0.0 && t.is_finite()) => bail!("timeout_s {t}: must be positive"),
        t => t.map(Duration::from_secs_f64),
    };
    let spec = ClusterSpec {
        nodes: nodes as u16,
        vcpus: file.vcpus,
        mem_bytes: mem_bytes(file, file.vcpus)?,
        args: file.args.clone(),
        stack_bytes: flotilla_abi::STACK_BYTES_DEFAULT,
        policy: file.policy.clone(),
        seed: file.seed,
        vcpu_nodes,
        ram,
    };
    flotilla_placement::by_name(&spec.policy, spec.seed, me).map_err(|e| anyhow!("{e}"))?;
    let digest = flotilla_transport::auth::digest(&spec.canonical(&image));
    let mesh = MeshConfig {
        me,
        addrs,
        secret: read_secret(&file.secret_file)?,
        digest,
        connect_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(3),
    };
    Ok(NodeSetup {
        me,
        spec,
        image,
        transport,
        mesh,
        timeout,
        echo_rounds: file.echo_rounds,
        epoch_ns: file.epoch_ns,
        observe: Default::default(),
    })
}

fn stats_json(s: &NodeStats) -> Value {
    json!({
        "remote_faults": s.remote_faults, "page_moves": s.page_moves,
        "replicas_made": s.replicas_made, "invalidations": s.invalidations,
        "vcpu_moves": s.vcpu_moves, "bytes_sent": s.bytes_sent, "exits": s.exits,
    })
}

fn samples_json(s: &Samples) -> Value {
    json!({
        "fault_service_us": s.fault_service_us, "vcpu_move_us": s.vcpu_move_us,
        "install_us": s.install_us, "capture_us": s.capture_us,
        "restore_us": s.restore_us, "rtt_4k_us": s.rtt_4k_us,
    })
}

/// `flotilla node`.
pub fn node(args: NodeArgs) -> Result<i32> {
    let text = std::fs::read_to_string(&args.config).with_context(|| {
        format!(
            "cannot read cluster configuration {}",
            args.config.display()
        )
    })?;
    let file: ClusterFile = serde_json::from_str(&text)
        .with_context(|| format!("cluster configuration {}", args.config.display()))?;
    let mut setup = setup(&file, args.id)?;
    let me = setup.me;
    setup.observe = Observe {
        metrics_addr: args.observe.metrics,
        metrics_linger: args.observe.metrics_linger.map(Duration::from_secs_f64),
        trace: args.observe.trace.as_ref().map(|path| TraceSetup {
            path: path.clone(),
            meta: trace_meta(&file, &setup.spec, args.observe.sample_rate),
        }),
        sample_rate: args.observe.sample_rate,
        sysfs_root: args.sysfs_root.clone(),
        health_inject: args.inject_health.clone(),
    };
    match cluster::run_node(setup) {
        Ok(Some(o)) => {
            let result = json!({
                "exit_code": o.exit_code,
                "report": o.report,
                "console": String::from_utf8_lossy(&o.console),
                "console_truncated": o.console_truncated,
                "wall_ms": o.wall.as_secs_f64() * 1e3,
                "totals": stats_json(&o.totals),
                "per_node": o.per_node.iter().map(stats_json).collect::<Vec<_>>(),
                "samples": samples_json(&o.samples),
            });
            println!("{RESULT_PREFIX}{result}");
            Ok(0)
        }
        Ok(None) => Ok(0),
        Err(e) => {
            if me == 0 {
                println!("{RESULT_PREFIX}{}", json!({ "error": e.to_string() }));
            }
            eprintln!("flotilla node {me}: {e}");
            Ok(2)
        }
    }
}

/// A local cluster to start.
#[derive(Debug, Clone)]
pub struct Launch {
    pub nodes: u16,
    pub transport: String,
    pub policy: String,
    pub seed: u64,
    pub vcpus: u32,
    pub mem: u64,
    pub args: String,
    pub workload: Option<String>,
    pub image: Option<PathBuf>,
    pub vcpu_nodes: Option<Vec<u16>>,
    pub ram: String,
    pub timeout: Option<Duration>,
    pub echo_rounds: u32,
    pub observe: ObserveArgs,
    /// Health signals to inject, by node.
    pub inject_health: Vec<(u16, String, f64)>,
}

/// What node 0 reported, parsed.
#[derive(Debug, Clone)]
pub struct Reported {
    pub exit_code: i32,
    pub report: Option<u64>,
    pub console: String,
    pub wall_ms: f64,
    pub totals: Value,
    pub samples: Value,
    /// Events in the merged trace, if one was recorded.
    pub trace_events: Option<u64>,
}

/// A private directory removed on drop.
struct TempDir(PathBuf);

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

/// Starts the cluster, waits for node 0's result, and stops every node.
pub fn launch(l: &Launch) -> Result<std::result::Result<Reported, String>> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = std::env::temp_dir().join(format!(
        "flotilla-{}-{}",
        std::process::id(),
        random_hex(8)?
    ));
    std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = TempDir(dir);
    std::fs::set_permissions(&dir.0, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let secret_file = dir.0.join("secret");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret_file)?;
        writeln!(f, "{}", random_hex(32)?)?;
    }
    let file = ClusterFile {
        id: None,
        nodes: free_ports(l.nodes as usize)?,
        secret_file,
        transport: l.transport.clone(),
        workload: l.workload.clone(),
        image: l.image.clone(),
        vcpus: l.vcpus,
        mem: Some(Value::from(l.mem)),
        args: l.args.clone(),
        policy: l.policy.clone(),
        seed: l.seed,
        vcpu_nodes: l.vcpu_nodes.clone(),
        ram: l.ram.clone(),
        timeout_s: l.timeout.map(|t| t.as_secs_f64()),
        epoch_ns: Some(cluster::monotonic_ns()),
        echo_rounds: l.echo_rounds,
    };
    // Validate here first, so a bad option fails once, clearly, before any process.
    setup(&file, Some(0))?;
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
        eprintln!("flotilla: node {id} metrics at http://{addr}/metrics");
    }
    let part = |id: u16| dir.0.join(format!("trace.node{id}"));
    let config = dir.0.join("cluster.json");
    std::fs::write(&config, serde_json::to_vec_pretty(&file)?)?;
    let exe = std::env::current_exe().context("finding the flotilla executable")?;
    let mut children: Vec<Child> = Vec::new();
    for id in 0..l.nodes {
        let child = Command::new(&exe)
            .arg("node")
            .arg("--config")
            .arg(&config)
            .arg("--id")
            .arg(id.to_string())
            .args(node_observe_args(l, id, &metrics, &part(id)))
            .stdin(Stdio::null())
            .stdout(if id == 0 {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit())
            .spawn();
        match child {
            Ok(c) => children.push(c),
            Err(e) => {
                kill_all(&mut children);
                bail!("cannot start node {id}: {e}");
            }
        }
    }
    let stdout = children[0].stdout.take().expect("node 0's stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if let Some(json) = line.strip_prefix(RESULT_PREFIX) {
                let _ = tx.send(json.to_string());
            }
        }
    });
    // Wait for node 0's result; a node that dies first ends the run naming it.
    let result = loop {
        if let Ok(line) = rx.try_recv() {
            break Some(line);
        }
        let mut died = None;
        for (id, c) in children.iter_mut().enumerate() {
            if let Ok(Some(status)) = c.try_wait() {
                if id == 0 || !status.success() {
                    died = Some((id, status));
                    break;
                }
            }
        }
        if let Some((id, status)) = died {
            // Node 0 may have printed its result just before exiting.
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
                break Some(line);
            }
            kill_all(&mut children);
            return Ok(Err(format!(
                "node {id} died ({status}) before the run ended"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let linger = Duration::from_secs_f64(l.observe.metrics_linger.unwrap_or(0.0));
    let deadline = Instant::now() + Duration::from_secs(10) + linger;
    for c in children.iter_mut() {
        while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let clean = children
        .iter_mut()
        .all(|c| matches!(c.try_wait(), Ok(Some(s)) if s.success()));
    kill_all(&mut children);
    let line = result.ok_or_else(|| anyhow!("node 0 printed no result"))?;
    let v: Value = serde_json::from_str(&line).context("node 0's result")?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return Ok(Err(e.to_string()));
    }
    let trace_events = match &l.observe.trace {
        Some(path) if clean => {
            let parts: Vec<PathBuf> = (0..l.nodes).map(part).collect();
            let meta = flotilla_telemetry::trace::read_file(&parts[0])
                .with_context(|| "node 0's trace")?
                .meta;
            let trace = flotilla_telemetry::trace::merge(meta, &parts)?;
            // Written beside the target (same extension, so .gz compresses), then
            // renamed: a failure never leaves half a file under the name asked for.
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
            Some(trace.events.len() as u64)
        }
        Some(_) => {
            bail!("a node did not end cleanly; its trace is incomplete, so none was written")
        }
        None => None,
    };
    Ok(Ok(Reported {
        exit_code: v["exit_code"].as_i64().unwrap_or(-1) as i32,
        report: v["report"].as_u64(),
        console: v["console"].as_str().unwrap_or_default().to_string(),
        wall_ms: v["wall_ms"].as_f64().unwrap_or(0.0),
        totals: v["totals"].clone(),
        samples: v["samples"].clone(),
        trace_events,
    }))
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
fn node_observe_args(l: &Launch, id: u16, metrics: &[SocketAddr], part: &Path) -> Vec<String> {
    let mut a = Vec::new();
    if let Some(addr) = metrics.get(id as usize) {
        a.extend(["--metrics".to_string(), addr.to_string()]);
        if let Some(s) = l.observe.metrics_linger {
            a.extend(["--metrics-linger".to_string(), s.to_string()]);
        }
    }
    if l.observe.trace.is_some() {
        a.extend(["--trace".to_string(), part.display().to_string()]);
    }
    if l.observe.sample_rate > 0 {
        a.extend([
            "--sample-rate".to_string(),
            l.observe.sample_rate.to_string(),
        ]);
    }
    for (_, signal, value) in l.inject_health.iter().filter(|(n, _, _)| *n == id) {
        a.extend(["--inject-health".to_string(), format!("{signal}={value}")]);
    }
    a
}

fn kill_all(children: &mut [Child]) {
    for c in children.iter_mut() {
        if matches!(c.try_wait(), Ok(None)) {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
}

/// One list of latency samples (µs) from node 0's result.
pub fn sample_list(samples: &Value, name: &str) -> Vec<u32> {
    samples[name]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64())
                .map(|x| x as u32)
                .collect()
        })
        .unwrap_or_default()
}

/// `{p50, p99}` of a list of samples in a result.
pub fn percentiles(samples: &Value, name: &str) -> Value {
    let mut v = sample_list(samples, name);
    if v.is_empty() {
        return json!({"p50": null, "p99": null});
    }
    let p50 = cluster::quantile(&mut v, 0.5);
    let p99 = cluster::quantile(&mut v, 0.99);
    json!({"p50": p50, "p99": p99})
}
