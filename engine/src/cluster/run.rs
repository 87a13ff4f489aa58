//! A node's run, from boot to outcome, in four steps:
//!
//! 1. [`BootedNode::boot`] validates the image and the spec, builds guest RAM, this
//!    node's page table (`node`), the KVM VM and one vCPU object per vCPU of the guest
//!    ([`BootedNode::restore`] builds a node alone from a [`Snapshot`] instead);
//! 2. [`BootedNode::connect`] joins the cluster's transport (a node alone has none);
//! 3. [`BootedNode::start`] starts the vCPU threads (`vcpu`), node 0's futex thread
//!    (`leader`) and the access sampler (`sampler`);
//! 4. [`RunningNode::wait`] waits for the end, stops everyone, gathers the counters and
//!    returns node 0's [`ClusterOutcome`]. A node alone can also be paused, snapshotted
//!    and resumed ([`RunningNode::pause`]).
//!
//! [`run_node`] does all four for a node process; [`crate::Machine`] is a node alone.

use super::leader::{FutexOp, Leader};
use super::node::{GuestClock, Node, Parts};
use super::{futex, sampler, vcpu};
use super::{ClusterOutcome, ClusterSpec, NodeId, NodeSetup, Observe};
use crate::boot::{check_args, check_machine, BootLayout};
use crate::kvm::{Hypervisor, Vcpu, VcpuState, Vm};
use crate::loader::Image;
use crate::memory::GuestMemory;
use crate::Error;
use flotilla_placement::Policy;
use flotilla_telemetry::health::HealthReader;
use flotilla_telemetry::http::MetricsServer;
use flotilla_telemetry::record::Recorder;
use flotilla_transport::{Handler, Kind, MeshConfig, Message};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Every vCPU's state, captured while a node alone was paused, with what a restore needs
/// besides guest RAM.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// `None` for vCPUs that had already returned.
    pub vcpus: Vec<Option<VcpuState>>,
    pub returned: Vec<Option<i32>>,
    pub report: Option<u64>,
    /// The guest's monotonic clock at the pause; a restored guest's clock continues from it.
    pub clock_ns: u64,
    /// Where the image, the stacks and free memory are.
    pub layout: BootLayout,
}

/// A node built and ready to start.
pub struct BootedNode {
    node: Arc<Node>,
    vm: Vm,
    vcpus: Vec<Vcpu>,
    /// vCPUs not to start (they had returned before a snapshot).
    returned: Vec<bool>,
    layout: BootLayout,
    spec: ClusterSpec,
    observe: Observe,
    metrics_server: Option<MetricsServer>,
}

/// A trace's metadata with where this guest's image and stacks are.
fn traced(
    meta: &flotilla_telemetry::trace::TraceMeta,
    layout: &BootLayout,
) -> flotilla_telemetry::trace::TraceMeta {
    use crate::cluster::uffd::PAGE;
    let mut meta = meta.clone();
    if let Some(run) = meta.run.as_mut() {
        run.layout = Some(flotilla_telemetry::trace::GuestLayout {
            image_pages: layout.image_start / PAGE..layout.image_end.div_ceil(PAGE),
            stacks_first_page: layout.stacks_start / PAGE,
        });
    }
    meta
}

/// Builds a node over guest RAM that is already filled (by boot or a stopped run):
/// the VM and its vCPUs (`vcpu_states` sets each one up), the node with its policy,
/// recorder and health signals, and its metrics server. `returned`: vCPUs not to start.
#[allow(clippy::too_many_arguments)]
fn build(
    me: NodeId,
    spec: ClusterSpec,
    layout: BootLayout,
    memory: Arc<GuestMemory>,
    observe: Observe,
    policy: Option<Box<dyn Policy>>,
    clock: GuestClock,
    leader: Option<Leader>,
    returned: Vec<bool>,
    vcpu_states: impl Fn(&Vcpu) -> Result<(), crate::kvm::KvmError>,
) -> Result<BootedNode, Error> {
    let hypervisor = Hypervisor::open()?;
    let alone = spec.nodes == 1 && !observe.samples();
    let vm = hypervisor.create_vm(&memory)?;
    let mut vcpus = Vec::new();
    for id in 0..spec.vcpus {
        let vcpu = vm.create_vcpu(id)?;
        vcpu_states(&vcpu)?;
        vcpus.push(vcpu);
    }
    let policy = match policy {
        Some(p) if p.name() == spec.policy => p,
        Some(p) => {
            return Err(Error::Config(format!(
                "the configuration names policy {}, the node was given {}",
                spec.policy,
                p.name()
            )))
        }
        None => flotilla_placement::by_name(&spec.policy, spec.seed, me)
            .map_err(|e| Error::Config(e.to_string()))?,
    };
    let recorder = match &observe.trace {
        Some(t) => Some(
            Recorder::create(&t.path, &traced(&t.meta, &layout)).map_err(|e| {
                Error::Config(format!(
                    "cannot create trace file {}: {e}",
                    t.path.display()
                ))
            })?,
        ),
        None => None,
    };
    let health = match &observe.sysfs_root {
        Some(root) => HealthReader::with_root(root),
        None => HealthReader::new(),
    };
    for (signal, value) in &observe.health_inject {
        health.inject(signal, *value);
    }
    let node = Node::new(Parts {
        me,
        spec: spec.clone(),
        layout: layout.clone(),
        memory,
        alone,
        policy,
        recorder,
        health,
        clock,
        leader,
    })?;
    let metrics_server = match observe.metrics_addr {
        Some(addr) => {
            let weak = Arc::downgrade(&node);
            let server = MetricsServer::start(
                addr,
                Arc::new(move || weak.upgrade().map(|n| n.scrape()).unwrap_or_default()),
            )
            .map_err(|e| Error::Config(e.to_string()))?;
            tracing::info!(node = me, addr = %server.addr(), "serving metrics");
            Some(server)
        }
        None => None,
    };
    Ok(BootedNode {
        node,
        vm,
        vcpus,
        returned,
        layout,
        spec,
        observe,
        metrics_server,
    })
}

impl BootedNode {
    /// Boots node `me` of `spec` with every vCPU at the entry point. `epoch_ns`: the
    /// CLOCK_MONOTONIC time at which the guest clock reads 0 (nodes on one host share it);
    /// `None`: now.
    pub fn boot(
        me: NodeId,
        spec: ClusterSpec,
        image: &[u8],
        observe: Observe,
        policy: Option<Box<dyn Policy>>,
        epoch_ns: Option<u64>,
    ) -> Result<BootedNode, Error> {
        spec.check(me)?;
        check_machine(spec.vcpus, spec.mem_bytes)?;
        check_args(&spec.args)?;
        let image = Image::parse(image, spec.mem_bytes)?;
        let layout = BootLayout::new(&image, spec.vcpus, spec.mem_bytes, spec.stack_bytes)?;
        let alone = spec.nodes == 1 && !observe.samples();
        let memory = Arc::new(GuestMemory::new(spec.mem_bytes)?);
        if !alone {
            // Pages move one 4 KiB page at a time.
            memory.disable_huge_pages();
        }
        image.load(&memory)?;
        layout.write(&memory, &spec.args)?;
        let leader =
            (me == 0).then(|| Leader::new(spec.vcpus, spec.nodes, observe.forward_console));
        let returned = vec![false; spec.vcpus as usize];
        let boot_layout = layout.clone();
        build(
            me,
            spec,
            layout,
            memory,
            observe,
            policy,
            GuestClock::Epoch(epoch_ns),
            leader,
            returned,
            |v| v.set_boot_state(&boot_layout),
        )
    }

    /// Builds a node alone over `memory` (guest RAM of a stopped run) with every vCPU
    /// restored from `snapshot`.
    pub fn restore(
        spec: ClusterSpec,
        memory: Arc<GuestMemory>,
        snapshot: &Snapshot,
        observe: Observe,
    ) -> Result<BootedNode, Error> {
        spec.check(0)?;
        check_machine(spec.vcpus, spec.mem_bytes)?;
        if spec.nodes != 1 || observe.samples() {
            return Err(Error::PauseNeedsOneNode(spec.nodes));
        }
        let n = spec.vcpus as usize;
        if snapshot.vcpus.len() != n || snapshot.returned.len() != n {
            return Err(Error::SnapshotMismatch {
                got: snapshot.vcpus.len(),
                want: spec.vcpus,
            });
        }
        if memory.size() != spec.mem_bytes || snapshot.layout.vcpus != spec.vcpus {
            return Err(Error::Config(format!(
                "the snapshot's guest RAM is {} bytes for {} vCPUs; the configuration has {} bytes, {} vCPUs",
                memory.size(),
                snapshot.layout.vcpus,
                spec.mem_bytes,
                spec.vcpus
            )));
        }
        let leader = Leader::new(spec.vcpus, 1, observe.forward_console);
        leader.resume(&snapshot.returned, snapshot.report);
        let returned = snapshot.returned.iter().map(Option::is_some).collect();
        build(
            0,
            spec,
            snapshot.layout.clone(),
            memory,
            observe,
            None,
            GuestClock::Continue(snapshot.clock_ns),
            Some(leader),
            returned,
            |v| match &snapshot.vcpus[v.id() as usize] {
                Some(state) => v.restore(state),
                None => Ok(()),
            },
        )
    }

    /// Guest RAM of this node.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.node.memory
    }

    /// Joins the cluster; then node 1 measures `echo_rounds` bare 4 KiB round trips with
    /// node 0. A node alone has nothing to join.
    pub fn connect(&self, kind: Kind, mesh: &MeshConfig, echo_rounds: u32) -> Result<(), Error> {
        let node = &self.node;
        if node.nodes == 1 {
            return Ok(());
        }
        tracing::debug!(node = node.me, "node booted; connecting");
        let t = flotilla_transport::establish(kind, mesh, Arc::clone(node) as Arc<dyn Handler>)?;
        node.set_transport(t)?;
        tracing::debug!(node = node.me, "cluster connected");
        if node.me == 1 && echo_rounds > 0 {
            node.echo_rounds(echo_rounds)?;
        }
        Ok(())
    }

    /// Starts the vCPU threads (a vCPU runs on the node the spec names, and waits
    /// elsewhere), node 0's futex thread and the access sampler. `timeout` ends the run
    /// with [`Error::Timeout`] (node 0 enforces it in [`RunningNode::wait`]).
    pub fn start(self, timeout: Option<Duration>) -> Result<RunningNode, Error> {
        let BootedNode {
            node,
            vm,
            vcpus,
            returned,
            layout,
            spec,
            observe,
            metrics_server,
        } = self;
        let me = node.me;
        let started = Instant::now();
        let mut running = RunningNode {
            node: Arc::clone(&node),
            threads: Vec::new(),
            futex_thread: None,
            started,
            timeout,
            layout,
            linger: observe.metrics_linger,
            metrics_server,
            _vm: vm,
        };
        let thread_err = |what, source| Error::Thread { what, source };
        for vcpu in vcpus {
            let id = vcpu.id();
            if returned[id as usize] {
                continue;
            }
            let here = spec.vcpu_nodes[id as usize] == me;
            let n = Arc::clone(&node);
            let cpu = (!observe.vcpu_cpus.is_empty())
                .then(|| observe.vcpu_cpus[id as usize % observe.vcpu_cpus.len()]);
            match std::thread::Builder::new()
                .name(format!("n{me}vcpu{id}"))
                .spawn(move || vcpu::vcpu_thread(n, vcpu, here, cpu))
            {
                Ok(h) => running.threads.push(h),
                Err(e) => {
                    // Whatever started ends with the run (RunningNode's drop).
                    node.fail(thread_err("vCPU", e));
                    return Err(Error::Config(format!(
                        "node {me}: cannot start a vCPU thread"
                    )));
                }
            }
        }
        if let Some(l) = &node.leader {
            running.futex_thread = Some(futex::start(l, Arc::clone(&node))?);
            if returned.iter().all(|&r| r) {
                l.all_returned();
            }
        }
        if observe.samples() {
            let n = Arc::clone(&node);
            let mode = match observe.touch_epoch {
                Some(epoch) => sampler::Mode::Sweep(epoch),
                None => sampler::Mode::Rate(observe.sample_rate),
            };
            let h = std::thread::Builder::new()
                .name(format!("n{me}sampler"))
                .spawn(move || sampler::sampler_thread(n, mode))
                .map_err(|e| thread_err("sampler", e))?;
            running.threads.push(h);
        }
        Ok(running)
    }
}

/// A node whose guest runs.
pub struct RunningNode {
    node: Arc<Node>,
    threads: Vec<JoinHandle<()>>,
    futex_thread: Option<JoinHandle<()>>,
    started: Instant,
    timeout: Option<Duration>,
    layout: BootLayout,
    linger: Option<Duration>,
    metrics_server: Option<MetricsServer>,
    _vm: Vm,
}

impl RunningNode {
    /// Pauses every vCPU of a node alone and captures its complete state. The vCPUs stay
    /// paused until [`RunningNode::resume`], or the end of the run.
    pub fn pause(&self) -> Result<Snapshot, Error> {
        let node = &self.node;
        let Some(leader) = node.leader.as_ref().filter(|_| node.nodes == 1) else {
            return Err(Error::PauseNeedsOneNode(node.nodes));
        };
        node.pause.request(true);
        // Waits in futex_wait return as if woken (the guest checks its word again) and
        // new ones return at once, until resumed.
        let slot = Arc::new(super::wait::Slot::default());
        futex::run(node, FutexOp::Hold(true), &slot);
        loop {
            if leader.ended() {
                node.pause.request(false);
                futex::run(node, FutexOp::Hold(false), &slot);
                return Err(Error::EndedBeforePause);
            }
            node.kick_vcpus();
            let returned = leader.returned_list();
            if let Some(vcpus) = node.pause.wait_parked(&returned, Duration::from_millis(10)) {
                return Ok(Snapshot {
                    vcpus,
                    report: leader.report(),
                    returned,
                    clock_ns: node.clock_ns(),
                    layout: self.layout.clone(),
                });
            }
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        let slot = Arc::new(super::wait::Slot::default());
        futex::run(&self.node, FutexOp::Hold(false), &slot);
        self.node.pause.request(false);
    }

    /// Guest RAM of this node.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.node.memory
    }

    /// Ends the run wherever it is (node 0) and returns guest RAM, for a restore.
    pub fn stop(self) -> Arc<GuestMemory> {
        if let Some(leader) = &self.node.leader {
            leader.finish(Ok(0));
        }
        let memory = Arc::clone(&self.node.memory);
        let _ = self.wait();
        memory
    }

    /// Waits for the end of the run and ends this node's part. Node 0 ends the run (the
    /// guest exits, fails, or the timeout passes), stops every node, collects their
    /// counters and returns the outcome; other nodes return `None` once node 0 stopped
    /// them (or `Err` when their own part failed: node 0 was told).
    pub fn wait(mut self) -> Result<Option<ClusterOutcome>, Error> {
        let node = Arc::clone(&self.node);
        let result = match &node.leader {
            Some(leader) => {
                leader.wait_end(self.timeout, self.started);
                // Stop everyone, collect their stats, say goodbye.
                for peer in 1..node.nodes {
                    node.send(peer, Message::Stop);
                }
                self.join();
                leader.record_stats(0, node.stats(), node.take_samples());
                leader.wait_stats(Duration::from_secs(5));
                for peer in 1..node.nodes {
                    node.send(peer, Message::Bye);
                }
                node.close_transport();
                let wall = leader.wall(self.started);
                Ok(Some(leader.outcome(wall)))
            }
            None => {
                let failure = node.wait_stop_or_failure();
                self.join();
                node.send_quietly(
                    0,
                    &Message::Stats {
                        stats: node.stats(),
                        samples: node.take_samples(),
                    },
                );
                node.wait_bye(Duration::from_secs(5));
                node.close_transport();
                match failure {
                    Some(text) if !node.stop_received() => Err(Error::Reported(text)),
                    _ => Ok(None),
                }
            }
        };
        if let Some(n) = node.finish_trace()? {
            tracing::debug!(node = node.me, events = n, "trace written");
        }
        if let (Some(server), Some(linger)) = (&self.metrics_server, self.linger) {
            // The final counters stay up for a scraper whose interval is longer than the run.
            tracing::info!(node = node.me, addr = %server.addr(), ?linger, "run over; metrics linger");
            std::thread::sleep(linger);
        }
        self.metrics_server = None;
        result
    }

    /// Stops this node's vCPUs and joins every thread it started.
    fn join(&mut self) {
        self.node.stop_vcpus();
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                self.node
                    .fail(Error::Config("a node thread panicked".into()));
            }
        }
        if let Some(f) = self.futex_thread.take() {
            let _ = f.join();
        }
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        if !self.threads.is_empty() || self.futex_thread.is_some() {
            if let Some(leader) = &self.node.leader {
                leader.finish(Ok(0));
            }
            self.join();
        }
    }
}

/// Runs this node's part of the guest: boot, connect, start, wait. Node 0 returns the
/// run's outcome; other nodes return `None` once node 0 has ended the run.
pub fn run_node(setup: NodeSetup) -> Result<Option<ClusterOutcome>, Error> {
    let NodeSetup {
        me,
        spec,
        image,
        transport,
        mesh,
        timeout,
        echo_rounds,
        epoch_ns,
        observe,
        policy,
    } = setup;
    let started = Instant::now();
    let booted = BootedNode::boot(me, spec, &image, observe, policy, epoch_ns)?;
    tracing::debug!(
        node = me,
        setup_ms = started.elapsed().as_millis() as u64,
        "node booted"
    );
    booted.connect(transport, &mesh, echo_rounds)?;
    booted.start(timeout)?.wait()
}
