use super::*;
use flotilla_placement::by_name;
use flotilla_telemetry::trace::{Event, RunMeta, TraceMeta, ACCESS_READ, ACCESS_WRITE};

/// A 2-node, 64 MiB trace with `touches` (vcpu, page, write) 10 µs apart per vCPU, as
/// access samples, vCPU `v` starting on node `v % 2`.
fn trace(vcpus: u32, touches: &[(u16, u64, bool)]) -> Trace {
    let mut clock = vec![0u64; vcpus as usize];
    let events = touches
        .iter()
        .map(|&(vcpu, page, write)| {
            clock[vcpu as usize] += 10_000;
            Event {
                t_ns: clock[vcpu as usize],
                page,
                vcpu,
                node: vcpu % 2,
                peer: NONE16,
                replicas: NONE16,
                kind: EventKind::AccessSample as u8,
                access: if write { ACCESS_WRITE } else { ACCESS_READ },
                ..Default::default()
            }
        })
        .collect();
    Trace {
        meta: TraceMeta {
            nodes: 2,
            vcpus,
            mem_bytes: 64 << 20,
            run: Some(RunMeta {
                ram: "contiguous".into(),
                vcpu_nodes: (0..vcpus).map(|v| (v % 2) as u16).collect(),
                ..Default::default()
            }),
            ..Default::default()
        },
        events,
    }
}

/// `touches`, after vCPU 0 (on node 0) has written every page of node 0's half that they
/// touch, so those hold data: no longer fresh memory, which a claim would take.
fn warmed(touches: &[(u16, u64, bool)]) -> Vec<(u16, u64, bool)> {
    let mut pages: Vec<u64> = touches.iter().map(|t| t.1).filter(|&p| p < 8448).collect();
    pages.sort_unstable();
    pages.dedup();
    let mut out: Vec<_> = pages.into_iter().map(|p| (0u16, p, true)).collect();
    out.extend_from_slice(touches);
    out
}

const COSTS: Costs = Costs {
    fetch_ns: 100_000,
    upgrade_ns: 60_000,
    invalidate_ns: 60_000,
    move_ns: 200_000,
    install_ns: 5_000,
    compute_scale: 1.0,
};

fn shape() -> Shape {
    Shape::new(2, 1)
}

fn run(t: &Trace, policy: &str) -> Outcome {
    replay(t, &shape(), &COSTS, |n| by_name(policy, 1, n).unwrap()).unwrap()
}

#[test]
fn pages_come_to_the_vcpu_or_the_vcpu_goes_to_them() {
    // vCPU 1 (node 1) reads 100 pages of node 0's half of RAM that vCPU 0 wrote.
    let touches: Vec<_> = (0..100).map(|i| (1u16, 1000 + i, false)).collect();
    let t = trace(2, &warmed(&touches));
    let page = run(&t, "always-page");
    assert_eq!(page.remote_faults, 100);
    assert_eq!(page.page_moves, 100);
    assert_eq!(page.replicas_made, 100);
    assert_eq!(page.vcpu_moves, 0);
    let vcpu = run(&t, "always-vcpu");
    assert_eq!(vcpu.remote_faults, 1, "after one move every page is local");
    assert_eq!(vcpu.vcpu_moves, 1);
    // 100 fetches against one move.
    assert!(page.stall_ms > vcpu.stall_ms * 10.0, "{page:?} {vcpu:?}");
}

#[test]
fn write_sharing_invalidates_and_ping_pongs() {
    // Two vCPUs on two nodes take turns writing one page of node 0.
    let touches: Vec<_> = (0..20).map(|i| ((i % 2) as u16, 2000, true)).collect();
    let t = trace(2, &touches);
    let o = run(&t, "always-page");
    // Every fault moves the page (no replicas of a written page). How many there are
    // depends on timing: a vCPU stalled on the page lets the other write it meanwhile.
    assert!((2..=19).contains(&o.remote_faults), "{o:?}");
    assert_eq!(o.page_moves, o.remote_faults);
    assert_eq!(o.replicas_made, 0);
    let alone = replay(&t, &Shape::new(1, 2), &COSTS, |n| {
        by_name("always-page", 1, n).unwrap()
    })
    .unwrap();
    assert_eq!(alone.remote_faults, 0);
    // Reads then a write: replicas made, then invalidated.
    let touches = [
        (0, 3000, false),
        (1, 3000, false),
        (0, 3001, false),
        (0, 3000, true),
    ];
    let o = run(&trace(2, &touches), "always-page");
    assert_eq!(o.replicas_made, 1);
    assert_eq!(o.invalidations, 1);
    assert_eq!(o.remote_faults, 2, "vCPU 1's read, vCPU 0's upgrade");
}

#[test]
fn a_slower_link_costs_more_and_more_cpus_cost_less() {
    let touches: Vec<_> = (0..50)
        .flat_map(|i| {
            [
                (0u16, 1000 + i, false),
                (1u16, 2000 + i, false),
                (2u16, 3000 + i, false),
            ]
        })
        .collect();
    let t = trace(3, &touches);
    let base = replay(&t, &shape(), &COSTS, |n| {
        by_name("always-page", 1, n).unwrap()
    })
    .unwrap();
    let slow = replay(&t, &shape(), &COSTS.with_link_delta(100_000), |n| {
        by_name("always-page", 1, n).unwrap()
    })
    .unwrap();
    assert!(slow.wall_ms > base.wall_ms, "{base:?} {slow:?}");
    assert_eq!(slow.remote_faults, base.remote_faults);
    // vCPUs 0 and 2 share node 0's one CPU; with 2 CPUs a node they do not.
    let local: Vec<_> = (0..50)
        .flat_map(|i| [(0u16, 1000 + i, false), (2u16, 3000 + i, false)])
        .collect();
    let t = trace(3, &local);
    let base = replay(&t, &shape(), &COSTS, |n| {
        by_name("always-page", 1, n).unwrap()
    })
    .unwrap();
    let wide = replay(&t, &Shape::new(2, 2), &COSTS, |n| {
        by_name("always-page", 1, n).unwrap()
    })
    .unwrap();
    assert!(wide.wall_ms < base.wall_ms, "{base:?} {wide:?}");
}

#[test]
fn more_nodes_than_recorded_and_bad_shapes() {
    let touches: Vec<_> = (0..40)
        .map(|i| ((i % 4) as u16, 1000 + i * 50, true))
        .collect();
    let t = trace(4, &touches);
    let o = replay(&t, &Shape::new(8, 1), &COSTS, |n| {
        by_name("heuristic", 1, n).unwrap()
    })
    .unwrap();
    assert_eq!(o.events, 40);
    let err = |s: Shape| {
        replay(&t, &s, &COSTS, |n| by_name("always-page", 1, n).unwrap())
            .unwrap_err()
            .to_string()
    };
    assert!(err(Shape::new(0, 1)).contains("1 to 64 nodes"));
    assert!(err(Shape::new(65, 1)).contains("1 to 64 nodes"));
    assert!(err(Shape::new(2, 0)).contains("at least one CPU"));
    let beyond = trace(2, &[(0, 1 << 30, false)]);
    let e = replay(&beyond, &shape(), &COSTS, |n| {
        by_name("always-page", 1, n).unwrap()
    });
    assert!(e.unwrap_err().to_string().contains("beyond the guest's"));
    let empty = trace(2, &[]);
    let e = replay(&empty, &shape(), &COSTS, |n| {
        by_name("always-page", 1, n).unwrap()
    });
    assert!(matches!(e, Err(SimError::Empty)));
}

#[test]
fn costs_come_from_the_trace() {
    let mut t = trace(2, &warmed(&[(1, 1000, false)]));
    let run = t.meta.run.as_mut().unwrap();
    run.costs.rtt_4k_ns = 50_000;
    run.costs.fault_service_ns = 90_000;
    run.costs.vcpu_move_ns = 210_000;
    let c = Costs::from_trace(&t);
    assert_eq!(
        (c.fetch_ns, c.upgrade_ns, c.move_ns),
        (90_000, 50_000, 210_000)
    );
    let o = replay(&t, &shape(), &c, |n| by_name("always-page", 1, n).unwrap()).unwrap();
    assert_eq!(o.stall_ms, 0.09);
}

#[test]
fn compute_is_calibrated_on_a_one_node_run() {
    let touches: Vec<_> = (0..100).map(|i| (0u16, 1000 + i, false)).collect();
    let t = trace(2, &touches);
    // 99 gaps of 10 µs, less the 5 µs install each sample paid: 0.495 ms of compute on
    // one node. A measured 1-node run of 0.099 ms means the recording ran 5 times slow.
    let scale = calibrate_compute(&t, 1, &COSTS, 0.099).unwrap();
    assert!((scale - 0.2).abs() < 1e-9, "{scale}");
    let c = Costs {
        compute_scale: scale,
        ..COSTS
    };
    let o = replay(&t, &Shape::new(1, 1), &c, |n| {
        by_name("always-page", 1, n).unwrap()
    })
    .unwrap();
    assert!((o.wall_ms - 0.099).abs() < 1e-6, "{o:?}");
}

#[test]
fn conflicting_touches_keep_their_recorded_order() {
    // vCPU 0 computes 1 ms between its writes of page 2000, vCPU 1 none: unordered, vCPU
    // 1 would make all its writes while vCPU 0 computes, and the page would move twice.
    // As recorded, the two alternate, and every write after the first moves the page.
    let mut t = trace(
        2,
        &(0..20)
            .map(|i| ((i % 2) as u16, 2000, true))
            .collect::<Vec<_>>(),
    );
    for e in t.events.iter_mut().filter(|e| e.vcpu == 0) {
        e.t_ns *= 100;
    }
    for e in t.events.iter_mut().filter(|e| e.vcpu == 1) {
        e.t_ns = e.t_ns * 100 + 1;
    }
    let o = run(&t, "always-page");
    assert_eq!(o.remote_faults, 19, "{o:?}");
    assert_eq!(o.page_moves, 19, "{o:?}");
    // A reader waits for the write it saw; reads of other pages do not wait.
    let t = trace(2, &[(0, 3000, true), (1, 3000, false), (1, 9000, false)]);
    let o = run(&t, "always-page");
    assert_eq!(o.replicas_made, 1, "{o:?}");
}

#[test]
fn looking_ahead_leaves_the_replay_as_it_was() {
    let touches: Vec<_> = (0..200)
        .map(|i| {
            let v = (i % 3) as u16;
            (v, 1000 + (i * 37) % 9000, i % 5 == 0)
        })
        .collect();
    let t = trace(3, &touches);
    for policy in ["always-page", "heuristic", "random"] {
        let plain = run(&t, policy);
        let mut make = |n| by_name(policy, 1, n).unwrap();
        let (labelled, labels) = replay_labelled(
            &t,
            &shape(),
            &COSTS,
            Decider::Policy(&mut make),
            LookAhead::fixed(8),
            true,
        )
        .unwrap();
        assert_eq!(
            plain, labelled,
            "{policy}: the labels' look-aheads changed the replay"
        );
        assert_eq!(
            labels.len() as u64,
            labelled.remote_faults - upgrades(&t, policy)
        );
        assert!(labels
            .iter()
            .all(|l| l.cost_page_ns > 0 && l.cost_vcpu_ns > 0));
    }
}

/// Faults no policy decides (an upgrade of a page already on the vCPU's node).
fn upgrades(t: &Trace, policy: &str) -> u64 {
    let mut make = |n| by_name(policy, 1, n).unwrap();
    let mut sim = Sim::new(t, &shape(), &COSTS).unwrap();
    let mut policies: Vec<_> = (0..2).map(&mut make).collect();
    let mut n = 0;
    while let Some(s) = sim.take() {
        let d = sim.fault(&s).map(|f| {
            if sim.decided(&s, &f) {
                let fc = sim.context(&s, &f);
                (f, policies[fc.node as usize].decide(&fc))
            } else {
                n += 1;
                (f, Decision::MovePage)
            }
        });
        sim.serve(s, d).unwrap();
    }
    n
}

#[test]
fn the_oracle_moves_a_vcpu_to_its_data_and_brings_a_stray_page() {
    // vCPU 1 (node 1) reads 100 pages of node 0, where no vCPU runs (once vCPU 0 has
    // written them): it should go there.
    let t = trace(
        2,
        &warmed(
            &(0..100)
                .map(|i| (1u16, 1000 + i, false))
                .collect::<Vec<_>>(),
        ),
    );
    let (o, labels) = replay_labelled(
        &t,
        &shape(),
        &COSTS,
        Decider::Oracle,
        LookAhead::fixed(DEFAULT_HORIZON),
        true,
    )
    .unwrap();
    assert_eq!(o.vcpu_moves, 1, "{o:?}");
    assert_eq!(labels[0].taken, Decision::MoveVcpu);
    assert!(
        labels[0].cost_vcpu_ns < labels[0].cost_page_ns,
        "{:?}",
        labels[0]
    );
    // One page of node 0, then 50 of its own node's: moving would make those remote.
    let mut touches = vec![(1u16, 1000, false)];
    touches.extend((0..50).map(|i| (1u16, 9000 + i, false)));
    let (o, labels) = replay_labelled(
        &trace(2, &warmed(&touches)),
        &shape(),
        &COSTS,
        Decider::Oracle,
        LookAhead::fixed(DEFAULT_HORIZON),
        true,
    )
    .unwrap();
    assert_eq!((o.vcpu_moves, o.page_moves), (0, 1), "{o:?}");
    assert_eq!(labels[0].taken, Decision::MovePage);
    let e = replay_labelled(
        &t,
        &shape(),
        &COSTS,
        Decider::Oracle,
        LookAhead::fixed(0),
        false,
    );
    assert!(matches!(e, Err(SimError::Horizon)));
}

#[test]
fn the_image_starts_everywhere_and_a_stack_follows_its_vcpu() {
    use flotilla_telemetry::trace::GuestLayout;
    // Image pages 512..520; 4-page stacks from 520 (vCPU 1's: 524..528, on node 1).
    let with_layout = |touches: &[(u16, u64, bool)]| {
        let mut t = trace(2, touches);
        let run = t.meta.run.as_mut().unwrap();
        run.stack_bytes = 4 * 4096;
        run.layout = Some(GuestLayout {
            image_pages: 512..520,
            stacks_first_page: 520,
        });
        t
    };
    let t = with_layout(&[(1, 515, false), (1, 525, true), (1, 526, false)]);
    let o = run(&t, "always-page");
    assert_eq!(
        o.remote_faults, 0,
        "image replicated, own stack at home: {o:?}"
    );
    // Writing an image page takes ownership and drops the other copy.
    let o = run(&with_layout(&[(1, 515, true)]), "always-page");
    assert_eq!((o.remote_faults, o.invalidations), (1, 1), "{o:?}");
    // Sent to node 0's data, the vCPU brings its stack page along when it touches it,
    // whatever the policy says.
    let t = with_layout(&[
        (1, 525, true),
        (1, 1000, false),
        (1, 525, true),
        (1, 1001, false),
    ]);
    let o = run(&t, "always-vcpu");
    assert_eq!(o.vcpu_moves, 1, "{o:?}");
    assert_eq!((o.remote_faults, o.page_moves), (2, 1), "{o:?}");
}

#[test]
fn a_first_touch_of_fresh_remote_memory_claims_a_run_with_no_data() {
    // vCPU 1 (node 1) writes 40 fresh pages of node 0's half, one after another: one
    // claim per run of 16 (the engine's CLAIM_EXTENT), no data, one round trip each; the
    // third claim takes 8 pages more than the guest touches.
    let touches: Vec<_> = (0..40).map(|i| (1u16, 1000 + i, true)).collect();
    let o = run(&trace(2, &touches), "always-page");
    assert_eq!(
        (o.remote_faults, o.pages_claimed, o.page_moves),
        (3, 48, 0),
        "{o:?}"
    );
    assert!((o.stall_ms - 3.0 * 0.06).abs() < 1e-9, "{o:?}");
    // A page its home touched is not fresh, nor are the 15 after it, which that first
    // touch mapped (FIRST_TOUCH_RUN): the claim stops before it, and they are fetched.
    let mut touches = vec![(0u16, 1005, true)];
    touches.extend((0..10).map(|i| (1u16, 1000 + i, true)));
    let o = run(&trace(2, &touches), "always-page");
    assert_eq!((o.pages_claimed, o.page_moves), (5, 5), "{o:?}");
}

#[test]
fn a_replay_can_start_the_guest_otherwise_than_recorded() {
    // vCPU 0 writes 4 consecutive pages, then vCPU 3 reads them. As recorded (contiguous
    // RAM, vCPU 0 on node 0 where they all live, vCPU 3 on node 1): vCPU 3's four reads
    // are remote. On 4 nodes with RAM interleaved and vCPUs spread, three of the pages
    // are homed elsewhere than node 0: vCPU 0's writes claim them (3 faults), and vCPU 3,
    // now on node 3, still fetches all four from node 0.
    let touches = warmed(&(0..4).map(|i| (3u16, 1000 + i, false)).collect::<Vec<_>>());
    let t = trace(4, &touches);
    let shape = Shape {
        ram: Some(Ram::Interleave),
        spread: true,
        ..Shape::new(4, 1)
    };
    let as_recorded = replay(&t, &Shape::new(4, 1), &COSTS, |n| {
        by_name("always-page", 1, n).unwrap()
    })
    .unwrap();
    assert_eq!(as_recorded.remote_faults, 4, "{as_recorded:?}");
    let spread = replay(&t, &shape, &COSTS, |n| {
        by_name("always-page", 1, n).unwrap()
    })
    .unwrap();
    assert_eq!(
        (spread.remote_faults, spread.pages_claimed),
        (3 + 4, 3),
        "{spread:?}"
    );
}
