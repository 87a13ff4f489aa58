//! The learned placement policy: a model of the fault features
//! ([`flotilla_placement::features`]) in an ONNX file, served with tract.
//!
//! A model file is a Flotilla placement model when
//! - its metadata carries [`META_FEATURE_VERSION`] equal to this build's
//!   [`FEATURE_VERSION`] and [`META_FEATURES`] equal to its [`FEATURE_NAMES`] joined by
//!   commas (a model trained on other features is refused, not fed the wrong numbers);
//! - it has one input, `f32` of shape `[N, FEATURE_COUNT]` (`N` symbolic or 1);
//! - one of its outputs is `f32` of shape `[N, 2]` (the probabilities of moving the page
//!   and of moving the vCPU, as scikit-learn and `flotilla train` export classifiers) or
//!   `[N, 1]` (the probability of moving the vCPU); the first such output is used, label
//!   outputs are ignored.
//!
//! [`Model::load`] checks all of that, optimizes the graph for one row, and runs it once
//! on a zero vector, so a bad model is a clear error at node start, before a guest runs.
//! [`onnx`] writes such files; [`train`] fits them with linfa.

pub mod onnx;
pub mod train;

use flotilla_placement::features::{features, FEATURE_COUNT, FEATURE_NAMES, FEATURE_VERSION};
use flotilla_placement::{Decision, FaultContext, Policy};
use std::path::Path;
use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::model::TypedSimpleState;

/// Metadata key of the feature version a model was trained on.
pub const META_FEATURE_VERSION: &str = "flotilla.feature_version";
/// Metadata key of the comma-separated feature names, in input order.
pub const META_FEATURES: &str = "flotilla.features";

/// Why a model file cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read model {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an ONNX model: {why}")]
    NotOnnx { path: String, why: String },
    #[error(
        "{path} has no {META_FEATURE_VERSION} in its metadata: not a Flotilla placement model"
    )]
    NoVersion { path: String },
    #[error("{path} was trained on feature version {found}; this build computes version {FEATURE_VERSION}: retrain it")]
    Version { path: String, found: String },
    #[error("{path}: its features ({found}) are not this build's ({expected})")]
    Features {
        path: String,
        found: String,
        expected: String,
    },
    #[error("{path}: {why}")]
    Shape { path: String, why: String },
    #[error("{path}: tract cannot run it: {why}")]
    Tract { path: String, why: String },
}

/// A model checked and made runnable: share it (it is immutable) between the policies
/// of every vCPU thread.
#[derive(Debug)]
pub struct Model {
    plan: Arc<TypedSimplePlan>,
    /// Which output holds the probabilities, and which column of it is "move the vCPU".
    output: usize,
    column: usize,
    path: String,
}

impl Model {
    /// Reads, checks and prepares the model at `path`.
    pub fn load(path: &Path) -> Result<Model, ModelError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| ModelError::Read {
            path: name.clone(),
            source,
        })?;
        Model::from_bytes(&bytes, &name)
    }

    /// The same from the file's bytes; `path` names it in errors.
    pub fn from_bytes(bytes: &[u8], path: &str) -> Result<Model, ModelError> {
        let path = path.to_string();
        let onnx = tract_onnx::onnx();
        let proto =
            onnx.proto_model_for_read(&mut &bytes[..])
                .map_err(|e| ModelError::NotOnnx {
                    path: path.clone(),
                    why: format!("{e:#}"),
                })?;
        if proto.graph.is_none() {
            return Err(ModelError::NotOnnx {
                path,
                why: "it has no graph".into(),
            });
        }
        let meta = |key: &str| {
            proto
                .metadata_props
                .iter()
                .find(|p| p.key == key)
                .map(|p| p.value.clone())
        };
        let version = meta(META_FEATURE_VERSION)
            .ok_or_else(|| ModelError::NoVersion { path: path.clone() })?;
        if version.trim() != FEATURE_VERSION.to_string() {
            return Err(ModelError::Version {
                path,
                found: version,
            });
        }
        let expected = FEATURE_NAMES.join(",");
        let found = meta(META_FEATURES).unwrap_or_default();
        if found != expected {
            return Err(ModelError::Features {
                path,
                found,
                expected,
            });
        }
        check_input(&proto, &path)?;
        let tract = |e: TractError| ModelError::Tract {
            path: path.clone(),
            why: format!("{e:#}"),
        };
        let model = onnx
            .model_for_proto_model(&proto)
            .and_then(|m| m.with_input_fact(0, f32::fact([1, FEATURE_COUNT]).into()))
            .and_then(|m| m.into_optimized())
            .map_err(tract)?;
        let (output, column) = probabilities(&model).map_err(|why| ModelError::Shape {
            path: path.clone(),
            why,
        })?;
        let plan = model.into_runnable().map_err(tract)?;
        let model = Model {
            plan,
            output,
            column,
            path: path.clone(),
        };
        // One run on zeros: a model that cannot run, or says nothing a probability,
        // fails here rather than at the guest's first fault.
        let p = model
            .predict(&mut model.state().map_err(tract)?, &[0.0; FEATURE_COUNT])
            .map_err(|why| ModelError::Tract {
                path: path.clone(),
                why,
            })?;
        if !(0.0..=1.0).contains(&p) {
            return Err(ModelError::Shape {
                path,
                why: format!("its output on a zero vector is {p}, not a probability"),
            });
        }
        Ok(model)
    }

    /// The file this model came from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Scratch space for [`predict`](Model::predict): one per thread.
    pub fn state(&self) -> TractResult<TypedSimpleState> {
        TypedSimpleState::new(&self.plan)
    }

    /// The probability that moving the vCPU is the better choice, for one feature vector.
    pub fn predict(
        &self,
        state: &mut TypedSimpleState,
        x: &[f32; FEATURE_COUNT],
    ) -> Result<f32, String> {
        let input = Tensor::from_shape(&[1, FEATURE_COUNT], x).map_err(|e| format!("{e:#}"))?;
        let out = state
            .run(tvec!(input.into_tvalue()))
            .map_err(|e| format!("{e:#}"))?;
        let t = out
            .get(self.output)
            .ok_or_else(|| format!("no output {}", self.output))?;
        let view = t.try_as_plain_ram().map_err(|e| format!("{e:#}"))?;
        let v = view.as_slice::<f32>().map_err(|e| format!("{e:#}"))?;
        v.get(self.column)
            .copied()
            .ok_or_else(|| format!("output {} has {} values", self.output, v.len()))
    }
}

/// The graph's one real input (not an initializer) must be `f32 [N or 1, FEATURE_COUNT]`.
fn check_input(proto: &tract_onnx::pb::ModelProto, path: &str) -> Result<(), ModelError> {
    use tract_onnx::pb::tensor_shape_proto::dimension::Value;
    use tract_onnx::pb::type_proto;
    let graph = proto.graph.as_ref().expect("checked by the caller");
    let init: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !init.contains(i.name.as_str()))
        .collect();
    let bad = |why: String| ModelError::Shape {
        path: path.to_string(),
        why,
    };
    let [input] = inputs[..] else {
        return Err(bad(format!(
            "it has {} inputs; a placement model has one, the {FEATURE_COUNT} features",
            inputs.len()
        )));
    };
    let Some(type_proto::Value::TensorType(t)) =
        input.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(bad(format!("its input {} is not a tensor", input.name)));
    };
    if t.elem_type != tract_onnx::pb::tensor_proto::DataType::Float as i32 {
        return Err(bad(format!(
            "its input {} is not f32 (ONNX type {})",
            input.name, t.elem_type
        )));
    }
    let dims: Vec<Option<i64>> = t
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(Value::DimValue(v)) => Some(v),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match dims[..] {
        [None | Some(1), Some(n)] if n == FEATURE_COUNT as i64 => Ok(()),
        _ => Err(bad(format!(
            "its input {} has shape {}; this build gives [N, {FEATURE_COUNT}]",
            input.name,
            shape_text(&dims)
        ))),
    }
}

fn shape_text(dims: &[Option<i64>]) -> String {
    let d: Vec<String> = dims
        .iter()
        .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
        .collect();
    format!("[{}]", d.join(", "))
}

/// The first output that is `f32 [1, 2]` or `f32 [1, 1]`, and the column of "move the vCPU".
fn probabilities(model: &TypedModel) -> Result<(usize, usize), String> {
    let mut seen = Vec::new();
    for i in 0..model.output_outlets().map_err(|e| e.to_string())?.len() {
        let fact = model.output_fact(i).map_err(|e| e.to_string())?;
        let shape: Option<Vec<usize>> = fact.shape.as_concrete().map(|s| s.to_vec());
        if fact.datum_type == f32::datum_type() {
            match shape.as_deref() {
                Some([1, 2]) => return Ok((i, 1)),
                Some([1, 1]) | Some([1]) => return Ok((i, 0)),
                _ => {}
            }
        }
        seen.push(format!("{:?} {:?}", fact.datum_type, shape));
    }
    Err(format!(
        "no output is f32 [N, 2] or [N, 1] probabilities (outputs: {})",
        seen.join(", ")
    ))
}

/// `--policy learned`: asks the model at every decided fault, and moves the vCPU when it
/// gives that better than even odds. No load rule is laid on top: the model sees the
/// loads (`would_pile_up`, `room_on_holder`, the vCPU counts) and its labels priced the
/// CPU contention a move causes, so gathering vCPUs is its call, costed. One per vCPU
/// thread ([`Policy::fork`]), so decisions share no lock.
pub struct Learned {
    model: Arc<Model>,
    state: TypedSimpleState,
    /// Inference errors so far (the fault then moves the page).
    pub errors: u64,
}

impl Learned {
    pub fn new(model: Arc<Model>) -> Result<Learned, ModelError> {
        let state = model.state().map_err(|e| ModelError::Tract {
            path: model.path.clone(),
            why: format!("{e:#}"),
        })?;
        Ok(Learned {
            model,
            state,
            errors: 0,
        })
    }
}

impl Policy for Learned {
    fn name(&self) -> &'static str {
        "learned"
    }

    fn decide(&mut self, f: &FaultContext<'_>) -> Decision {
        match self.model.predict(&mut self.state, &features(f)) {
            Ok(p) if p > 0.5 => Decision::MoveVcpu,
            Ok(_) => Decision::MovePage,
            Err(_) => {
                self.errors += 1;
                Decision::MovePage
            }
        }
    }

    fn fork(&self) -> Option<Box<dyn Policy>> {
        Learned::new(self.model.clone())
            .ok()
            .map(|l| Box::new(l) as Box<dyn Policy>)
    }
}

#[cfg(test)]
mod tests;
