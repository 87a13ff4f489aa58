//! Fault traces: what happened at every remote fault, page move, vCPU move, invalidation
//! and sampled access, plus the run's metadata. `docs/trace-format.md` specifies the
//! file byte by byte; in short:
//!
//! ```text
//! file   = header block* ; header = "FLOTRACE" u16:version u16:16 u32:0
//! block  = u32:kind u32:payload_len u32:crc32(payload) u32:count payload zero-pad-to-16
//! kinds  = 1 metadata (first, once) | 4 run (version 2+: second, once)
//!        | 5 layout (version 3: third, once)
//!        | 2 events (any number) | 3 end (last; count = events)
//! payload = an rkyv 0.8 archive (little-endian, aligned, 32-bit offsets)
//! ```
//!
//! Reading validates everything (magic, version, block framing, checksums, the rkyv
//! archive, every enumerated field, the end marker) and names what is wrong. Version 1
//! files (no run block) still read, with [`TraceMeta::run`] `None`; version 2 files (no
//! layout block) with [`RunMeta::layout`] `None`. Files that
//! start with the gzip magic are decompressed first, so `datasets/*.ftrace.gz` read as is.

use rkyv::rancor;
use std::io::{Read, Write};
use std::path::Path;

pub const MAGIC: [u8; 8] = *b"FLOTRACE";
/// The version writers produce.
pub const VERSION: u16 = 3;
/// The oldest version readers accept.
pub const OLDEST_VERSION: u16 = 1;
pub const HEADER_BYTES: usize = 16;
pub const BLOCK_HEADER_BYTES: usize = 16;
/// Largest payload a block may have.
pub const MAX_BLOCK_BYTES: u32 = 16 << 20;
/// Largest trace (after decompression) a reader accepts: about 50 M events. The reader
/// holds the whole file in memory, so this bounds what a hostile gzip file can cost.
pub const MAX_TRACE_BYTES: u64 = 2 << 30;
/// Events per block the writers emit.
pub const BLOCK_EVENTS: usize = 16384;

pub const BLOCK_META: u32 = 1;
pub const BLOCK_EVENTS_KIND: u32 = 2;
pub const BLOCK_END: u32 = 3;
/// Version 2: how the run was laid out, what its mechanisms cost, how it ended.
pub const BLOCK_RUN: u32 = 4;
/// Version 3: where the guest image and the vCPUs' stacks are in guest RAM.
pub const BLOCK_LAYOUT: u32 = 5;

/// `vcpu`, `peer` or `replicas` not known or not applicable.
pub const NONE16: u16 = u16::MAX;

/// What an [`Event`] records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum EventKind {
    /// A vCPU on `node` touched `page`, which `node` did not hold well enough.
    /// `peer` = the holder the node believed in; `decision` = what was done;
    /// `service_ns` = fault exit to re-entry (move-page) or to the state being sent
    /// (move-vcpu); `replicas` = copies the home saw when it took the request.
    RemoteFault = 1,
    /// `page` arrived at `node` from `peer` (`access`: read = as a replica, write = as
    /// owner); `replicas` as for faults.
    PageIn = 2,
    /// `node` sent `page` to `peer`.
    PageOut = 3,
    /// `vcpu` left `node` for `peer` at a fault on `page`; `service_ns` = capture time.
    VcpuOut = 4,
    /// `vcpu` arrived at `node` from `peer`; `service_ns` = fault on the source to
    /// restored here.
    VcpuIn = 5,
    /// `node` dropped its read-only copy of `page`; `peer` = the next writer.
    Invalidate = 6,
    /// Sampled access tracking: `vcpu` touched `page` (held locally) after the sampler
    /// armed it; `service_ns` = time since it was armed.
    AccessSample = 7,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::RemoteFault,
        EventKind::PageIn,
        EventKind::PageOut,
        EventKind::VcpuOut,
        EventKind::VcpuIn,
        EventKind::Invalidate,
        EventKind::AccessSample,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get((v as usize).wrapping_sub(1)).copied()
    }

    pub fn name(self) -> &'static str {
        match self {
            EventKind::RemoteFault => "remote_fault",
            EventKind::PageIn => "page_in",
            EventKind::PageOut => "page_out",
            EventKind::VcpuOut => "vcpu_out",
            EventKind::VcpuIn => "vcpu_in",
            EventKind::Invalidate => "invalidate",
            EventKind::AccessSample => "access_sample",
        }
    }
}

// The `access` and `decision` bytes of an event are the codes of the one vocabulary in
// flotilla-coherence; `decision` 0 marks an event that is not a decision.
pub use flotilla_coherence::{Access, Decision};
pub const ACCESS_READ: u8 = Access::Read.code();
pub const ACCESS_WRITE: u8 = Access::Write.code();
pub const ACCESS_EXECUTE: u8 = Access::Execute.code();
pub const DECISION_NONE: u8 = 0;
pub const DECISION_MOVE_PAGE: u8 = Decision::MovePage.code();
pub const DECISION_MOVE_VCPU: u8 = Decision::MoveVcpu.code();

/// Flag bits of [`Event::flags`].
pub mod flags {
    /// A rule chose, not the policy (a progress rule, the holder is this node, or the
    /// vCPU's own stack).
    pub const FORCED: u8 = 1;
    /// The faulting node had a read-only copy (a write upgrade).
    pub const HAD_REPLICA: u8 = 2;
    /// The fault came back as `EFAULT` and was decoded from the instruction.
    pub const DECODED: u8 = 4;
    pub const ALL: u8 = 7;
}

/// One trace record: 40 bytes, fixed layout (docs/trace-format.md).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Event {
    /// Nanoseconds since the run's epoch (the guest clock's zero).
    pub t_ns: u64,
    /// Guest page number (guest-physical address / 4096).
    pub page: u64,
    /// Guest RIP at the access (0 if unknown).
    pub rip: u64,
    pub service_ns: u32,
    pub vcpu: u16,
    pub node: u16,
    pub peer: u16,
    pub replicas: u16,
    pub kind: u8,
    pub access: u8,
    pub decision: u8,
    pub flags: u8,
}

impl Event {
    pub fn kind(&self) -> Option<EventKind> {
        EventKind::from_u8(self.kind)
    }

    pub fn access(&self) -> Option<Access> {
        Access::from_code(self.access)
    }

    /// `None` for an event that is not a decision (or an unknown code).
    pub fn decision(&self) -> Option<Decision> {
        Decision::from_code(self.decision)
    }

    pub fn access_name(&self) -> &'static str {
        self.access().map_or("?", Access::name)
    }

    pub fn decision_name(&self) -> &'static str {
        match self.decision {
            DECISION_NONE => "none",
            _ => self.decision().map_or("?", Decision::name),
        }
    }
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct EventBlock {
    events: Vec<Event>,
}

/// The run a trace belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TraceMeta {
    pub workload: String,
    pub args: String,
    /// The guest image's name or path ("" for a built-in workload).
    pub image: String,
    pub policy: String,
    pub transport: String,
    pub engine_version: String,
    pub host: String,
    pub nodes: u16,
    pub vcpus: u32,
    pub mem_bytes: u64,
    pub seed: u64,
    /// Wall-clock start of the run, milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// Sampled access tracking: pages armed per second per node (0 = off).
    pub sample_rate: u32,
    /// Version 2's run block; `None` in a version 1 file.
    pub run: Option<RunMeta>,
}

/// How a recorded run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Outcome {
    /// The guest ended (with any exit code).
    #[default]
    Completed,
    /// The run ended in an error (`RunMeta::error` says which); the events stop there.
    Failed,
}

/// The engine's measured costs in a run: medians, in nanoseconds (the engine samples in
/// whole microseconds), 0 where the run measured none. With these a simulator can be
/// calibrated from the trace alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Costs {
    /// A bare 4 KiB request and response on the transport.
    pub rtt_4k_ns: u64,
    /// Installing a page that is here but not yet mapped (trap and map).
    pub install_ns: u64,
    /// Capturing a vCPU's state (source side of a move).
    pub capture_ns: u64,
    /// Restoring a vCPU's state (destination side of a move).
    pub restore_ns: u64,
    /// A remote fault served by moving the page: fault exit to re-entry.
    pub fault_service_ns: u64,
    /// A vCPU move: fault exit on the source to re-entry on the destination.
    pub vcpu_move_ns: u64,
}

/// What version 2 adds to a trace's metadata: the initial placement and cluster shape,
/// the measured costs, and how the run ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunMeta {
    /// Initial spread of guest RAM: "contiguous" or "interleave".
    pub ram: String,
    /// Each vCPU's starting node (one entry per vCPU).
    pub vcpu_nodes: Vec<u16>,
    /// Bytes of each vCPU's stack (stacks start on, and are homed on, its first node).
    pub stack_bytes: u64,
    /// The CPUs each node was confined to, by node; empty when nodes were not pinned.
    pub cpu_sets: Vec<Vec<u16>>,
    /// Emulated one-way link delay added by the transport (0 = none).
    pub link_delay_ns: u64,
    /// Reference-stream recording: the epoch in which each vCPU's distinct pages are
    /// recorded (0 = faults only).
    pub touch_epoch_ns: u64,
    pub costs: Costs,
    pub outcome: Outcome,
    /// The guest's exit code (0 when the run failed).
    pub exit_code: i32,
    /// Why the run failed ("" when it completed).
    pub error: String,
    /// Nodes whose events are missing (their part of the trace could not be read: the
    /// node died or was killed). Events of the other nodes are complete.
    pub missing_nodes: Vec<u16>,
    /// The run's wall time.
    pub wall_ns: u64,
    /// Where the image and the stacks are (version 3; `None` in older files).
    pub layout: Option<GuestLayout>,
}

/// Where the engine put the guest image and the vCPUs' stacks, in guest pages. Image
/// pages start replicated on every node; vCPU `v`'s stack is the `stack_bytes` from
/// `stacks_first_page + v * stack_bytes / 4096`, homed on `v`'s first node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestLayout {
    pub image_pages: std::ops::Range<u64>,
    pub stacks_first_page: u64,
}

/// The archived form of [`GuestLayout`].
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct LayoutRecord {
    image_first_page: u64,
    image_end_page: u64,
    stacks_first_page: u64,
}

/// The archived form of [`TraceMeta`]: text as UTF-8 byte vectors, so the layout stays
/// two words per string (docs/trace-format.md).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct MetaRecord {
    mem_bytes: u64,
    seed: u64,
    started_unix_ms: u64,
    vcpus: u32,
    sample_rate: u32,
    nodes: u16,
    workload: Vec<u8>,
    args: Vec<u8>,
    image: Vec<u8>,
    policy: Vec<u8>,
    transport: Vec<u8>,
    engine_version: Vec<u8>,
    host: Vec<u8>,
}

/// The archived form of [`RunMeta`] (docs/trace-format.md, "Run payload").
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct RunRecord {
    stack_bytes: u64,
    link_delay_ns: u64,
    touch_epoch_ns: u64,
    wall_ns: u64,
    rtt_4k_ns: u64,
    install_ns: u64,
    capture_ns: u64,
    restore_ns: u64,
    fault_service_ns: u64,
    vcpu_move_ns: u64,
    exit_code: i32,
    outcome: u8,
    ram: Vec<u8>,
    error: Vec<u8>,
    vcpu_nodes: Vec<u16>,
    missing_nodes: Vec<u16>,
    /// CPUs in each node's set, by node (empty: not pinned).
    cpu_counts: Vec<u16>,
    /// The sets, one after another.
    cpus: Vec<u16>,
}

fn run_record(r: &RunMeta) -> RunRecord {
    let c = &r.costs;
    RunRecord {
        stack_bytes: r.stack_bytes,
        link_delay_ns: r.link_delay_ns,
        touch_epoch_ns: r.touch_epoch_ns,
        wall_ns: r.wall_ns,
        rtt_4k_ns: c.rtt_4k_ns,
        install_ns: c.install_ns,
        capture_ns: c.capture_ns,
        restore_ns: c.restore_ns,
        fault_service_ns: c.fault_service_ns,
        vcpu_move_ns: c.vcpu_move_ns,
        exit_code: r.exit_code,
        outcome: match r.outcome {
            Outcome::Completed => 0,
            Outcome::Failed => 1,
        },
        ram: r.ram.as_bytes().to_vec(),
        error: r.error.as_bytes().to_vec(),
        vcpu_nodes: r.vcpu_nodes.clone(),
        missing_nodes: r.missing_nodes.clone(),
        cpu_counts: r.cpu_sets.iter().map(|s| s.len() as u16).collect(),
        cpus: r.cpu_sets.iter().flatten().copied().collect(),
    }
}

/// Reads and checks a run record against the metadata's shape.
fn run_meta(r: &ArchivedRunRecord, nodes: u16, vcpus: u32) -> Result<RunMeta, String> {
    let list = |v: &rkyv::vec::ArchivedVec<rkyv::rend::u16_le>| -> Vec<u16> {
        v.iter().map(|x| x.to_native()).collect()
    };
    let utf8 = |field: &str, v: &rkyv::vec::ArchivedVec<u8>| {
        String::from_utf8(v.as_slice().to_vec()).map_err(|_| format!("{field} is not UTF-8"))
    };
    let outcome = match r.outcome {
        0 => Outcome::Completed,
        1 => Outcome::Failed,
        o => return Err(format!("unknown outcome {o}")),
    };
    let ram = utf8("ram", &r.ram)?;
    if ram != "contiguous" && ram != "interleave" {
        return Err(format!(
            "RAM layout {ram:?} is neither contiguous nor interleave"
        ));
    }
    let error = utf8("error", &r.error)?;
    if (outcome == Outcome::Failed) == error.is_empty() {
        return Err("an error text goes with a failed run, and only with one".into());
    }
    let vcpu_nodes = list(&r.vcpu_nodes);
    if vcpu_nodes.len() != vcpus as usize {
        return Err(format!(
            "{} starting nodes for {vcpus} vCPUs",
            vcpu_nodes.len()
        ));
    }
    if let Some(n) = vcpu_nodes.iter().find(|&&n| n >= nodes) {
        return Err(format!(
            "a vCPU starts on node {n}, but the run has {nodes} nodes"
        ));
    }
    let missing_nodes = list(&r.missing_nodes);
    if missing_nodes.windows(2).any(|w| w[0] >= w[1])
        || missing_nodes.last().is_some_and(|&n| n >= nodes)
    {
        return Err(format!(
            "missing nodes {missing_nodes:?} are not distinct nodes of {nodes} in order"
        ));
    }
    let counts = list(&r.cpu_counts);
    let cpus = list(&r.cpus);
    if !(counts.is_empty() || counts.len() == nodes as usize) {
        return Err(format!("CPU sets for {} nodes of {nodes}", counts.len()));
    }
    if counts.iter().map(|&c| c as usize).sum::<usize>() != cpus.len() {
        return Err(format!(
            "CPU sets count {} CPUs but list {}",
            counts.iter().map(|&c| c as usize).sum::<usize>(),
            cpus.len()
        ));
    }
    let mut cpu_sets = Vec::new();
    let mut at = 0;
    for &c in &counts {
        cpu_sets.push(cpus[at..at + c as usize].to_vec());
        at += c as usize;
    }
    Ok(RunMeta {
        ram,
        vcpu_nodes,
        stack_bytes: r.stack_bytes.to_native(),
        cpu_sets,
        link_delay_ns: r.link_delay_ns.to_native(),
        touch_epoch_ns: r.touch_epoch_ns.to_native(),
        costs: Costs {
            rtt_4k_ns: r.rtt_4k_ns.to_native(),
            install_ns: r.install_ns.to_native(),
            capture_ns: r.capture_ns.to_native(),
            restore_ns: r.restore_ns.to_native(),
            fault_service_ns: r.fault_service_ns.to_native(),
            vcpu_move_ns: r.vcpu_move_ns.to_native(),
        },
        outcome,
        exit_code: r.exit_code.to_native(),
        error,
        missing_nodes,
        wall_ns: r.wall_ns.to_native(),
        layout: None,
    })
}

/// Reads and checks a layout record against the guest's RAM.
fn guest_layout(r: &ArchivedLayoutRecord, mem_bytes: u64) -> Result<GuestLayout, String> {
    let (first, end, stacks) = (
        r.image_first_page.to_native(),
        r.image_end_page.to_native(),
        r.stacks_first_page.to_native(),
    );
    let pages = mem_bytes / 4096;
    if first > end || end > pages || stacks > pages || (stacks != 0 && stacks < end) {
        return Err(format!(
            "image pages {first:#x}..{end:#x} and stacks from {stacks:#x} do not fit {pages:#x} pages in order"
        ));
    }
    Ok(GuestLayout {
        image_pages: first..end,
        stacks_first_page: stacks,
    })
}

/// A whole trace in memory.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Trace {
    pub meta: TraceMeta,
    pub events: Vec<Event>,
}

/// Why a trace could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Callers name the file in their own context; the text here is the OS error.
    #[error("{error}")]
    Io { path: String, error: std::io::Error },
    #[error("not a Flotilla trace (the file does not start with \"FLOTRACE\")")]
    NotATrace,
    #[error(
        "trace format version {found}; this build reads versions {OLDEST_VERSION} to {VERSION}"
    )]
    Version { found: u16 },
    #[error("truncated trace: {0}")]
    Truncated(String),
    #[error("corrupt trace: {0}")]
    Corrupt(String),
    #[error("trace larger than {MAX_TRACE_BYTES} bytes")]
    TooLarge,
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TraceError + '_ {
    move |error| TraceError::Io {
        path: path.display().to_string(),
        error,
    }
}

fn meta_record(m: &TraceMeta) -> MetaRecord {
    let b = |s: &str| s.as_bytes().to_vec();
    MetaRecord {
        mem_bytes: m.mem_bytes,
        seed: m.seed,
        started_unix_ms: m.started_unix_ms,
        vcpus: m.vcpus,
        sample_rate: m.sample_rate,
        nodes: m.nodes,
        workload: b(&m.workload),
        args: b(&m.args),
        image: b(&m.image),
        policy: b(&m.policy),
        transport: b(&m.transport),
        engine_version: b(&m.engine_version),
        host: b(&m.host),
    }
}

/// Writes a trace: header and metadata at creation, event blocks as they come, the end
/// block at [`TraceWriter::finish`].
pub struct TraceWriter<W: Write> {
    out: W,
    events: u64,
    nodes: u16,
    vcpus: u32,
}

impl<W: Write> TraceWriter<W> {
    pub fn new(mut out: W, meta: &TraceMeta) -> std::io::Result<Self> {
        let mut header = [0u8; HEADER_BYTES];
        header[..8].copy_from_slice(&MAGIC);
        header[8..10].copy_from_slice(&VERSION.to_le_bytes());
        header[10..12].copy_from_slice(&(HEADER_BYTES as u16).to_le_bytes());
        out.write_all(&header)?;
        let payload =
            rkyv::to_bytes::<rancor::Error>(&meta_record(meta)).map_err(std::io::Error::other)?;
        write_block(&mut out, BLOCK_META, &payload, 0)?;
        let run = meta.run.clone().unwrap_or_else(|| RunMeta {
            ram: "contiguous".into(),
            vcpu_nodes: vec![0; meta.vcpus as usize],
            ..Default::default()
        });
        run_meta_ok(&run, meta.nodes, meta.vcpus)?;
        let payload =
            rkyv::to_bytes::<rancor::Error>(&run_record(&run)).map_err(std::io::Error::other)?;
        write_block(&mut out, BLOCK_RUN, &payload, 0)?;
        let l = run.layout.clone().unwrap_or_default();
        let payload = rkyv::to_bytes::<rancor::Error>(&LayoutRecord {
            image_first_page: l.image_pages.start,
            image_end_page: l.image_pages.end,
            stacks_first_page: l.stacks_first_page,
        })
        .map_err(std::io::Error::other)?;
        write_block(&mut out, BLOCK_LAYOUT, &payload, 0)?;
        Ok(TraceWriter {
            out,
            events: 0,
            nodes: meta.nodes,
            vcpus: meta.vcpus,
        })
    }

    /// Appends events (in blocks of at most [`BLOCK_EVENTS`]).
    pub fn write_events(&mut self, events: &[Event]) -> std::io::Result<()> {
        for chunk in events.chunks(BLOCK_EVENTS) {
            if let Some(bad) = chunk
                .iter()
                .find_map(|e| check_event(e, self.nodes, self.vcpus).err())
            {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, bad));
            }
            let block = EventBlock {
                events: chunk.to_vec(),
            };
            let payload = rkyv::to_bytes::<rancor::Error>(&block).map_err(std::io::Error::other)?;
            write_block(
                &mut self.out,
                BLOCK_EVENTS_KIND,
                &payload,
                chunk.len() as u32,
            )?;
            self.events += chunk.len() as u64;
        }
        Ok(())
    }

    /// Events written so far.
    pub fn events_written(&self) -> u64 {
        self.events
    }

    /// Writes the end block and flushes; returns the output.
    pub fn finish(mut self) -> std::io::Result<W> {
        let count = u32::try_from(self.events)
            .map_err(|_| std::io::Error::other("more than 4294967295 events in one trace file"))?;
        write_block(&mut self.out, BLOCK_END, &[], count)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Refuses to write a run block a reader would reject.
fn run_meta_ok(run: &RunMeta, nodes: u16, vcpus: u32) -> std::io::Result<()> {
    let payload =
        rkyv::to_bytes::<rancor::Error>(&run_record(run)).map_err(std::io::Error::other)?;
    let r = rkyv::access::<ArchivedRunRecord, rancor::Error>(&payload)
        .map_err(std::io::Error::other)?;
    run_meta(r, nodes, vcpus).map(|_| ()).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("run metadata: {e}"),
        )
    })
}

fn write_block(out: &mut impl Write, kind: u32, payload: &[u8], count: u32) -> std::io::Result<()> {
    if payload.len() > MAX_BLOCK_BYTES as usize {
        return Err(std::io::Error::other("trace block too large"));
    }
    let mut h = [0u8; BLOCK_HEADER_BYTES];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[8..12].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    h[12..16].copy_from_slice(&count.to_le_bytes());
    out.write_all(&h)?;
    out.write_all(payload)?;
    let pad = payload.len().next_multiple_of(16) - payload.len();
    out.write_all(&[0u8; 16][..pad])
}

/// Checks an event's enumerated fields against the run's shape.
fn check_event(e: &Event, nodes: u16, vcpus: u32) -> Result<(), String> {
    let kind = e
        .kind()
        .ok_or_else(|| format!("unknown event kind {}", e.kind))?;
    if e.node >= nodes {
        return Err(format!(
            "{} event on node {}, but the run has {nodes} nodes",
            kind.name(),
            e.node
        ));
    }
    if e.vcpu != NONE16 && e.vcpu as u32 >= vcpus {
        return Err(format!(
            "{} event of vCPU {}, but the run has {vcpus} vCPUs",
            kind.name(),
            e.vcpu
        ));
    }
    if e.peer != NONE16 && e.peer >= nodes {
        return Err(format!(
            "{} event names node {} as peer, but the run has {nodes} nodes",
            kind.name(),
            e.peer
        ));
    }
    if e.replicas != NONE16 && e.replicas > nodes {
        return Err(format!(
            "{} event counts {} copies of a page, but the run has {nodes} nodes",
            kind.name(),
            e.replicas
        ));
    }
    if e.access().is_none() {
        return Err(format!(
            "{} event has access kind {}",
            kind.name(),
            e.access
        ));
    }
    if e.decision != DECISION_NONE && e.decision().is_none() {
        return Err(format!("{} event has decision {}", kind.name(), e.decision));
    }
    if e.flags & !flags::ALL != 0 {
        return Err(format!(
            "{} event has unknown flags {:#x}",
            kind.name(),
            e.flags
        ));
    }
    Ok(())
}

/// Reads and validates a whole trace file (gzip-compressed or not).
pub fn read_file(path: &Path) -> Result<Trace, TraceError> {
    let f = std::fs::File::open(path).map_err(io(path))?;
    let mut bytes = Vec::new();
    f.take(MAX_TRACE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io(path))?;
    if bytes.len() as u64 > MAX_TRACE_BYTES {
        return Err(TraceError::TooLarge);
    }
    read_bytes(&bytes)
}

/// Reads and validates a trace held in memory (gzip-compressed or not).
pub fn read_bytes(bytes: &[u8]) -> Result<Trace, TraceError> {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(bytes)
            .take(MAX_TRACE_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| TraceError::Corrupt(format!("gzip stream: {e}")))?;
        if out.len() as u64 > MAX_TRACE_BYTES {
            return Err(TraceError::TooLarge);
        }
        return parse(&out);
    }
    parse(bytes)
}

fn text(field: &str, v: &rkyv::vec::ArchivedVec<u8>) -> Result<String, TraceError> {
    String::from_utf8(v.as_slice().to_vec())
        .map_err(|_| TraceError::Corrupt(format!("metadata field {field} is not UTF-8")))
}

fn parse(bytes: &[u8]) -> Result<Trace, TraceError> {
    if bytes.len() < 8 || bytes[..8] != MAGIC {
        if bytes.len() < 8 && MAGIC.starts_with(bytes) {
            return Err(TraceError::Truncated(format!(
                "{} bytes, shorter than the file header",
                bytes.len()
            )));
        }
        return Err(TraceError::NotATrace);
    }
    if bytes.len() < HEADER_BYTES {
        return Err(TraceError::Truncated(format!(
            "{} bytes, shorter than the file header",
            bytes.len()
        )));
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let version = u16_at(8);
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(TraceError::Version { found: version });
    }
    if u16_at(10) as usize != HEADER_BYTES || bytes[12..16] != [0; 4] {
        return Err(TraceError::Corrupt(
            "file header: bad header length or reserved bytes".into(),
        ));
    }
    let mut at = HEADER_BYTES;
    let mut meta: Option<TraceMeta> = None;
    let mut events = Vec::new();
    let mut index = 0usize;
    loop {
        if at == bytes.len() {
            return Err(TraceError::Truncated(format!(
                "no end block after {index} blocks ({} events): the recording was cut short",
                events.len()
            )));
        }
        if bytes.len() - at < BLOCK_HEADER_BYTES {
            return Err(TraceError::Truncated(format!(
                "block {index} at byte {at}: header cut off"
            )));
        }
        let h = &bytes[at..at + BLOCK_HEADER_BYTES];
        let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let (kind, len, crc, count) = (word(0), word(4), word(8), word(12));
        let corrupt =
            |what: String| TraceError::Corrupt(format!("block {index} at byte {at}: {what}"));
        if !(BLOCK_META..=BLOCK_LAYOUT).contains(&kind)
            || (kind == BLOCK_RUN && version < 2)
            || (kind == BLOCK_LAYOUT && version < 3)
        {
            return Err(corrupt(format!("unknown block kind {kind}")));
        }
        if len > MAX_BLOCK_BYTES {
            return Err(corrupt(format!(
                "payload of {len} bytes exceeds {MAX_BLOCK_BYTES}"
            )));
        }
        let start = at + BLOCK_HEADER_BYTES;
        let padded = (len as usize).next_multiple_of(16);
        if bytes.len() - start < padded {
            return Err(TraceError::Truncated(format!(
                "block {index} at byte {at}: payload of {len} bytes cut off after {}",
                bytes.len() - start
            )));
        }
        let payload = &bytes[start..start + len as usize];
        if crc32fast::hash(payload) != crc {
            return Err(corrupt("checksum mismatch".into()));
        }
        if bytes[start + len as usize..start + padded]
            .iter()
            .any(|&b| b != 0)
        {
            return Err(corrupt("non-zero padding".into()));
        }
        // rkyv needs the archive aligned.
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(payload.len());
        aligned.extend_from_slice(payload);
        match (kind, &meta) {
            (BLOCK_META, None) => {
                let r = rkyv::access::<ArchivedMetaRecord, rancor::Error>(&aligned)
                    .map_err(|e| corrupt(format!("metadata archive: {e}")))?;
                let m = TraceMeta {
                    workload: text("workload", &r.workload)?,
                    args: text("args", &r.args)?,
                    image: text("image", &r.image)?,
                    policy: text("policy", &r.policy)?,
                    transport: text("transport", &r.transport)?,
                    engine_version: text("engine_version", &r.engine_version)?,
                    host: text("host", &r.host)?,
                    nodes: r.nodes.to_native(),
                    vcpus: r.vcpus.to_native(),
                    mem_bytes: r.mem_bytes.to_native(),
                    seed: r.seed.to_native(),
                    started_unix_ms: r.started_unix_ms.to_native(),
                    sample_rate: r.sample_rate.to_native(),
                    run: None,
                };
                if m.nodes == 0 || m.vcpus == 0 {
                    return Err(corrupt(format!(
                        "metadata says {} nodes and {} vCPUs",
                        m.nodes, m.vcpus
                    )));
                }
                meta = Some(m);
            }
            (BLOCK_META, Some(_)) => return Err(corrupt("a second metadata block".into())),
            (_, None) => return Err(corrupt("the first block is not the metadata".into())),
            (BLOCK_RUN, Some(m)) => {
                if index != 1 {
                    return Err(corrupt("the run block is not the second block".into()));
                }
                let r = rkyv::access::<ArchivedRunRecord, rancor::Error>(&aligned)
                    .map_err(|e| corrupt(format!("run archive: {e}")))?;
                let run = run_meta(r, m.nodes, m.vcpus)
                    .map_err(|e| corrupt(format!("run metadata: {e}")))?;
                if let Some(m) = meta.as_mut() {
                    m.run = Some(run);
                }
            }
            (_, Some(_)) if version >= 2 && index == 1 => {
                return Err(corrupt("the second block is not the run block".into()))
            }
            (BLOCK_LAYOUT, Some(m)) => {
                if index != 2 {
                    return Err(corrupt("the layout block is not the third block".into()));
                }
                let r = rkyv::access::<ArchivedLayoutRecord, rancor::Error>(&aligned)
                    .map_err(|e| corrupt(format!("layout archive: {e}")))?;
                let l =
                    guest_layout(r, m.mem_bytes).map_err(|e| corrupt(format!("layout: {e}")))?;
                // All zeros: the writer did not know (a trace rewritten from an older one).
                let known = l != GuestLayout::default();
                if let Some(run) = meta.as_mut().and_then(|m| m.run.as_mut()) {
                    run.layout = known.then_some(l);
                }
            }
            (_, Some(_)) if version >= 3 && index == 2 => {
                return Err(corrupt("the third block is not the layout block".into()))
            }
            (BLOCK_EVENTS_KIND, Some(m)) => {
                let b = rkyv::access::<ArchivedEventBlock, rancor::Error>(&aligned)
                    .map_err(|e| corrupt(format!("event archive: {e}")))?;
                if b.events.len() != count as usize {
                    return Err(corrupt(format!(
                        "header counts {count} events, the archive holds {}",
                        b.events.len()
                    )));
                }
                events.reserve(b.events.len());
                for (i, a) in b.events.iter().enumerate() {
                    let e = Event {
                        t_ns: a.t_ns.to_native(),
                        page: a.page.to_native(),
                        rip: a.rip.to_native(),
                        service_ns: a.service_ns.to_native(),
                        vcpu: a.vcpu.to_native(),
                        node: a.node.to_native(),
                        peer: a.peer.to_native(),
                        replicas: a.replicas.to_native(),
                        kind: a.kind,
                        access: a.access,
                        decision: a.decision,
                        flags: a.flags,
                    };
                    check_event(&e, m.nodes, m.vcpus)
                        .map_err(|w| corrupt(format!("event {i}: {w}")))?;
                    events.push(e);
                }
            }
            _ => {
                // The end block.
                if len != 0 {
                    return Err(corrupt("the end block has a payload".into()));
                }
                if count as usize != events.len() {
                    return Err(corrupt(format!(
                        "the end block counts {count} events; the blocks before it hold {}",
                        events.len()
                    )));
                }
                if start + padded != bytes.len() {
                    return Err(corrupt(format!(
                        "{} bytes after the end block",
                        bytes.len() - start - padded
                    )));
                }
                let meta = meta.take().unwrap_or_default();
                return Ok(Trace { meta, events });
            }
        }
        at = start + padded;
        index += 1;
    }
}

/// Writes a whole trace to `path`, gzip-compressed if the name ends in `.gz`.
pub fn write_file(path: &Path, trace: &Trace) -> Result<u64, TraceError> {
    let f = std::fs::File::create(path).map_err(io(path))?;
    let out = std::io::BufWriter::new(f);
    if path.extension().is_some_and(|e| e == "gz") {
        let gz = flate2::write::GzEncoder::new(out, flate2::Compression::best());
        let mut w = TraceWriter::new(gz, &trace.meta).map_err(io(path))?;
        w.write_events(&trace.events).map_err(io(path))?;
        w.finish()
            .and_then(|gz| gz.finish())
            .and_then(|mut f| f.flush())
            .map_err(io(path))?;
    } else {
        let mut w = TraceWriter::new(out, &trace.meta).map_err(io(path))?;
        w.write_events(&trace.events).map_err(io(path))?;
        w.finish().map_err(io(path))?;
    }
    Ok(trace.events.len() as u64)
}

/// Merges per-node trace files (part `k` recorded by node `k`) into one trace under
/// `meta`, events ordered by time.
pub fn merge(meta: TraceMeta, parts: &[impl AsRef<Path>]) -> Result<Trace, TraceError> {
    let mut read = Vec::new();
    for (k, p) in parts.iter().enumerate() {
        let p = p.as_ref();
        let t = read_file(p).map_err(|e| TraceError::Invalid(format!("{}: {e}", p.display())))?;
        read.push((k as u16, p.display().to_string(), t));
    }
    merge_parts(meta, read)
}

/// Merges traces already read: `(node, name, trace)`, where `name` names the part in
/// errors and the trace holds only `node`'s events. Nodes may be missing (say so in
/// `meta.run`'s `missing_nodes`).
pub fn merge_parts(meta: TraceMeta, parts: Vec<(u16, String, Trace)>) -> Result<Trace, TraceError> {
    let mut events = Vec::new();
    for (k, name, t) in parts {
        if t.meta.nodes != meta.nodes || t.meta.vcpus != meta.vcpus {
            return Err(TraceError::Invalid(format!(
                "{name}: recorded on {} nodes and {} vCPUs, not {} and {}",
                t.meta.nodes, t.meta.vcpus, meta.nodes, meta.vcpus
            )));
        }
        if let Some(e) = t.events.iter().find(|e| e.node != k) {
            return Err(TraceError::Invalid(format!(
                "{name}: holds an event of node {}, but it is node {k}'s part",
                e.node
            )));
        }
        events.extend(t.events);
    }
    events.sort_by_key(|e| (e.t_ns, e.node));
    Ok(Trace { meta, events })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_trace() -> Trace {
        let meta = TraceMeta {
            workload: "bfs".into(),
            args: "vertices=1000".into(),
            image: String::new(),
            policy: "heuristic".into(),
            transport: "tcp".into(),
            engine_version: "0.1.0".into(),
            host: "testhost".into(),
            nodes: 2,
            vcpus: 4,
            mem_bytes: 256 << 20,
            seed: 7,
            started_unix_ms: 1_700_000_000_000,
            sample_rate: 1000,
            run: Some(RunMeta {
                ram: "interleave".into(),
                vcpu_nodes: vec![0, 1, 0, 1],
                stack_bytes: 256 << 10,
                cpu_sets: vec![vec![0], vec![1]],
                link_delay_ns: 15_000,
                touch_epoch_ns: 1_000_000,
                costs: Costs {
                    rtt_4k_ns: 64_000,
                    install_ns: 7_000,
                    capture_ns: 20_000,
                    restore_ns: 30_000,
                    fault_service_ns: 110_000,
                    vcpu_move_ns: 240_000,
                },
                outcome: Outcome::Failed,
                exit_code: 0,
                error: "vCPU 1: triple fault".into(),
                missing_nodes: vec![1],
                wall_ns: 123_456_789,
                layout: Some(GuestLayout {
                    image_pages: 0x200..0x210,
                    stacks_first_page: 0x210,
                }),
            }),
        };
        let events = (0..40_000u64)
            .map(|i| Event {
                t_ns: i * 1000,
                page: 0x400 + i % 97,
                rip: 0x20_1000 + i,
                service_ns: (i * 7) as u32,
                vcpu: (i % 4) as u16,
                node: (i % 2) as u16,
                peer: ((i + 1) % 2) as u16,
                replicas: if i % 3 == 0 { NONE16 } else { 1 },
                kind: (i % 7) as u8 + 1,
                access: (i % 2) as u8,
                decision: (i % 3) as u8,
                flags: (i % 8) as u8,
            })
            .collect();
        Trace { meta, events }
    }

    pub(crate) fn encode(t: &Trace) -> Vec<u8> {
        let mut w = TraceWriter::new(Vec::new(), &t.meta).unwrap();
        w.write_events(&t.events).unwrap();
        assert_eq!(w.events_written(), t.events.len() as u64);
        w.finish().unwrap()
    }

    #[test]
    fn round_trip_in_memory_and_gzip() {
        let t = sample_trace();
        let bytes = encode(&t);
        assert_eq!(read_bytes(&bytes).unwrap(), t);
        let dir = std::env::temp_dir().join(format!("flotilla-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["t.ftrace", "t.ftrace.gz"] {
            let p = dir.join(name);
            assert_eq!(write_file(&p, &t).unwrap(), 40_000);
            assert_eq!(read_file(&p).unwrap(), t);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The same trace in format version 1 (no run block, no layout block) or 2 (no
    /// layout block).
    fn as_version(v3: &[u8], version: u16) -> Vec<u8> {
        let block_len = |at: usize| {
            let len = u32::from_le_bytes(v3[at + 4..at + 8].try_into().unwrap()) as usize;
            BLOCK_HEADER_BYTES + len.next_multiple_of(16)
        };
        let meta_end = HEADER_BYTES + block_len(HEADER_BYTES);
        assert_eq!(v3[meta_end], BLOCK_RUN as u8);
        let run_end = meta_end + block_len(meta_end);
        assert_eq!(v3[run_end], BLOCK_LAYOUT as u8);
        let layout_end = run_end + block_len(run_end);
        let keep = if version == 1 { meta_end } else { run_end };
        let mut old = v3[..keep].to_vec();
        old[8..10].copy_from_slice(&version.to_le_bytes());
        old.extend_from_slice(&v3[layout_end..]);
        old
    }

    fn as_version_1(v3: &[u8]) -> Vec<u8> {
        as_version(v3, 1)
    }

    #[test]
    fn version_2_files_still_read_without_a_layout_and_version_3_needs_one() {
        let t = sample_trace();
        let v2 = as_version(&encode(&t), 2);
        let read = read_bytes(&v2).unwrap();
        let mut want = t.meta.run.clone().unwrap();
        want.layout = None;
        assert_eq!(read.meta.run, Some(want));
        assert_eq!(read.events, t.events);
        let mut bad = v2.clone();
        bad[8..10].copy_from_slice(&3u16.to_le_bytes());
        let e = read_bytes(&bad).unwrap_err().to_string();
        assert!(e.contains("the third block is not the layout block"), "{e}");
        let mut bad = encode(&t);
        bad[8..10].copy_from_slice(&2u16.to_le_bytes());
        let e = read_bytes(&bad).unwrap_err().to_string();
        assert!(e.contains("unknown block kind 5"), "{e}");
        // A layout that does not fit the guest's RAM is refused by readers.
        let mut t = sample_trace();
        t.meta.run.as_mut().unwrap().layout = Some(GuestLayout {
            image_pages: 0x200..0x100_0000,
            stacks_first_page: 0,
        });
        let bytes = encode(&t);
        let e = read_bytes(&bytes).unwrap_err().to_string();
        assert!(e.contains("do not fit"), "{e}");
    }

    #[test]
    fn version_1_files_still_read_and_version_2_needs_its_run_block() {
        let t = sample_trace();
        let v1 = as_version_1(&encode(&t));
        let read = read_bytes(&v1).unwrap();
        assert_eq!(read.meta.run, None);
        assert_eq!(read.events, t.events);
        // A version 2 header on a file without a run block is refused.
        let mut bad = v1.clone();
        bad[8..10].copy_from_slice(&2u16.to_le_bytes());
        let e = read_bytes(&bad).unwrap_err().to_string();
        assert!(e.contains("the second block is not the run block"), "{e}");
        // A run block in a version 1 file is refused.
        let mut bad = encode(&t);
        bad[8..10].copy_from_slice(&1u16.to_le_bytes());
        let e = read_bytes(&bad).unwrap_err().to_string();
        assert!(e.contains("unknown block kind 4"), "{e}");
    }

    #[test]
    fn writers_refuse_run_metadata_readers_would_reject() {
        let mut t = sample_trace();
        let run = t.meta.run.as_mut().unwrap();
        run.vcpu_nodes[3] = 2;
        let e = TraceWriter::new(Vec::new(), &t.meta)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("a vCPU starts on node 2, but the run has 2 nodes"),
            "{e}"
        );
        let mut t = sample_trace();
        t.meta.run.as_mut().unwrap().error.clear();
        let e = TraceWriter::new(Vec::new(), &t.meta)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("an error text goes with a failed run"), "{e}");
        let mut t = sample_trace();
        t.meta.run.as_mut().unwrap().cpu_sets.pop();
        let e = TraceWriter::new(Vec::new(), &t.meta)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("CPU sets for 1 nodes of 2"), "{e}");
    }

    #[test]
    fn merge_orders_parts_and_checks_their_nodes() {
        let dir = std::env::temp_dir().join(format!("flotilla-merge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = sample_trace();
        let part = |node: u16| Trace {
            meta: t.meta.clone(),
            events: t
                .events
                .iter()
                .filter(|e| e.node == node)
                .copied()
                .collect(),
        };
        let paths = [dir.join("p0"), dir.join("p1")];
        write_file(&paths[0], &part(0)).unwrap();
        write_file(&paths[1], &part(1)).unwrap();
        let m = merge(t.meta.clone(), &paths).unwrap();
        assert_eq!(m.events.len(), t.events.len());
        assert!(m.events.windows(2).all(|w| w[0].t_ns <= w[1].t_ns));
        let swapped = [paths[1].clone(), paths[0].clone()];
        let e = merge(t.meta.clone(), &swapped).unwrap_err().to_string();
        assert!(e.contains("node 0's part"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn documented_layout_holds() {
        use std::mem::{offset_of, size_of};
        assert_eq!(size_of::<ArchivedEvent>(), 40);
        assert_eq!(offset_of!(ArchivedEvent, t_ns), 0);
        assert_eq!(offset_of!(ArchivedEvent, page), 8);
        assert_eq!(offset_of!(ArchivedEvent, rip), 16);
        assert_eq!(offset_of!(ArchivedEvent, service_ns), 24);
        assert_eq!(offset_of!(ArchivedEvent, vcpu), 28);
        assert_eq!(offset_of!(ArchivedEvent, node), 30);
        assert_eq!(offset_of!(ArchivedEvent, peer), 32);
        assert_eq!(offset_of!(ArchivedEvent, replicas), 34);
        assert_eq!(offset_of!(ArchivedEvent, kind), 36);
        assert_eq!(offset_of!(ArchivedEvent, flags), 39);
        assert_eq!(size_of::<ArchivedEventBlock>(), 8);
        assert_eq!(size_of::<ArchivedMetaRecord>(), 96);
        assert_eq!(offset_of!(ArchivedMetaRecord, nodes), 32);
        assert_eq!(offset_of!(ArchivedMetaRecord, workload), 36);
        assert_eq!(offset_of!(ArchivedMetaRecord, host), 84);
        assert_eq!(size_of::<ArchivedRunRecord>(), 136);
        assert_eq!(offset_of!(ArchivedRunRecord, vcpu_move_ns), 72);
        assert_eq!(offset_of!(ArchivedRunRecord, exit_code), 80);
        assert_eq!(offset_of!(ArchivedRunRecord, outcome), 84);
        assert_eq!(offset_of!(ArchivedRunRecord, ram), 88);
        assert_eq!(offset_of!(ArchivedRunRecord, cpus), 128);
        // The root sits at the end of the payload; the events vector's relative pointer
        // leads back to the first event.
        let t = sample_trace();
        let block = EventBlock {
            events: t.events[..3].to_vec(),
        };
        let bytes = rkyv::to_bytes::<rancor::Error>(&block).unwrap();
        let root = bytes.len() - 8;
        let rel = i32::from_le_bytes(bytes[root..root + 4].try_into().unwrap());
        let len = u32::from_le_bytes(bytes[root + 4..root + 8].try_into().unwrap());
        assert_eq!(len, 3);
        let first = (root as i64 + rel as i64) as usize;
        let page = u64::from_le_bytes(bytes[first + 8..first + 16].try_into().unwrap());
        assert_eq!(page, t.events[0].page);
    }

    #[test]
    fn bad_files_are_named() {
        let t = sample_trace();
        let good = encode(&t);
        let err = |b: &[u8]| read_bytes(b).unwrap_err().to_string();
        assert!(err(b"").contains("truncated"), "{}", err(b""));
        assert!(err(b"hello world, not a trace").contains("not a Flotilla trace"));
        let mut v = good.clone();
        v[8] = 9;
        assert!(err(&v).contains("version 9"), "{}", err(&v));
        // Every truncation point is an error, never a panic or a short success.
        for cut in (0..good.len())
            .step_by(997)
            .chain([good.len() - 1, good.len() - 16])
        {
            let e = err(&good[..cut]);
            assert!(
                e.contains("truncated") || e.contains("corrupt"),
                "cut {cut}: {e}"
            );
        }
        // A flipped bit in a payload fails the checksum.
        let mut v = good.clone();
        v[HEADER_BYTES + BLOCK_HEADER_BYTES + 3] ^= 0x10;
        assert!(err(&v).contains("checksum"), "{}", err(&v));
        // The writer refuses a bad event; a valid checksum over one is still caught.
        let mut events = t.events[..10].to_vec();
        events[3].node = 5;
        let mut w = TraceWriter::new(Vec::new(), &t.meta).unwrap();
        assert!(w.write_events(&events).is_err());
        let mut v = w.finish().unwrap();
        v.truncate(v.len() - BLOCK_HEADER_BYTES);
        let payload = rkyv::to_bytes::<rancor::Error>(&EventBlock { events }).unwrap();
        write_block(&mut v, BLOCK_EVENTS_KIND, &payload, 10).unwrap();
        write_block(&mut v, BLOCK_END, &[], 10).unwrap();
        assert!(
            err(&v).contains("event 3: vcpu_out event on node 5"),
            "{}",
            err(&v)
        );
        // Trailing garbage after the end block.
        let mut v = good.clone();
        v.extend_from_slice(&[0u8; 16]);
        assert!(err(&v).contains("after the end block"), "{}", err(&v));
        // A corrupt gzip stream.
        let mut gz = vec![0x1f, 0x8b];
        gz.extend_from_slice(&[0u8; 30]);
        assert!(err(&gz).contains("gzip"), "{}", err(&gz));
    }
}
