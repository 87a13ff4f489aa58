//! Placement policies by name, the learned one included: what `--policy` and `--model`
//! select in `run`, `node`, `replay`, `ab` and the benches.

use anyhow::{anyhow, bail, Result};
use flotilla_learned::{Learned, Model};
use flotilla_placement::{NodeId, Policy, LEARNED};
use std::path::Path;
use std::sync::Arc;

/// A checked `--policy` (and `--model`): builds one policy per node.
#[derive(Clone)]
pub struct Choice {
    pub name: String,
    seed: u64,
    model: Option<Arc<Model>>,
    /// Hex SHA-256 of the model file ("" without one).
    pub digest: String,
}

impl Choice {
    /// Checks `name` (a built-in policy, or `learned` with a `model`), loading and
    /// checking the model once. A model without `learned` is an error, not ignored.
    pub fn new(name: &str, seed: u64, model: Option<&Path>) -> Result<Choice> {
        let (model, digest) = match (name == LEARNED, model) {
            (true, Some(path)) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| anyhow!("--model {}: cannot read it: {e}", path.display()))?;
                let m = Model::from_bytes(&bytes, &path.display().to_string())
                    .map_err(|e| anyhow!("--model: {e}"))?;
                let digest = flotilla_transport::auth::digest(&bytes)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                (Some(Arc::new(m)), digest)
            }
            (true, None) => bail!("--policy learned serves a trained model: give --model FILE"),
            (false, Some(path)) => bail!(
                "--model {} is only for --policy learned (the policy is {name})",
                path.display()
            ),
            (false, None) => {
                flotilla_placement::by_name(name, seed, 0).map_err(|e| anyhow!("--policy: {e}"))?;
                (None, String::new())
            }
        };
        Ok(Choice {
            name: name.to_string(),
            seed,
            model,
            digest,
        })
    }

    /// The same policy seeded with `seed` (a trace's own), its model shared, not reloaded.
    pub fn with_seed(&self, seed: u64) -> Choice {
        Choice {
            seed,
            ..self.clone()
        }
    }

    /// Node `node`'s instance.
    pub fn make(&self, node: NodeId) -> Box<dyn Policy> {
        match &self.model {
            Some(m) => Box::new(Learned::new(m.clone()).expect("its state was made at load")),
            None => flotilla_placement::by_name(&self.name, self.seed, node)
                .expect("checked in Choice::new"),
        }
    }
}

/// The continuation of look-aheads (`--continuation`): a stateless policy deciding the
/// faults after the one being priced; `always-page` is the simulator's fixed continuation.
pub struct Continuation {
    choice: Option<Choice>,
}

impl Continuation {
    /// `name` (with the model of `learned`), checked to keep no state of its own.
    pub fn new(name: &str, seed: u64, model: Option<&Path>) -> Result<Continuation> {
        if name == "always-page" {
            return Ok(Continuation { choice: None });
        }
        let model = (name == LEARNED).then_some(model).flatten();
        let c = Choice::new(name, seed, model).map_err(|e| anyhow!("--continuation: {e:#}"))?;
        if c.make(0).fork().is_none() {
            bail!(
                "--continuation {name}: it keeps state of its own, which a look-ahead cannot rewind; use always-page, always-vcpu, heuristic or learned"
            );
        }
        Ok(Continuation { choice: Some(c) })
    }

    /// The simulator's look-ahead of `horizon` touches with this continuation.
    pub fn look_ahead(&self, horizon: usize) -> flotilla_sim::LookAhead<'_> {
        flotilla_sim::LookAhead {
            horizon,
            continuation: self
                .choice
                .as_ref()
                .map(|c| Box::new(move |n| c.make(n)) as flotilla_sim::MakePolicy<'_>),
        }
    }
}
