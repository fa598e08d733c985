//! The compress stage: turns a trained SASRec model (a distilled student)
//! into smaller variants that are stored and scored as they are —
//! `int8`/`int4` integers with scales, sparse rows, low-rank factors,
//! fewer feed-forward units — each its own model `<name>@<variant>`.
//!
//! A variant is planned as steps in a fixed order: structured pruning of
//! feed-forward units, low-rank projection of the item table, unstructured
//! magnitude pruning, an optional recovery fine-tune against the teacher's
//! soft labels (pruning masks and the low-rank subspace held fixed after
//! every optimizer step), then encoding: factors, sparse rows, and
//! quantization of every matrix.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use nalgebra::DMatrix;

use crate::baselines::write_trained;
use crate::commit::RunFolder;
use crate::dataset::Dataset;
use crate::distill;
use crate::error::{Error, Result};
use crate::job::{CompressSpec, DistillSpec, Job};
use crate::lake::WrittenObject;
use crate::loss::{LossFamily, LossMix};
use crate::model::sasrec::infer::{CompressionInfo, StoredSasRec};
use crate::model::sasrec::{self, SasRec, SasRecConfig, Weights};
use crate::model::stored::Matrix;
use crate::model::{ModelArtifact, ModelCard};
use crate::soft_labels::SoftLabels;
use crate::train::{self, Distillation, EpochLog, Steps, Trainer};

/// How the low-rank step picks its rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankChoice {
    /// This rank (capped at d_model).
    Fixed(usize),
    /// This fraction of d_model.
    Ratio(f32),
    /// The smallest rank keeping this share of the spectral energy (Σσ²).
    Energy(f32),
}

/// Integer storage of the matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// `int8`, a scale per output row.
    Int8,
    /// `int4`, a scale per group.
    Int4,
}

/// A compression plan: which steps, with what settings.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Variant {
    /// Fraction of feed-forward units removed.
    pub structured: Option<f32>,
    /// Low-rank item table.
    pub lowrank: Option<RankChoice>,
    /// Fraction of matrix weights zeroed (and not stored).
    pub unstructured: Option<f32>,
    /// Integer storage.
    pub quantization: Option<Quantization>,
}

fn fraction(token: &str, what: &str, text: &str) -> Result<f32> {
    let v: f32 = text
        .parse()
        .map_err(|_| Error::config(format!("{token:?}: {what} {text:?} is not a number")))?;
    if !(v > 0.0 && v < 1.0) {
        return Err(Error::config(format!(
            "{token:?}: {what} must be strictly between 0 and 1"
        )));
    }
    Ok(v)
}

impl FromStr for Variant {
    type Err = Error;

    fn from_str(s: &str) -> Result<Variant> {
        let mut v = Variant::default();
        let twice = |token: &str| Error::config(format!("{s:?}: {token} appears twice"));
        for token in s.split('+') {
            if token == "int8" || token == "int4" {
                if v.quantization.is_some() {
                    return Err(twice("a quantization"));
                }
                v.quantization = Some(if token == "int8" {
                    Quantization::Int8
                } else {
                    Quantization::Int4
                });
            } else if let Some(x) = token.strip_prefix("prune-unstructured-") {
                if v.unstructured
                    .replace(fraction(token, "sparsity", x)?)
                    .is_some()
                {
                    return Err(twice("prune-unstructured"));
                }
            } else if let Some(x) = token.strip_prefix("prune-structured-") {
                if v.structured
                    .replace(fraction(token, "fraction", x)?)
                    .is_some()
                {
                    return Err(twice("prune-structured"));
                }
            } else if let Some(x) = token.strip_prefix("lowrank-") {
                let choice = if let Some(e) = x.strip_prefix('e') {
                    let e: f32 = e
                        .parse()
                        .map_err(|_| Error::config(format!("{token:?}: energy is not a number")))?;
                    if !(e > 0.0 && e <= 1.0) {
                        return Err(Error::config(format!(
                            "{token:?}: energy must be in (0, 1]"
                        )));
                    }
                    RankChoice::Energy(e)
                } else if x.contains('.') {
                    RankChoice::Ratio(fraction(token, "rank ratio", x)?)
                } else {
                    let r: usize = x.parse().map_err(|_| {
                        Error::config(format!("{token:?}: rank {x:?} is not a whole number"))
                    })?;
                    if r == 0 {
                        return Err(Error::config(format!("{token:?}: rank must be at least 1")));
                    }
                    RankChoice::Fixed(r)
                };
                if v.lowrank.replace(choice).is_some() {
                    return Err(twice("lowrank"));
                }
            } else {
                return Err(Error::config(format!(
                    "{s:?}: unknown step {token:?} (int8, int4, prune-unstructured-<sparsity>, prune-structured-<fraction>, lowrank-<rank|ratio|e<energy>>)"
                )));
            }
        }
        if v.lowrank.is_some() && v.unstructured.is_some() {
            return Err(Error::config(format!(
                "{s:?}: low-rank factors are stored dense or quantized, not sparse; pick one of lowrank and prune-unstructured"
            )));
        }
        if v.unstructured.is_some() && v.quantization == Some(Quantization::Int4) {
            return Err(Error::config(format!(
                "{s:?}: sparse values are stored as f32 or int8, not int4"
            )));
        }
        Ok(v)
    }
}

impl Variant {
    /// Whether a step changes the weights so that recovery can help.
    pub fn recovers(&self) -> bool {
        self.structured.is_some() || self.lowrank.is_some() || self.unstructured.is_some()
    }

    /// The variant's name, with the rank the low-rank step chose.
    pub fn name(&self, rank: Option<usize>) -> String {
        let mut parts = Vec::new();
        if let Some(f) = self.structured {
            parts.push(format!("prune-structured-{f}"));
        }
        if let Some(choice) = self.lowrank {
            parts.push(match (rank, choice) {
                (Some(r), _) => format!("lowrank-{r}"),
                (None, RankChoice::Fixed(r)) => format!("lowrank-{r}"),
                (None, RankChoice::Ratio(x)) => format!("lowrank-{x}"),
                (None, RankChoice::Energy(e)) => format!("lowrank-e{e}"),
            });
        }
        if let Some(s) = self.unstructured {
            parts.push(format!("prune-unstructured-{s}"));
        }
        match self.quantization {
            Some(Quantization::Int8) => parts.push("int8".into()),
            Some(Quantization::Int4) => parts.push("int4".into()),
            None => {}
        }
        parts.join("+")
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name(None))
    }
}

/// Compressed models and the files written for them.
#[derive(Debug, Clone, Default)]
pub struct Compressed {
    /// One artifact per variant.
    pub models: Vec<ModelArtifact>,
    /// Files written (models, recovery histories).
    pub written: Vec<WrittenObject>,
}

/// The models compressed when `compress.models` is empty: the student
/// distilled with the first loss family, from the teacher or via the
/// assistants.
pub fn default_models(distill: &DistillSpec) -> Vec<String> {
    let route = if distill.direct || distill.assistants.is_empty() {
        "kd-teacher"
    } else {
        "kd-assistant"
    };
    let family = distill
        .losses
        .first()
        .map_or("kl".to_string(), |f| f.replace('+', "-"));
    let suffix: Vec<String> = if distill.seeds.is_empty() {
        vec![String::new()]
    } else {
        distill.seeds.iter().map(|s| format!("-s{s}")).collect()
    };
    suffix
        .iter()
        .map(|s| format!("{}-{route}-{family}{s}", distill.student.name))
        .collect()
}

/// The compress stage: every planned variant of every model named, saved
/// as stored, with its recovery history when it had one.
pub async fn compress_models(
    job: &Job,
    run: &RunFolder,
    dataset: Arc<Dataset>,
    models: &[ModelArtifact],
) -> Result<Compressed> {
    let spec = &job.spec.compress;
    let mut out = Compressed::default();
    if !spec.enabled || !job.spec.distill.enabled {
        return Ok(out);
    }
    let variants: Vec<Variant> = spec
        .variants
        .iter()
        .map(|v| v.parse())
        .collect::<Result<_>>()?;
    let names = if spec.models.is_empty() {
        default_models(&job.spec.distill)
    } else {
        spec.models.clone()
    };
    let labels = if spec.recovery_epochs > 0 && variants.iter().any(Variant::recovers) {
        Some(distill::read_source_labels(&job.spec.distill, run, &dataset).await?)
    } else {
        None
    };
    for name in names {
        let source = models.iter().find(|m| m.card.name == name).ok_or_else(|| {
            let have: Vec<&str> = models.iter().map(|m| m.card.name.as_str()).collect();
            Error::config(format!(
                "compress.models names {name:?}, which this run did not train (models: {})",
                have.join(", ")
            ))
        })?;
        if source.card.kind != sasrec::KIND || source.is_stored() {
            return Err(Error::config(format!(
                "compress.models: {name:?} is not a SASRec model as trained"
            )));
        }
        let dense = fold_content(&SasRec::from_artifact(source)?);
        for variant in &variants {
            let plan = Plan {
                spec: spec.clone(),
                distill: job.spec.distill.clone(),
                seed: job.spec.seed,
                threads: job.spec.threads,
                source_loss: source.card.loss.clone(),
            };
            let (data, labels, dense, variant_in) = (
                Arc::clone(&dataset),
                labels.clone(),
                dense.clone(),
                variant.clone(),
            );
            let label = format!("{name}@{variant}");
            let made = tokio::task::spawn_blocking(move || {
                make_variant(&dense, &variant_in, &plan, &data, labels, &label)
            })
            .await
            .map_err(|e| Error::internal(format!("compressing {name}: {e}")))??;
            let variant_name = variant.name(made.rank);
            let model_name = format!("{name}@{variant_name}");
            let card = ModelCard {
                name: model_name.clone(),
                config: serde_json::to_value(made.model.config)
                    .map_err(|e| Error::internal(e.to_string()))?,
                variant: variant_name.clone(),
                ..source.card.clone()
            };
            let info = CompressionInfo {
                variant: variant_name,
                source: name.clone(),
                source_sha256: source.sha256(),
                recovery_epochs: made.log.as_ref().map_or(0, Vec::len),
                steps: made.steps,
            };
            let artifact = ModelArtifact::from_stored(card, &made.model, Some(&info))?;
            tracing::info!(
                model = %model_name,
                bytes = artifact.bytes.len(),
                source_bytes = source.bytes.len(),
                params = artifact.params,
                steps = %info.steps.join("; "),
                "compressed"
            );
            out.written
                .extend(write_trained(run, &artifact, made.log.as_deref()).await?);
            out.models.push(artifact);
        }
    }
    Ok(out)
}

/// What a variant needs besides its model.
struct Plan {
    spec: CompressSpec,
    distill: DistillSpec,
    seed: u64,
    threads: usize,
    source_loss: Option<String>,
}

/// A made variant.
struct Made {
    model: StoredSasRec,
    rank: Option<usize>,
    steps: Vec<String>,
    log: Option<Vec<EpochLog>>,
}

/// The model with its content projection folded into the id table (the
/// item table it scores with), so compression sees one `n_items × d` table.
pub fn fold_content(model: &SasRec) -> SasRec {
    if model.config.content_dim == 0 {
        return model.clone();
    }
    let config = SasRecConfig {
        content_dim: 0,
        ..model.config
    };
    let mut weights = model.weights.clone();
    weights.item = model.item_table();
    weights.content_w.clear();
    weights.content_b.clear();
    SasRec {
        config,
        weights,
        content: Vec::new(),
    }
}

/// `variant` of `source` without recovery (benchmarks; the stage recovers).
pub fn encode_variant(
    source: &SasRec,
    variant: &Variant,
    spec: &CompressSpec,
) -> Result<StoredSasRec> {
    let plan = Plan {
        spec: CompressSpec {
            recovery_epochs: 0,
            ..spec.clone()
        },
        distill: DistillSpec::default(),
        seed: 0,
        threads: 0,
        source_loss: None,
    };
    let empty = Dataset::from_train_sequences(source.config.n_items, &[]);
    Ok(make_variant(&fold_content(source), variant, &plan, &empty, None, "bench")?.model)
}

fn make_variant(
    source: &SasRec,
    variant: &Variant,
    plan: &Plan,
    dataset: &Dataset,
    labels: Option<Arc<SoftLabels>>,
    label: &str,
) -> Result<Made> {
    let mut model = source.clone();
    let mut steps = Vec::new();
    let d = model.config.d_model;
    if let Some(f) = variant.structured {
        let before = model.config.ffn;
        model = prune_ffn_units(&model, f);
        steps.push(format!(
            "feed-forward units {before} → {} per layer (lowest ‖w1 column‖·‖w2 row‖ removed)",
            model.config.ffn
        ));
    }
    let mut basis = None;
    let mut rank = None;
    if let Some(choice) = variant.lowrank {
        let svd = Svd::of(&model.weights.item, model.config.n_items, d);
        let r = svd.rank_for(choice, d);
        let energy = svd.energy(r);
        let p = svd.projector(r);
        project_rows(&mut model.weights.item, &p, d);
        basis = Some(p);
        rank = Some(r);
        steps.push(format!(
            "item table rank {} → {r}, spectral energy kept {energy:.4}",
            d.min(model.config.n_items)
        ));
    }
    let mut masks = None;
    if let Some(s) = variant.unstructured {
        let m = prune_magnitude(&mut model.weights, s, &plan.spec.prune_scope);
        let (zero, total) = m.iter().flatten().fold((0usize, 0usize), |(z, t), &keep| {
            (z + usize::from(!keep), t + 1)
        });
        steps.push(format!(
            "unstructured magnitude pruning ({} scope): {zero} of {total} matrix weights removed ({:.4})",
            plan.spec.prune_scope,
            zero as f64 / total.max(1) as f64
        ));
        masks = Some(m);
    }
    let mut log = None;
    if variant.recovers()
        && plan.spec.recovery_epochs > 0
        && let Some(labels) = labels
    {
        let student = &plan.distill.student;
        let mut settings = distill::link_settings(student, plan.seed, label);
        settings.epochs = plan.spec.recovery_epochs;
        settings.patience = plan.spec.recovery_patience;
        if plan.spec.recovery_lr > 0.0 {
            settings.lr = plan.spec.recovery_lr;
        }
        let family: LossFamily = plan
            .source_loss
            .as_deref()
            .and_then(|l| l.strip_prefix("ce+"))
            .and_then(|l| l.parse().ok())
            .map_or_else(|| plan.distill.losses[0].parse(), Ok::<LossFamily, Error>)?;
        let mix = LossMix {
            alpha: plan.distill.alpha_of(student),
            temperature: labels.temperature,
            family,
            rank_decay: plan.distill.rank_decay,
        };
        steps.push(format!(
            "recovery: up to {} epochs on {} against {} (α {}, T {})",
            settings.epochs,
            mix.label(),
            labels.model,
            mix.alpha,
            mix.temperature
        ));
        let distillation = Arc::new(Distillation {
            labels: Arc::clone(&labels),
            mix,
        });
        let trainer = Trainer::distilling(&model, dataset, &settings, Arc::clone(&distillation))?;
        let mut constrained = Constrained {
            trainer,
            basis: basis.as_deref(),
            masks: masks.as_deref(),
        };
        let (recovered, epochs) = crate::teacher::thread_pool(plan.threads)?.install(|| {
            train::fit_with(model, dataset, &settings, &mut constrained, Some(&labels))
        })?;
        model = recovered;
        log = Some(epochs);
    }

    // Encode as stored.
    let mut stored = StoredSasRec::from_dense(&model);
    if let Some(r) = rank {
        let (n, table) = (model.config.n_items, &model.weights.item);
        stored.item = Svd::of(table, n, d).factors(r);
    }
    if variant.unstructured.is_some() {
        let int8 = variant.quantization == Some(Quantization::Int8);
        for m in stored.matrices_mut() {
            let (rows, cols) = (m.rows(), m.cols());
            *m = Matrix::sparsify(rows, cols, &m.to_dense(), int8);
        }
    } else if let Some(q) = variant.quantization {
        let group = plan.spec.int4_group;
        for m in stored.matrices_mut() {
            *m = quantize(m, q, group);
        }
    }
    Ok(Made {
        model: stored,
        rank,
        steps,
        log,
    })
}

fn quantize(m: &Matrix, q: Quantization, group: usize) -> Matrix {
    match m {
        Matrix::LowRank { u, v } => Matrix::LowRank {
            u: Box::new(quantize(u, q, group)),
            v: Box::new(quantize(v, q, group)),
        },
        _ => {
            let (rows, cols, data) = (m.rows(), m.cols(), m.to_dense());
            match q {
                Quantization::Int8 => Matrix::quantize_int8(rows, cols, &data),
                Quantization::Int4 => Matrix::quantize_int4(rows, cols, group.min(cols), &data),
            }
        }
    }
}

/// Removes the `fraction` of feed-forward units with the smallest
/// `‖w1[:, u]‖ · ‖w2[u, :]‖` in every layer (the same count per layer, at
/// least one kept): smaller dense `w1`, `b1`, `w2`.
pub fn prune_ffn_units(model: &SasRec, fraction: f32) -> SasRec {
    let c = model.config;
    let (d, f) = (c.d_model, c.ffn);
    let keep = (((1.0 - fraction) * f as f32).round() as usize).clamp(1, f);
    let config = SasRecConfig { ffn: keep, ..c };
    let mut weights = model.weights.clone();
    for layer in &mut weights.layers {
        let norm = |u: usize| {
            let a: f32 = (0..d).map(|k| layer.w1[k * f + u].powi(2)).sum();
            let b: f32 = layer.w2[u * d..(u + 1) * d].iter().map(|v| v * v).sum();
            a.sqrt() * b.sqrt()
        };
        let mut units: Vec<usize> = (0..f).collect();
        units.sort_by(|&a, &b| norm(b).total_cmp(&norm(a)).then(a.cmp(&b)));
        let mut kept = units[..keep].to_vec();
        kept.sort_unstable();
        let mut w1 = Vec::with_capacity(d * keep);
        for k in 0..d {
            w1.extend(kept.iter().map(|&u| layer.w1[k * f + u]));
        }
        let b1 = kept.iter().map(|&u| layer.b1[u]).collect();
        let w2 = kept
            .iter()
            .flat_map(|&u| layer.w2[u * d..(u + 1) * d].iter().copied())
            .collect();
        layer.w1 = w1;
        layer.b1 = b1;
        layer.w2 = w2;
    }
    SasRec {
        config,
        weights,
        content: model.content.clone(),
    }
}

/// The matrices of the dense weights that pruning applies to.
fn matrices_mut(w: &mut Weights) -> Vec<&mut Vec<f32>> {
    let mut out = vec![&mut w.item, &mut w.pos];
    for l in &mut w.layers {
        out.extend([&mut l.wqkv, &mut l.wo, &mut l.w1, &mut l.w2]);
    }
    out
}

/// Zeroes the `sparsity` share of smallest-magnitude weights of each
/// matrix (`layer` scope) or of all matrices together (`global`); returns
/// the kept masks.
pub fn prune_magnitude(w: &mut Weights, sparsity: f32, scope: &str) -> Vec<Vec<bool>> {
    let threshold = |values: &mut Vec<f32>| -> f32 {
        let cut = ((sparsity as f64) * values.len() as f64).round() as usize;
        if cut == 0 {
            return -1.0;
        }
        values.sort_by(f32::total_cmp);
        values[cut.min(values.len()) - 1]
    };
    let mut tensors = matrices_mut(w);
    let global = if scope == "global" {
        let mut all: Vec<f32> = tensors
            .iter()
            .flat_map(|t| t.iter().map(|v| v.abs()))
            .collect();
        Some(threshold(&mut all))
    } else {
        None
    };
    let mut masks = Vec::with_capacity(tensors.len());
    for t in &mut tensors {
        let cut = global.unwrap_or_else(|| threshold(&mut t.iter().map(|v| v.abs()).collect()));
        // Ties at the threshold: keep the count exact by removing in order.
        let mut to_remove = if global.is_some() {
            usize::MAX
        } else {
            ((sparsity as f64) * t.len() as f64).round() as usize
        };
        let mut mask = vec![true; t.len()];
        for (v, keep) in t.iter_mut().zip(mask.iter_mut()) {
            if v.abs() < cut || (v.abs() == cut && to_remove > 0) {
                *v = 0.0;
                *keep = false;
            }
            if !*keep {
                to_remove = to_remove.saturating_sub(1);
            }
        }
        masks.push(mask);
    }
    masks
}

/// `rows ← rows · P` for a row-major matrix with `d` columns.
fn project_rows(table: &mut [f32], p: &[f32], d: usize) {
    let mut tmp = vec![0.0f32; d];
    for row in table.chunks_exact_mut(d) {
        for (j, t) in tmp.iter_mut().enumerate() {
            *t = (0..d).map(|k| row[k] * p[k * d + j]).sum();
        }
        row.copy_from_slice(&tmp);
    }
}

/// Recovery steps: the trainer's step, then the compression constraints
/// put back (pruned weights to zero, the item table onto its subspace).
struct Constrained<'a> {
    trainer: Trainer,
    basis: Option<&'a [f32]>,
    masks: Option<&'a [Vec<bool>]>,
}

impl Steps for Constrained<'_> {
    fn step(
        &mut self,
        model: &mut SasRec,
        inputs: &[u32],
        targets: &[u32],
        soft: &[u32],
        batch: usize,
        step_seed: u64,
    ) -> Result<f64> {
        let loss = self
            .trainer
            .step(model, inputs, targets, soft, batch, step_seed)?;
        if let Some(p) = self.basis {
            project_rows(&mut model.weights.item, p, model.config.d_model);
        }
        if let Some(masks) = self.masks {
            for (t, mask) in matrices_mut(&mut model.weights).into_iter().zip(masks) {
                for (v, &keep) in t.iter_mut().zip(mask) {
                    if !keep {
                        *v = 0.0;
                    }
                }
            }
        }
        Ok(loss)
    }
}

/// A thin SVD `A = U Σ Vᵀ` of a row-major `rows × cols` matrix, singular
/// values in decreasing order.
pub struct Svd {
    rows: usize,
    cols: usize,
    /// Singular values, decreasing.
    pub sigma: Vec<f64>,
    u: DMatrix<f64>,
    v_t: DMatrix<f64>,
}

impl Svd {
    /// The decomposition (in f64).
    pub fn of(a: &[f32], rows: usize, cols: usize) -> Svd {
        let m = DMatrix::from_row_iterator(rows, cols, a.iter().map(|&v| f64::from(v)));
        let svd = m.svd(true, true);
        Svd {
            rows,
            cols,
            sigma: svd.singular_values.iter().copied().collect(),
            u: svd.u.expect("U was asked for"),
            v_t: svd.v_t.expect("Vᵀ was asked for"),
        }
    }

    /// Share of Σσ² held by the first `r` singular values.
    pub fn energy(&self, r: usize) -> f64 {
        let total: f64 = self.sigma.iter().map(|s| s * s).sum();
        if total == 0.0 {
            return 1.0;
        }
        self.sigma.iter().take(r).map(|s| s * s).sum::<f64>() / total
    }

    /// The rank `choice` picks (1 ..= min(rows, cols)).
    pub fn rank_for(&self, choice: RankChoice, d: usize) -> usize {
        let most = self.sigma.len().max(1);
        let r = match choice {
            RankChoice::Fixed(r) => r,
            RankChoice::Ratio(x) => (x * d as f32).round() as usize,
            RankChoice::Energy(e) => (1..=most)
                .find(|&r| self.energy(r) >= f64::from(e) - 1e-12)
                .unwrap_or(most),
        };
        r.clamp(1, most)
    }

    /// `V_r V_rᵀ` (`cols × cols`, row-major): projects rows onto the top-`r`
    /// right singular subspace.
    pub fn projector(&self, r: usize) -> Vec<f32> {
        let c = self.cols;
        let mut p = vec![0.0f32; c * c];
        for i in 0..c {
            for j in 0..c {
                p[i * c + j] = (0..r)
                    .map(|t| self.v_t[(t, i)] * self.v_t[(t, j)])
                    .sum::<f64>() as f32;
            }
        }
        p
    }

    /// The rank-`r` factors as a stored matrix: `U_r Σ_r` (`rows × r`) and
    /// `V_rᵀ` (`r × cols`).
    pub fn factors(&self, r: usize) -> Matrix {
        let mut u = Vec::with_capacity(self.rows * r);
        for i in 0..self.rows {
            u.extend((0..r).map(|t| (self.u[(i, t)] * self.sigma[t]) as f32));
        }
        let mut v = Vec::with_capacity(r * self.cols);
        for t in 0..r {
            v.extend((0..self.cols).map(|j| self.v_t[(t, j)] as f32));
        }
        Matrix::LowRank {
            u: Box::new(Matrix::dense(self.rows, r, u)),
            v: Box::new(Matrix::dense(r, self.cols, v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sasrec::tests_support::random_model;

    #[test]
    fn variants_parse_and_name_themselves() {
        let v: Variant = "prune-structured-0.5+int8".parse().unwrap();
        assert_eq!(v.structured, Some(0.5));
        assert_eq!(v.quantization, Some(Quantization::Int8));
        assert_eq!(v.to_string(), "prune-structured-0.5+int8");
        let v: Variant = "int8+lowrank-0.5".parse().unwrap();
        assert_eq!(v.name(Some(16)), "lowrank-16+int8");
        assert_eq!(
            "lowrank-e0.9".parse::<Variant>().unwrap().lowrank,
            Some(RankChoice::Energy(0.9))
        );
        assert_eq!(
            "lowrank-8".parse::<Variant>().unwrap().lowrank,
            Some(RankChoice::Fixed(8))
        );
        for bad in [
            "int16",
            "int8+int4",
            "prune-unstructured-1.5",
            "prune-structured-0",
            "lowrank-0",
            "lowrank-0.5+prune-unstructured-0.5",
            "prune-unstructured-0.5+int4",
            "int8+int8",
            "",
        ] {
            assert!(bad.parse::<Variant>().is_err(), "{bad}");
        }
    }

    #[test]
    fn svd_reconstruction_error_is_the_discarded_singular_values() {
        let (rows, cols) = (40, 12);
        let a: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let svd = Svd::of(&a, rows, cols);
        assert!(svd.sigma.windows(2).all(|w| w[0] >= w[1]));
        for r in [1, 4, 6, 12] {
            let approx = svd.factors(r).to_dense();
            let err: f64 = a
                .iter()
                .zip(&approx)
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum();
            let discarded: f64 = svd.sigma[r..].iter().map(|s| s * s).sum();
            assert!(
                (err - discarded).abs() <= 1e-4 * discarded.max(1.0),
                "rank {r}: ‖A − A_r‖² {err} vs Σ discarded σ² {discarded}"
            );
            // Projecting onto the top-r subspace is the same approximation.
            let mut projected = a.clone();
            project_rows(&mut projected, &svd.projector(r), cols);
            for (p, q) in projected.iter().zip(&approx) {
                assert!((p - q).abs() < 1e-4);
            }
        }
        assert_eq!(svd.rank_for(RankChoice::Ratio(0.5), cols), 6);
        assert_eq!(svd.rank_for(RankChoice::Fixed(99), cols), 12);
        let r = svd.rank_for(RankChoice::Energy(0.9), cols);
        assert!(svd.energy(r) >= 0.9 && svd.energy(r - 1) < 0.9);
    }

    #[test]
    fn magnitude_pruning_hits_the_sparsity_and_the_file_shrinks() {
        let m = random_model(2, 0);
        for scope in ["layer", "global"] {
            let mut w = m.weights.clone();
            let masks = prune_magnitude(&mut w, 0.6, scope);
            let mut pruned = m.clone();
            pruned.weights = w;
            let total: usize = masks.iter().map(Vec::len).sum();
            let removed: usize = masks.iter().flatten().filter(|k| !**k).count();
            let share = removed as f64 / total as f64;
            assert!((share - 0.6).abs() < 0.01, "{scope}: {share}");
            if scope == "layer" {
                for mask in &masks {
                    let r = mask.iter().filter(|k| !**k).count() as f64 / mask.len() as f64;
                    assert!((r - 0.6).abs() <= 1.0 / mask.len() as f64 + 1e-9, "{r}");
                }
            }
            // The kept weights are the largest ones.
            let kept_min = masks
                .iter()
                .zip(matrices_mut(&mut m.weights.clone()))
                .flat_map(|(mask, t)| {
                    mask.iter()
                        .zip(t.iter())
                        .filter(|(k, _)| **k)
                        .map(|(_, v)| v.abs())
                        .collect::<Vec<_>>()
                })
                .fold(f32::INFINITY, f32::min);
            if scope == "global" {
                let removed_max = masks
                    .iter()
                    .zip(matrices_mut(&mut m.weights.clone()))
                    .flat_map(|(mask, t)| {
                        mask.iter()
                            .zip(t.iter())
                            .filter(|(k, _)| !**k)
                            .map(|(_, v)| v.abs())
                            .collect::<Vec<_>>()
                    })
                    .fold(0.0f32, f32::max);
                assert!(removed_max <= kept_min);
            }
            // Stored sparsely, the matrices take 6 bytes per kept value (+ row offsets).
            let dense = StoredSasRec::from_dense(&m);
            let mut sparse = StoredSasRec::from_dense(&pruned);
            for mat in sparse.matrices_mut() {
                *mat = Matrix::sparsify(mat.rows(), mat.cols(), &mat.to_dense(), false);
            }
            let bytes = |s: &StoredSasRec| -> u64 {
                s.matrices().iter().map(|(_, m)| m.stored_bytes()).sum()
            };
            let kept = (total - removed) as u64;
            let offsets: u64 = sparse
                .matrices()
                .iter()
                .map(|(_, m)| 4 * (m.rows() as u64 + 1))
                .sum();
            assert_eq!(bytes(&sparse), 6 * kept + offsets);
            assert!(bytes(&sparse) < bytes(&dense));
        }
    }

    #[test]
    fn structured_pruning_keeps_the_strongest_units_and_the_function_of_the_rest() {
        let mut m = random_model(1, 0);
        // Silence unit 3 entirely: removing it must not change any score.
        let (d, f) = (m.config.d_model, m.config.ffn);
        m.weights.layers[0].w2[3 * d..4 * d].fill(0.0);
        let pruned = prune_ffn_units(&m, 1.0 / f as f32);
        assert_eq!(pruned.config.ffn, f - 1);
        let histories: Vec<&[u32]> = vec![&[1, 2, 3], &[4], &[5, 6, 7, 8, 9, 10]];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        crate::model::Scorer::score(&m, &histories, &mut a).unwrap();
        crate::model::Scorer::score(&pruned, &histories, &mut b).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
        let half = prune_ffn_units(&m, 0.5);
        assert_eq!(half.config.ffn, f / 2);
        assert_eq!(half.weights.layers[0].w1.len(), d * f / 2);
    }
}
