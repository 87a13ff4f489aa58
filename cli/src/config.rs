//! The cluster configuration: the JSON file every node of a cluster reads (README.md,
//! "Cluster configuration"), checked and turned into the engine's [`NodeSetup`].

use crate::sizing::{default_guest_mem, parse_size, MIN_DEFAULT_MEM_BYTES};
use anyhow::{anyhow, bail, Context, Result};
use flotilla_engine::cluster::{ClusterSpec, NodeSetup, RamPlacement, TraceMeta};
use flotilla_telemetry::trace::RunMeta;
use flotilla_transport::{Kind, MeshConfig};
use flotilla_workloads::Workload;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// Nodes that `flotilla run` starts get the secret on standard input instead, so it
    /// is never on disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
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
    /// The ONNX model `learned` serves (every node reads its own copy; all must agree).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
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
    /// Confine node K to the K-th run of this many CPUs of its host (for nodes that share
    /// a host: see `cpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus_per_node: Option<u32>,
    /// Bytes of each vCPU's stack, its 4 KiB guard page included (a number or a size
    /// string; default 256 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<Value>,
    /// Emulated one-way link delay in µs, added to every frame this node receives
    /// (default 0; at most 1,000,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_delay_us: Option<u64>,
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

/// The configuration's emulated link delay, checked.
pub fn link_delay(file: &ClusterFile) -> Result<Duration> {
    let us = file.link_delay_us.unwrap_or(0);
    let max = flotilla_transport::MAX_LINK_DELAY.as_micros() as u64;
    if us > max {
        bail!("link_delay_us {us}: at most {max} µs (1 s) can be emulated");
    }
    Ok(Duration::from_micros(us))
}

/// What a trace records about the run.
pub fn trace_meta(
    file: &ClusterFile,
    spec: &ClusterSpec,
    observe: &crate::node::ObserveArgs,
) -> TraceMeta {
    let sample_rate = observe.sample_rate;
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
        run: Some(RunMeta {
            ram: match spec.ram {
                RamPlacement::Contiguous => "contiguous",
                RamPlacement::Interleave => "interleave",
            }
            .into(),
            vcpu_nodes: spec.vcpu_nodes.clone(),
            stack_bytes: spec.stack_bytes,
            link_delay_ns: file.link_delay_us.unwrap_or(0).saturating_mul(1000),
            touch_epoch_ns: observe
                .touch_epoch_ms
                .map_or(0, |ms| u64::from(ms) * 1_000_000),
            // The rest is known when the run is over: the launcher fills it in.
            ..Default::default()
        }),
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
                Ok(default_guest_mem(&prepared, vcpus))
            }
            None => Ok(MIN_DEFAULT_MEM_BYTES),
        },
    }
}

fn stack_bytes(file: &ClusterFile) -> Result<u64> {
    match &file.stack {
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| anyhow!("stack: {n} is not a byte count")),
        Some(Value::String(s)) => parse_size(s).map_err(|e| anyhow!("stack: {e}")),
        Some(other) => bail!("stack: {other} is neither a number nor a size string"),
        None => Ok(flotilla_abi::STACK_BYTES_DEFAULT),
    }
}

/// A built-in workload by name, or an error listing the known ones.
pub fn workload(name: &str) -> Result<Workload> {
    Workload::from_name(name).ok_or_else(|| {
        let known: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
        anyhow!("unknown workload '{name}' (known: {})", known.join(", "))
    })
}

/// Where a node gets the cluster secret.
pub enum SecretSource<'a> {
    /// The configuration's `secret_file`.
    File,
    /// Already read (from standard input, or made by the launcher).
    Given(&'a [u8]),
}

fn check_secret(secret: &[u8], from: &str) -> Result<Vec<u8>> {
    let secret = secret.trim_ascii().to_vec();
    if secret.len() < 16 {
        bail!(
            "cluster secret {from} holds {} bytes; at least 16 are needed",
            secret.len()
        );
    }
    Ok(secret)
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
    check_secret(&secret, &format!("file {}", path.display()))
}

/// Builds this node's setup from a configuration file.
pub fn setup(file: &ClusterFile, id: Option<u16>, secret: SecretSource) -> Result<NodeSetup> {
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
    // A learned policy's model is read and checked here, before the guest starts.
    let policy = crate::policy::Choice::new(&file.policy, file.seed, file.model.as_deref())?;
    let spec = ClusterSpec {
        nodes: nodes as u16,
        vcpus: file.vcpus,
        mem_bytes: mem_bytes(file, file.vcpus)?,
        args: file.args.clone(),
        stack_bytes: stack_bytes(file)?,
        policy: file.policy.clone(),
        model: policy.digest.clone(),
        seed: file.seed,
        vcpu_nodes,
        ram,
    };
    spec.check(me)?;
    let digest = flotilla_transport::auth::digest(&spec.canonical(&image));
    let mesh = MeshConfig {
        me,
        addrs,
        secret: match secret {
            SecretSource::Given(s) => check_secret(s, "on standard input")?,
            SecretSource::File => match &file.secret_file {
                Some(path) => read_secret(path)?,
                None => bail!("no secret_file in the configuration"),
            },
        },
        digest,
        connect_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(3),
        link_delay: link_delay(file)?,
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
        policy: Some(policy.make(me)),
    })
}
