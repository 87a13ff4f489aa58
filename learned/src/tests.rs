use super::*;
use flotilla_placement::{Access, History};
use prost::Message;

fn weights() -> [f32; FEATURE_COUNT] {
    let mut w = [0.0; FEATURE_COUNT];
    for (i, w) in w.iter_mut().enumerate() {
        *w = (i as f32 - 8.0) / 10.0;
    }
    w
}

fn x(seed: u32) -> [f32; FEATURE_COUNT] {
    let mut x = [0.0; FEATURE_COUNT];
    for (i, v) in x.iter_mut().enumerate() {
        *v = ((seed as usize * 7 + i * 13) % 11) as f32 - 5.0;
    }
    x
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

#[test]
fn a_written_logistic_model_loads_and_computes_its_formula() {
    let (w, b) = (weights(), 0.25);
    let bytes = onnx::logistic(&w, b, &[("trained_on", "test".into())]);
    let m = Model::from_bytes(&bytes, "logistic.onnx").unwrap();
    let mut s = m.state().unwrap();
    for seed in 0..20 {
        let x = x(seed);
        let z: f32 = w.iter().zip(&x).map(|(w, x)| w * x).sum::<f32>() + b;
        let p = m.predict(&mut s, &x).unwrap();
        assert!((p - sigmoid(z)).abs() < 1e-5, "{p} vs {}", sigmoid(z));
    }
}

#[test]
fn a_written_tree_ensemble_averages_the_leaves_reached() {
    use onnx::TreeNode::{Branch, Leaf};
    // Tree 0 splits on feature 0 (is_write), tree 1 on feature 6 (local_vcpus).
    let t0 = vec![
        Branch {
            feature: 0,
            threshold: 0.5,
            yes: 1,
            no: 2,
        },
        Leaf { p_vcpu: 0.2 },
        Leaf { p_vcpu: 0.9 },
    ];
    let t1 = vec![
        Branch {
            feature: 6,
            threshold: 2.0,
            yes: 1,
            no: 2,
        },
        Leaf { p_vcpu: 0.0 },
        Leaf { p_vcpu: 1.0 },
    ];
    let bytes = onnx::trees(&[t0, t1], &[]).unwrap();
    let m = Model::from_bytes(&bytes, "trees.onnx").unwrap();
    let mut s = m.state().unwrap();
    let mut x = [0.0; FEATURE_COUNT];
    for (write, vcpus, want) in [
        (0.0, 1.0, 0.1),
        (1.0, 1.0, 0.45),
        (0.0, 3.0, 0.6),
        (1.0, 3.0, 0.95),
    ] {
        x[0] = write;
        x[6] = vcpus;
        let p = m.predict(&mut s, &x).unwrap();
        assert!((p - want).abs() < 1e-5, "write {write} vcpus {vcpus}: {p}");
    }
    assert!(onnx::trees(&[], &[]).is_err());
    let bad = vec![Branch {
        feature: 0,
        threshold: 0.0,
        yes: 5,
        no: 0,
    }];
    assert!(onnx::trees(&[bad], &[]).unwrap_err().contains("outside"));
}

/// Rewrites a good model's protobuf.
fn edited(edit: impl FnOnce(&mut tract_onnx::pb::ModelProto)) -> Vec<u8> {
    let bytes = onnx::logistic(&weights(), 0.0, &[]);
    let mut m = tract_onnx::pb::ModelProto::decode(&bytes[..]).unwrap();
    edit(&mut m);
    m.encode_to_vec()
}

fn error(bytes: &[u8]) -> String {
    Model::from_bytes(bytes, "m.onnx").unwrap_err().to_string()
}

#[test]
fn bad_models_are_refused_with_what_is_wrong() {
    let good = onnx::logistic(&weights(), 0.0, &[]);
    let e = error(&good[..good.len() / 2]);
    assert!(e.contains("m.onnx is not an ONNX model"), "truncated: {e}");
    let e = error(b"#!/bin/sh\necho not a model\n");
    assert!(e.contains("not an ONNX model"), "text: {e}");
    let e = error(&[]);
    assert!(e.contains("not an ONNX model"), "empty: {e}");

    let e = error(&edited(|m| m.metadata_props.clear()));
    assert!(e.contains("not a Flotilla placement model"), "{e}");
    let e = error(&edited(|m| m.metadata_props[0].value = "999".into()));
    assert!(
        e.contains("feature version 999") && e.contains("retrain"),
        "{e}"
    );
    let e = error(&edited(|m| {
        m.metadata_props[1].value = "a,b,c".into();
    }));
    assert!(e.contains("its features (a,b,c)"), "{e}");

    // A model of 17 features, its metadata claiming 18.
    let e = error(&edited(|m| {
        let g = m.graph.as_mut().unwrap();
        let t = &mut g.initializer[0];
        t.dims = vec![FEATURE_COUNT as i64 - 1, 1];
        t.float_data.pop();
        if let Some(tract_onnx::pb::type_proto::Value::TensorType(t)) =
            g.input[0].r#type.as_mut().unwrap().value.as_mut()
        {
            t.shape.as_mut().unwrap().dim[1].value = Some(
                tract_onnx::pb::tensor_shape_proto::dimension::Value::DimValue(
                    FEATURE_COUNT as i64 - 1,
                ),
            );
        }
    }));
    assert!(e.contains("has shape [?, 17]"), "{e}");

    assert!(Model::load(Path::new("/nonexistent/m.onnx"))
        .unwrap_err()
        .to_string()
        .contains("cannot read model /nonexistent/m.onnx"));
}

#[test]
fn the_learned_policy_follows_the_model() {
    // A model that says "move the vCPU" exactly for writes.
    let mut w = [0.0; FEATURE_COUNT];
    w[0] = 20.0;
    let m = Arc::new(Model::from_bytes(&onnx::logistic(&w, -10.0, &[]), "w.onnx").unwrap());
    let mut p = Learned::new(m).unwrap();
    let h = History::default();
    let mut c = FaultContext {
        vcpu: 0,
        node: 0,
        nodes: 2,
        page: 100,
        access: Access::Read,
        holder: 1,
        home: 1,
        have_replica: false,
        local_vcpus: 2,
        page_heat: 0,
        history: &h,
        node_vcpus: &[2, 1],
        cpus: 2,
        link: Default::default(),
    };
    assert_eq!(p.decide(&c), Decision::MovePage);
    c.access = Access::Write;
    assert_eq!(p.decide(&c), Decision::MoveVcpu);
    // The load is the model's to weigh (it sees would_pile_up and room_on_holder), not
    // a rule on top: its labels priced the contention a pile-up causes.
    c.node_vcpus = &[1, 2];
    c.local_vcpus = 1;
    assert_eq!(p.decide(&c), Decision::MoveVcpu);
    let mut forked = p.fork().expect("a learned policy forks");
    c.node_vcpus = &[2, 1];
    assert_eq!(forked.decide(&c), Decision::MoveVcpu);
    assert_eq!(p.errors, 0);
}

/// Examples where moving the vCPU is better exactly for writes, except that a tenth of the
/// reads favour it too, by far more than the rest lose: weighted by cost, reads should go
/// the vCPU's way as well.
fn examples() -> train::Examples {
    let mut ex = train::Examples::default();
    for i in 0..4000u32 {
        let mut x = [0f32; FEATURE_COUNT];
        let write = i % 2 == 0;
        x[0] = if write { 1.0 } else { 0.0 };
        // A feature that carries nothing.
        x[10] = (i % 7) as f32;
        let (page, vcpu) = match (write, i % 20 == 1) {
            (true, _) => (1000.0, 100.0),
            (false, true) => (10_000.0, 100.0),
            (false, false) => (100.0, 200.0),
        };
        ex.push(x, page, vcpu, if i % 3 == 0 { "a" } else { "b" });
    }
    ex
}

#[test]
fn training_weighs_each_example_by_what_a_wrong_choice_costs() {
    let ex = examples();
    let all: Vec<usize> = (0..ex.len()).collect();
    let lin = train::logistic(&ex, &all, &train::LogisticOptions::default()).unwrap();
    let trees = train::forest(&ex, &all, &train::ForestOptions::default(), &mut |_| {}).unwrap();
    let mut write = [0f32; FEATURE_COUNT];
    write[0] = 1.0;
    let read = [0f32; FEATURE_COUNT];
    for (name, p) in [
        (
            "logistic",
            &(|x: &[f32; FEATURE_COUNT]| lin.p_vcpu(x)) as &dyn Fn(&_) -> f64,
        ),
        ("forest", &|x: &[f32; FEATURE_COUNT]| {
            train::forest_p_vcpu(&trees, x)
        }),
    ] {
        assert!(p(&write) > 0.5, "{name}: writes move the vCPU");
        // Unweighted, nine reads in ten favour the page; by cost the vCPU wins.
        assert!(p(&read) > 0.5, "{name}: reads too, by cost ({})", p(&read));
        let e = train::evaluate(&ex, &all, |x| p(x) > 0.5);
        assert!(e.rule_ns <= e.page_ns.min(e.vcpu_ns), "{name}: {e:?}");
    }
    // The written models decide as the trainer does, in tract.
    let files = [
        onnx::logistic(&lin.w, lin.b, &[]),
        onnx::trees(&trees, &[]).unwrap(),
    ];
    for (bytes, p) in files
        .iter()
        .zip([lin.p_vcpu(&read), train::forest_p_vcpu(&trees, &read)])
    {
        let m = Model::from_bytes(bytes, "trained.onnx").unwrap();
        let mut s = m.state().unwrap();
        let got = m.predict(&mut s, &read).unwrap() as f64;
        assert!((got - p).abs() < 1e-4, "tract {got}, trainer {p}");
    }
}

#[test]
fn training_refuses_data_without_a_choice_to_learn() {
    let mut ex = train::Examples::default();
    ex.push([0.0; FEATURE_COUNT], 5.0, 5.0, "a");
    let idx = [0];
    let e = train::logistic(&ex, &idx, &Default::default()).unwrap_err();
    assert!(matches!(e, train::TrainError::NoSignal), "{e}");
    ex.push([1.0; FEATURE_COUNT], 5.0, 1.0, "a");
    let e = train::forest(&ex, &[0, 1], &Default::default(), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("same better choice"), "{e}");
    // Groups select in and out.
    assert_eq!(ex.select(Some("a"), true), vec![0, 1]);
    assert!(ex.select(Some("a"), false).is_empty());
}

/// `notebooks/train-policy.ipynb` exports a LightGBM model with onnxmltools and writes a
/// fixed feature file with onnxruntime's decisions on it: tract must decide the same.
#[test]
fn python_and_tract_decide_alike() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models");
    let model = Model::load(&dir.join("lgbm-v1.onnx")).unwrap();
    let mut state = model.state().unwrap();
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let features = read("parity-features.csv");
    let decisions = read("lgbm-v1.onnxruntime.csv");
    let mut header = features.lines().next().unwrap().split(',');
    assert!(
        header.by_ref().eq(FEATURE_NAMES.iter().copied()),
        "parity-features.csv has other columns than this build's features"
    );
    let (mut rows, mut near) = (0, 0);
    for (x, d) in features.lines().skip(1).zip(decisions.lines().skip(1)) {
        let mut v = [0f32; FEATURE_COUNT];
        for (slot, s) in v.iter_mut().zip(x.split(',')) {
            *slot = s.parse().unwrap();
        }
        let (p_ort, move_ort) = d.split_once(',').unwrap();
        let p_ort: f64 = p_ort.parse().unwrap();
        let p = model.predict(&mut state, &v).unwrap() as f64;
        assert!(
            (p - p_ort).abs() < 1e-4,
            "row {rows}: tract {p}, onnxruntime {p_ort}"
        );
        if (p_ort - 0.5).abs() > 1e-4 {
            assert_eq!(
                u8::from(p > 0.5),
                move_ort.parse::<u8>().unwrap(),
                "row {rows}"
            );
        } else {
            near += 1;
        }
        rows += 1;
    }
    assert_eq!(rows, 500);
    assert!(near < 5, "{near} rows at even odds");
}
