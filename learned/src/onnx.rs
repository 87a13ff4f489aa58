//! Writes placement models as ONNX files that [`Model::load`](crate::Model::load) (and
//! onnxruntime) accept: no ONNX exporter exists for linfa's models, so the graphs are
//! built here from ONNX's own protobuf messages (tract's generated `pb` types).
//!
//! - [`logistic`]: `features → MatMul(w) → Add(b) → Sigmoid → p_vcpu [N, 1]`, opset 17.
//! - [`trees`]: one `ai.onnx.ml` `TreeEnsembleClassifier` (ml opset 3; tract runs it, and
//!   has no `TreeEnsembleRegressor`), the leaves' class-1 shares averaged over the trees:
//!   outputs `label` (int64 `[N]`) and `probabilities` (f32 `[N, 2]`).
//!
//! Both carry the feature version and names in their metadata, with any extra entries
//! the caller gives (what they were trained on).

use crate::{META_FEATURES, META_FEATURE_VERSION};
use flotilla_placement::features::{FEATURE_COUNT, FEATURE_NAMES, FEATURE_VERSION};
use prost::Message;
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::{dimension, Dimension};
use tract_onnx::pb::{
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// The input's name in every model written here.
pub const INPUT: &str = "features";

/// A decision tree over the features, as a flat list of nodes; node 0 is the root.
#[derive(Debug, Clone, PartialEq)]
pub enum TreeNode {
    /// `x[feature] <= threshold` goes to `yes`, else to `no` (indices into the list).
    Branch {
        feature: usize,
        threshold: f32,
        yes: usize,
        no: usize,
    },
    /// The share of training weight here whose better choice was moving the vCPU.
    Leaf { p_vcpu: f32 },
}

/// A logistic model: `p = sigmoid(w · x + b)`.
pub fn logistic(w: &[f32; FEATURE_COUNT], b: f32, meta: &[(&str, String)]) -> Vec<u8> {
    let nodes = vec![
        node("MatMul", &[INPUT, "w"], &["wx"], "", vec![]),
        node("Add", &["wx", "b"], &["logit"], "", vec![]),
        node("Sigmoid", &["logit"], &["p_vcpu"], "", vec![]),
    ];
    let initializer = vec![
        f32_tensor("w", &[FEATURE_COUNT as i64, 1], w),
        f32_tensor("b", &[1], &[b]),
    ];
    let graph = GraphProto {
        name: "flotilla-logistic".into(),
        node: nodes,
        initializer,
        input: vec![value(
            INPUT,
            DataType::Float,
            &[None, Some(FEATURE_COUNT as i64)],
        )],
        output: vec![value("p_vcpu", DataType::Float, &[None, Some(1)])],
        ..Default::default()
    };
    model(graph, false, meta)
}

/// An ensemble of decision trees; its probability of moving the vCPU is the mean of the
/// leaves' `p_vcpu` the features reach. Errors name a malformed tree.
pub fn trees(trees: &[Vec<TreeNode>], meta: &[(&str, String)]) -> Result<Vec<u8>, String> {
    if trees.is_empty() {
        return Err("an ensemble needs at least one tree".into());
    }
    let mut a = Attrs::default();
    let share = 1.0 / trees.len() as f32;
    for (t, tree) in trees.iter().enumerate() {
        if tree.is_empty() {
            return Err(format!("tree {t} has no nodes"));
        }
        for (i, n) in tree.iter().enumerate() {
            a.tree_ids.push(t as i64);
            a.node_ids.push(i as i64);
            match *n {
                TreeNode::Branch {
                    feature,
                    threshold,
                    yes,
                    no,
                } => {
                    if feature >= FEATURE_COUNT || yes >= tree.len() || no >= tree.len() {
                        return Err(format!("tree {t} node {i} points outside the tree"));
                    }
                    a.features.push(feature as i64);
                    a.values.push(threshold);
                    a.modes.push(b"BRANCH_LEQ".to_vec());
                    a.yes.push(yes as i64);
                    a.no.push(no as i64);
                }
                TreeNode::Leaf { p_vcpu } => {
                    if !(0.0..=1.0).contains(&p_vcpu) {
                        return Err(format!("tree {t} leaf {i} has p_vcpu {p_vcpu}"));
                    }
                    a.features.push(0);
                    a.values.push(0.0);
                    a.modes.push(b"LEAF".to_vec());
                    a.yes.push(0);
                    a.no.push(0);
                    for (class, w) in [(0, 1.0 - p_vcpu), (1, p_vcpu)] {
                        a.class_trees.push(t as i64);
                        a.class_nodes.push(i as i64);
                        a.class_ids.push(class);
                        a.class_weights.push(w * share);
                    }
                }
            }
        }
    }
    let attributes = vec![
        ints("nodes_treeids", a.tree_ids),
        ints("nodes_nodeids", a.node_ids),
        ints("nodes_featureids", a.features),
        floats("nodes_values", a.values),
        strings("nodes_modes", a.modes),
        ints("nodes_truenodeids", a.yes),
        ints("nodes_falsenodeids", a.no),
        ints("class_treeids", a.class_trees),
        ints("class_nodeids", a.class_nodes),
        ints("class_ids", a.class_ids),
        floats("class_weights", a.class_weights),
        ints("classlabels_int64s", vec![0, 1]),
        string("post_transform", "NONE"),
    ];
    let graph = GraphProto {
        name: "flotilla-trees".into(),
        node: vec![node(
            "TreeEnsembleClassifier",
            &[INPUT],
            &["label", "probabilities"],
            "ai.onnx.ml",
            attributes,
        )],
        input: vec![value(
            INPUT,
            DataType::Float,
            &[None, Some(FEATURE_COUNT as i64)],
        )],
        output: vec![
            value("label", DataType::Int64, &[None]),
            value("probabilities", DataType::Float, &[None, Some(2)]),
        ],
        ..Default::default()
    };
    Ok(model(graph, true, meta))
}

#[derive(Default)]
struct Attrs {
    tree_ids: Vec<i64>,
    node_ids: Vec<i64>,
    features: Vec<i64>,
    values: Vec<f32>,
    modes: Vec<Vec<u8>>,
    yes: Vec<i64>,
    no: Vec<i64>,
    class_trees: Vec<i64>,
    class_nodes: Vec<i64>,
    class_ids: Vec<i64>,
    class_weights: Vec<f32>,
}

fn model(graph: GraphProto, ml: bool, meta: &[(&str, String)]) -> Vec<u8> {
    let mut opset_import = vec![OperatorSetIdProto {
        domain: String::new(),
        version: 17,
    }];
    if ml {
        opset_import.push(OperatorSetIdProto {
            domain: "ai.onnx.ml".into(),
            version: 3,
        });
    }
    let mut metadata_props = vec![
        entry(META_FEATURE_VERSION, &FEATURE_VERSION.to_string()),
        entry(META_FEATURES, &FEATURE_NAMES.join(",")),
    ];
    metadata_props.extend(meta.iter().map(|(k, v)| entry(k, v)));
    ModelProto {
        ir_version: 8,
        opset_import,
        producer_name: "flotilla".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props,
        ..Default::default()
    }
    .encode_to_vec()
}

fn entry(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: key.into(),
        value: value.into(),
    }
}

fn node(
    op: &str,
    inputs: &[&str],
    outputs: &[&str],
    domain: &str,
    attribute: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        name: format!("{op}_{}", outputs[0]),
        op_type: op.into(),
        domain: domain.into(),
        attribute,
        ..Default::default()
    }
}

fn f32_tensor(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: DataType::Float as i32,
        float_data: data.to_vec(),
        ..Default::default()
    }
}

/// A tensor's type and shape (`None`: the symbolic batch dimension `N`).
fn value(name: &str, elem: DataType, dims: &[Option<i64>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(v) => dimension::Value::DimValue(*v),
                None => dimension::Value::DimParam("N".into()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn attr(name: &str, t: AttributeType) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: t as i32,
        ..Default::default()
    }
}

fn ints(name: &str, v: Vec<i64>) -> AttributeProto {
    AttributeProto {
        ints: v,
        ..attr(name, AttributeType::Ints)
    }
}

fn floats(name: &str, v: Vec<f32>) -> AttributeProto {
    AttributeProto {
        floats: v,
        ..attr(name, AttributeType::Floats)
    }
}

fn strings(name: &str, v: Vec<Vec<u8>>) -> AttributeProto {
    AttributeProto {
        strings: v,
        ..attr(name, AttributeType::Strings)
    }
}

fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        s: v.as_bytes().to_vec(),
        ..attr(name, AttributeType::String)
    }
}
