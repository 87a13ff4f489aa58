//! Training placement models with linfa on oracle-labelled faults
//! (`flotilla dataset build`), cost-sensitively: what a wrong answer costs is the
//! difference between the two choices' look-ahead costs, so each example weighs that much.
//!
//! - [`logistic`]: linfa-logistic (L-BFGS). It takes no sample weights, so the training
//!   set is drawn from the examples with probability proportional to their weight (seeded);
//!   features are standardised for the fit and the scaling folded back into `w` and `b`, so
//!   the model reads raw features.
//! - [`forest`]: bagged linfa-trees decision trees (Gini, weighted by cost). Each leaf's
//!   probability is the share of training weight reaching it (by the exported `<=`
//!   thresholds, in `f32` as the model will see them) whose better choice was the vCPU
//!   move; the ensemble averages the trees.
//!
//! [`evaluate`] replays the decisions of any rule over examples and says what they would
//! have cost against the oracle.

use crate::onnx::TreeNode;
use flotilla_placement::features::FEATURE_COUNT;
use linfa::prelude::*;
use ndarray::{Array1, Array2};

/// Labelled faults: features and what each choice cost by look-ahead.
#[derive(Debug, Clone, Default)]
pub struct Examples {
    pub x: Vec<[f32; FEATURE_COUNT]>,
    /// Look-ahead cost of bringing the page, ns.
    pub cost_page: Vec<f64>,
    /// Look-ahead cost of moving the vCPU, ns.
    pub cost_vcpu: Vec<f64>,
    /// Which group (workload) each example comes from: an index into `groups`.
    pub group: Vec<u32>,
    pub groups: Vec<String>,
}

impl Examples {
    pub fn len(&self) -> usize {
        self.x.len()
    }

    pub fn is_empty(&self) -> bool {
        self.x.is_empty()
    }

    /// True when moving the vCPU was strictly cheaper.
    pub fn vcpu_better(&self, i: usize) -> bool {
        self.cost_vcpu[i] < self.cost_page[i]
    }

    /// What choosing wrong costs at example `i`, ns.
    pub fn weight(&self, i: usize) -> f64 {
        (self.cost_page[i] - self.cost_vcpu[i]).abs()
    }

    /// Indices of the examples in (`keep` true) or out of group `name`.
    pub fn select(&self, name: Option<&str>, keep: bool) -> Vec<usize> {
        let g = name.and_then(|n| self.groups.iter().position(|x| x == n));
        (0..self.len())
            .filter(|&i| match g {
                None => !keep,
                Some(g) => (self.group[i] as usize == g) == keep,
            })
            .collect()
    }

    /// Appends one example.
    pub fn push(&mut self, x: [f32; FEATURE_COUNT], cost_page: f64, cost_vcpu: f64, group: &str) {
        let g = match self.groups.iter().position(|n| n == group) {
            Some(g) => g,
            None => {
                self.groups.push(group.to_string());
                self.groups.len() - 1
            }
        };
        self.x.push(x);
        self.cost_page.push(cost_page);
        self.cost_vcpu.push(cost_vcpu);
        self.group.push(g as u32);
    }
}

/// Why a model could not be trained.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("no training examples with a cost difference (every fault was a tie)")]
    NoSignal,
    #[error("every training example has the same better choice ({0}): nothing to learn")]
    OneClass(&'static str),
    #[error("linfa: {0}")]
    Linfa(String),
}

/// SplitMix64: a small seeded generator, so training is reproducible.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `m` draws (with replacement) from `idx`, each with probability proportional to its
/// weight.
fn weighted_draw(ex: &Examples, idx: &[usize], m: usize, rng: &mut Rng) -> Vec<usize> {
    let mut cum = Vec::with_capacity(idx.len());
    let mut total = 0.0;
    for &i in idx {
        total += ex.weight(i);
        cum.push(total);
    }
    (0..m)
        .map(|_| {
            let r = rng.unit() * total;
            let k = cum.partition_point(|&c| c <= r).min(idx.len() - 1);
            idx[k]
        })
        .collect()
}

/// The examples of `idx` that carry signal (a cost difference), or why there are none.
fn informative(ex: &Examples, idx: &[usize]) -> Result<Vec<usize>, TrainError> {
    let keep: Vec<usize> = idx
        .iter()
        .copied()
        .filter(|&i| ex.weight(i) > 0.0)
        .collect();
    if keep.is_empty() {
        return Err(TrainError::NoSignal);
    }
    let vcpu = keep.iter().filter(|&&i| ex.vcpu_better(i)).count();
    if vcpu == 0 {
        return Err(TrainError::OneClass("move the page"));
    }
    if vcpu == keep.len() {
        return Err(TrainError::OneClass("move the vCPU"));
    }
    Ok(keep)
}

/// Options of [`logistic`].
#[derive(Debug, Clone)]
pub struct LogisticOptions {
    /// Examples drawn (by weight) for the fit.
    pub draws: usize,
    /// L2 penalty.
    pub alpha: f64,
    pub max_iterations: u64,
    pub seed: u64,
}

impl Default for LogisticOptions {
    fn default() -> Self {
        LogisticOptions {
            draws: 200_000,
            alpha: 1e-3,
            max_iterations: 200,
            seed: 1,
        }
    }
}

/// A logistic model of raw features: `p_vcpu = sigmoid(w · x + b)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    pub w: [f32; FEATURE_COUNT],
    pub b: f32,
}

impl Linear {
    pub fn p_vcpu(&self, x: &[f32; FEATURE_COUNT]) -> f64 {
        let z: f64 = self.b as f64
            + self
                .w
                .iter()
                .zip(x)
                .map(|(w, x)| *w as f64 * *x as f64)
                .sum::<f64>();
        1.0 / (1.0 + (-z).exp())
    }
}

/// Fits a logistic model on the examples `idx`, cost-sensitively (see the module doc).
pub fn logistic(ex: &Examples, idx: &[usize], o: &LogisticOptions) -> Result<Linear, TrainError> {
    let keep = informative(ex, idx)?;
    let mut rng = Rng(o.seed);
    let rows = weighted_draw(ex, &keep, o.draws.max(2), &mut rng);
    // Standardise on the drawn set; a constant feature gets scale 1.
    let n = rows.len() as f64;
    let mut mean = [0f64; FEATURE_COUNT];
    let mut sd = [0f64; FEATURE_COUNT];
    for &i in &rows {
        for (m, v) in mean.iter_mut().zip(&ex.x[i]) {
            *m += *v as f64 / n;
        }
    }
    for &i in &rows {
        for ((s, v), m) in sd.iter_mut().zip(&ex.x[i]).zip(&mean) {
            *s += (*v as f64 - m).powi(2) / n;
        }
    }
    for s in &mut sd {
        *s = if *s > 1e-12 { s.sqrt() } else { 1.0 };
    }
    let x = Array2::from_shape_fn((rows.len(), FEATURE_COUNT), |(r, j)| {
        (ex.x[rows[r]][j] as f64 - mean[j]) / sd[j]
    });
    let y: Array1<bool> = rows.iter().map(|&i| ex.vcpu_better(i)).collect();
    // Both classes must be among the draws for the fit.
    if y.iter().all(|&v| v) || y.iter().all(|&v| !v) {
        return Err(TrainError::OneClass(if y[0] {
            "move the vCPU"
        } else {
            "move the page"
        }));
    }
    let fitted = linfa_logistic::LogisticRegression::default()
        .alpha(o.alpha)
        .max_iterations(o.max_iterations)
        .fit(&Dataset::new(x, y))
        .map_err(|e| TrainError::Linfa(e.to_string()))?;
    // predict_probabilities is the probability of the positive class.
    let sign = if fitted.labels().pos.class { 1.0 } else { -1.0 };
    let params = fitted.params();
    let mut w = [0f32; FEATURE_COUNT];
    let mut b = fitted.intercept();
    for j in 0..FEATURE_COUNT {
        w[j] = (sign * params[j] / sd[j]) as f32;
        b -= params[j] * mean[j] / sd[j];
    }
    Ok(Linear {
        w,
        b: (sign * b) as f32,
    })
}

/// Options of [`forest`].
#[derive(Debug, Clone)]
pub struct ForestOptions {
    pub trees: usize,
    pub max_depth: usize,
    /// A leaf holds at least this share of the training weight.
    pub min_leaf_share: f64,
    /// Examples drawn (uniformly, with replacement) for each tree.
    pub draws: usize,
    pub seed: u64,
}

impl Default for ForestOptions {
    fn default() -> Self {
        ForestOptions {
            trees: 4,
            max_depth: 6,
            min_leaf_share: 0.002,
            draws: 100_000,
            seed: 1,
        }
    }
}

/// Fits `o.trees` cost-weighted trees on bootstrap draws of `idx`; `progress` is told
/// after each tree.
pub fn forest(
    ex: &Examples,
    idx: &[usize],
    o: &ForestOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<TreeNode>>, TrainError> {
    let keep = informative(ex, idx)?;
    let mut rng = Rng(o.seed);
    let mut out = Vec::with_capacity(o.trees);
    for t in 0..o.trees.max(1) {
        let rows: Vec<usize> = (0..o.draws.max(2))
            .map(|_| keep[(rng.next_u64() % keep.len() as u64) as usize])
            .collect();
        // Weights normalised to a mean of 1, so the leaf minimum is a share of the total.
        let total: f64 = rows.iter().map(|&i| ex.weight(i)).sum();
        let scale = rows.len() as f64 / total;
        let x = Array2::from_shape_fn((rows.len(), FEATURE_COUNT), |(r, j)| {
            ex.x[rows[r]][j] as f64
        });
        let y: Array1<bool> = rows.iter().map(|&i| ex.vcpu_better(i)).collect();
        let w: Array1<f32> = rows
            .iter()
            .map(|&i| (ex.weight(i) * scale) as f32)
            .collect();
        let data = Dataset::new(x, y).with_weights(w);
        let tree = linfa_trees::DecisionTree::params()
            .max_depth(Some(o.max_depth))
            .min_weight_leaf((o.min_leaf_share * rows.len() as f64) as f32)
            .min_weight_split(2.0)
            .fit(&data)
            .map_err(|e| TrainError::Linfa(e.to_string()))?;
        let mut nodes = flatten(tree.root_node());
        leaf_shares(&mut nodes, ex, &rows);
        out.push(nodes);
        progress(t + 1);
    }
    Ok(out)
}

/// linfa's tree as a flat list, root first; leaves get their shares from [`leaf_shares`].
fn flatten(root: &linfa_trees::TreeNode<f64, bool>) -> Vec<TreeNode> {
    let mut nodes = Vec::new();
    let mut stack = vec![(root, usize::MAX, false)];
    while let Some((n, parent, is_no)) = stack.pop() {
        let me = nodes.len();
        if let Some(TreeNode::Branch { yes, no, .. }) = nodes.get_mut(parent) {
            if is_no {
                *no = me;
            } else {
                *yes = me;
            }
        }
        let children: Vec<_> = n.children().into_iter().flatten().collect();
        if n.is_leaf() || children.len() != 2 {
            nodes.push(TreeNode::Leaf {
                p_vcpu: if n.prediction().unwrap_or(false) {
                    1.0
                } else {
                    0.0
                },
            });
            continue;
        }
        let (feature, threshold, _) = n.split();
        nodes.push(TreeNode::Branch {
            feature,
            threshold: threshold as f32,
            yes: 0,
            no: 0,
        });
        stack.push((children[1], me, true));
        stack.push((children[0], me, false));
    }
    nodes
}

/// The leaf `x` falls in, by the `f32` thresholds (as the exported model decides).
pub fn leaf_of(nodes: &[TreeNode], x: &[f32; FEATURE_COUNT]) -> usize {
    let mut i = 0;
    while let TreeNode::Branch {
        feature,
        threshold,
        yes,
        no,
    } = nodes[i]
    {
        i = if x[feature] <= threshold { yes } else { no };
    }
    i
}

/// Sets every leaf's probability to the share of `rows`' weight reaching it whose better
/// choice was moving the vCPU (a leaf no row reaches keeps linfa's class).
fn leaf_shares(nodes: &mut [TreeNode], ex: &Examples, rows: &[usize]) {
    let mut sums = vec![(0f64, 0f64); nodes.len()];
    for &i in rows {
        let leaf = leaf_of(nodes, &ex.x[i]);
        let w = ex.weight(i);
        sums[leaf].0 += w;
        if ex.vcpu_better(i) {
            sums[leaf].1 += w;
        }
    }
    for (n, (total, vcpu)) in nodes.iter_mut().zip(sums) {
        if let TreeNode::Leaf { p_vcpu } = n {
            if total > 0.0 {
                *p_vcpu = (vcpu / total) as f32;
            }
        }
    }
}

/// The ensemble's probability of moving the vCPU, as the exported model computes it.
pub fn forest_p_vcpu(trees: &[Vec<TreeNode>], x: &[f32; FEATURE_COUNT]) -> f64 {
    let sum: f64 = trees
        .iter()
        .map(|t| match t[leaf_of(t, x)] {
            TreeNode::Leaf { p_vcpu } => p_vcpu as f64,
            TreeNode::Branch { .. } => 0.0,
        })
        .sum();
    sum / trees.len().max(1) as f64
}

/// What a rule's decisions would have cost on a set of examples, against the oracle's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    pub examples: usize,
    /// Share of the examples with a cost difference where the rule chose the cheaper.
    pub accuracy: f64,
    /// Summed look-ahead cost of the rule's choices, of the oracle's, of always moving
    /// the page, and of always moving the vCPU, ns.
    pub rule_ns: f64,
    pub oracle_ns: f64,
    pub page_ns: f64,
    pub vcpu_ns: f64,
    /// Share of examples where the rule moved the vCPU.
    pub vcpu_share: f64,
}

impl Evaluation {
    /// How much of always-page's excess over the oracle the rule removes (1 is the oracle,
    /// 0 is no better than always moving the page).
    pub fn gap_closed(&self) -> f64 {
        let gap = self.page_ns - self.oracle_ns;
        if gap <= 0.0 {
            return 0.0;
        }
        (self.page_ns - self.rule_ns) / gap
    }
}

/// Evaluates `move_vcpu` (true: move the vCPU) on the examples `idx`.
pub fn evaluate(
    ex: &Examples,
    idx: &[usize],
    mut move_vcpu: impl FnMut(&[f32; FEATURE_COUNT]) -> bool,
) -> Evaluation {
    let mut e = Evaluation {
        examples: idx.len(),
        ..Default::default()
    };
    let (mut right, mut decided, mut vcpu) = (0usize, 0usize, 0usize);
    for &i in idx {
        let (p, v) = (ex.cost_page[i], ex.cost_vcpu[i]);
        let choose_vcpu = move_vcpu(&ex.x[i]);
        vcpu += usize::from(choose_vcpu);
        e.rule_ns += if choose_vcpu { v } else { p };
        e.oracle_ns += p.min(v);
        e.page_ns += p;
        e.vcpu_ns += v;
        if p != v {
            decided += 1;
            right += usize::from(choose_vcpu == (v < p));
        }
    }
    e.accuracy = right as f64 / decided.max(1) as f64;
    e.vcpu_share = vcpu as f64 / idx.len().max(1) as f64;
    e
}
