//! SASRec: a decoder-only transformer over a user's item sequence — item
//! embedding (tied with the output layer, optionally plus a learned
//! projection of item content vectors), learned positions, pre-LN causal
//! self-attention blocks, a final layer norm; an item's score is the last
//! position's hidden state · the item's vector. The same code builds the
//! teacher, the assistant and the student at different sizes.
//!
//! On the CPU the model runs hand-written forward and backward passes over
//! preallocated buffers ([`cpu`], on [`crate::model::kernels`]); [`candle`] is the
//! same model in candle's autograd, trained on GPUs and the oracle the CPU
//! gradients are tested against. [`infer`] scores every SASRec as stored,
//! fp32 or compressed; [`shrink`] makes the compressed variants.

pub mod candle;
pub mod cpu;
pub mod infer;
pub mod shrink;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::config::{LinkSpec, TeacherSpec};
use crate::error::{Error, Result};
use crate::model::{ModelArtifact, ModelCard, Scorer};

/// Model kind in the card.
pub const KIND: &str = "sasrec";

/// Marks an empty slot in an input or target sequence.
pub const PAD: u32 = u32::MAX;

/// Architecture, stored in the artifact's card.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SasRecConfig {
    /// Items (rows of the item table).
    pub n_items: usize,
    /// Width of every hidden state.
    pub d_model: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads (divides `d_model`).
    pub heads: usize,
    /// Width of the feed-forward inner layer.
    pub ffn: usize,
    /// Positions (the most recent items seen).
    pub max_len: usize,
    /// Dropout probability during training.
    pub dropout: f32,
    /// Width of item content vectors; 0 for id embeddings only.
    pub content_dim: usize,
}

impl SasRecConfig {
    /// The teacher `spec` asks for over `n_items` items, fed content
    /// vectors of `content_dim` (0 for none).
    pub fn for_teacher(spec: &TeacherSpec, n_items: usize, content_dim: usize) -> SasRecConfig {
        SasRecConfig {
            n_items,
            d_model: spec.d_model,
            layers: spec.layers,
            heads: spec.heads,
            ffn: spec.ffn,
            max_len: spec.max_len,
            dropout: spec.dropout,
            content_dim,
        }
    }

    /// A distillation chain link over `n_items` items (ids only).
    pub fn for_link(link: &LinkSpec, n_items: usize) -> SasRecConfig {
        SasRecConfig {
            n_items,
            d_model: link.d_model,
            layers: link.layers,
            heads: link.heads,
            ffn: link.ffn,
            max_len: link.max_len,
            dropout: link.dropout,
            content_dim: 0,
        }
    }

    /// Checks the sizes (a file's card is checked the same way).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.n_items == 0
            || self.d_model == 0
            || self.layers == 0
            || self.heads == 0
            || self.ffn == 0
            || self.max_len == 0
        {
            return Err(
                "n_items, d_model, layers, heads, ffn and max_len must be at least 1".into(),
            );
        }
        if !self.d_model.is_multiple_of(self.heads) {
            return Err(format!(
                "d_model {} is not a multiple of heads {}",
                self.d_model, self.heads
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout {} must be in [0, 1)", self.dropout));
        }
        let big = 1 << 24;
        if self.d_model > 8192
            || self.ffn > 65536
            || self.max_len > 4096
            || self.layers > 64
            || self.n_items > big
        {
            return Err("sizes beyond what this job supports (d_model ≤ 8192, ffn ≤ 65536, max_len ≤ 4096, layers ≤ 64)".into());
        }
        Ok(())
    }
}

/// Weights of one transformer block.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// Pre-attention layer norm scale and shift.
    pub ln1_g: Vec<f32>,
    /// See `ln1_g`.
    pub ln1_b: Vec<f32>,
    /// Query, key and value projections side by side (`d × 3d`).
    pub wqkv: Vec<f32>,
    /// Their biases (`3d`).
    pub bqkv: Vec<f32>,
    /// Attention output projection (`d × d`).
    pub wo: Vec<f32>,
    /// Its bias.
    pub bo: Vec<f32>,
    /// Pre-feed-forward layer norm scale and shift.
    pub ln2_g: Vec<f32>,
    /// See `ln2_g`.
    pub ln2_b: Vec<f32>,
    /// Feed-forward in (`d × ffn`).
    pub w1: Vec<f32>,
    /// Its bias.
    pub b1: Vec<f32>,
    /// Feed-forward out (`ffn × d`).
    pub w2: Vec<f32>,
    /// Its bias.
    pub b2: Vec<f32>,
}

/// All weights (and, with the same shapes, gradients and optimizer moments).
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    /// Item id embeddings (`n_items × d`), tied with the output layer.
    pub item: Vec<f32>,
    /// Position embeddings (`max_len × d`).
    pub pos: Vec<f32>,
    /// Blocks.
    pub layers: Vec<LayerWeights>,
    /// Final layer norm.
    pub lnf_g: Vec<f32>,
    /// See `lnf_g`.
    pub lnf_b: Vec<f32>,
    /// Content projection (`content_dim × d`), empty without content.
    pub content_w: Vec<f32>,
    /// Content projection bias (`d`), empty without content.
    pub content_b: Vec<f32>,
}

/// A named tensor of [`Weights`]: name, shape, values.
pub type Named<'a> = (String, Vec<usize>, &'a [f32]);

impl Weights {
    /// Zero-filled weights of `config`'s shapes.
    pub fn zeros(config: &SasRecConfig) -> Weights {
        let (d, f) = (config.d_model, config.ffn);
        let layer = LayerWeights {
            ln1_g: vec![0.0; d],
            ln1_b: vec![0.0; d],
            wqkv: vec![0.0; d * 3 * d],
            bqkv: vec![0.0; 3 * d],
            wo: vec![0.0; d * d],
            bo: vec![0.0; d],
            ln2_g: vec![0.0; d],
            ln2_b: vec![0.0; d],
            w1: vec![0.0; d * f],
            b1: vec![0.0; f],
            w2: vec![0.0; f * d],
            b2: vec![0.0; d],
        };
        Weights {
            item: vec![0.0; config.n_items * d],
            pos: vec![0.0; config.max_len * d],
            layers: vec![layer; config.layers],
            lnf_g: vec![0.0; d],
            lnf_b: vec![0.0; d],
            content_w: vec![0.0; config.content_dim * d],
            content_b: if config.content_dim > 0 {
                vec![0.0; d]
            } else {
                Vec::new()
            },
        }
    }

    /// Initial weights: embeddings and projections N(0, 0.02), layer norms
    /// scale 1 shift 0, biases 0 (initialization matters: see the README).
    pub fn init(config: &SasRecConfig, seed: u64) -> Weights {
        let mut w = Weights::zeros(config);
        let mut rng = StdRng::seed_from_u64(seed);
        let normal = Normal::new(0.0f32, 0.02).expect("valid normal");
        let mut fill = |v: &mut Vec<f32>| v.iter_mut().for_each(|x| *x = normal.sample(&mut rng));
        fill(&mut w.item);
        fill(&mut w.pos);
        for l in &mut w.layers {
            fill(&mut l.wqkv);
            fill(&mut l.wo);
            fill(&mut l.w1);
            fill(&mut l.w2);
            l.ln1_g.fill(1.0);
            l.ln2_g.fill(1.0);
        }
        fill(&mut w.content_w);
        w.lnf_g.fill(1.0);
        w
    }

    /// Every tensor with its name and shape, in a fixed order.
    pub fn named(&self, config: &SasRecConfig) -> Vec<Named<'_>> {
        let (d, f, v, l, c) = (
            config.d_model,
            config.ffn,
            config.n_items,
            config.max_len,
            config.content_dim,
        );
        let mut out: Vec<Named<'_>> = vec![
            ("item".into(), vec![v, d], &self.item),
            ("pos".into(), vec![l, d], &self.pos),
        ];
        for (i, layer) in self.layers.iter().enumerate() {
            let p = |n: &str| format!("layers.{i}.{n}");
            out.push((p("ln1_g"), vec![d], &layer.ln1_g));
            out.push((p("ln1_b"), vec![d], &layer.ln1_b));
            out.push((p("wqkv"), vec![d, 3 * d], &layer.wqkv));
            out.push((p("bqkv"), vec![3 * d], &layer.bqkv));
            out.push((p("wo"), vec![d, d], &layer.wo));
            out.push((p("bo"), vec![d], &layer.bo));
            out.push((p("ln2_g"), vec![d], &layer.ln2_g));
            out.push((p("ln2_b"), vec![d], &layer.ln2_b));
            out.push((p("w1"), vec![d, f], &layer.w1));
            out.push((p("b1"), vec![f], &layer.b1));
            out.push((p("w2"), vec![f, d], &layer.w2));
            out.push((p("b2"), vec![d], &layer.b2));
        }
        out.push(("lnf_g".into(), vec![d], &self.lnf_g));
        out.push(("lnf_b".into(), vec![d], &self.lnf_b));
        if c > 0 {
            out.push(("content_w".into(), vec![c, d], &self.content_w));
            out.push(("content_b".into(), vec![d], &self.content_b));
        }
        out
    }

    /// Every tensor, mutable, in the order of [`Weights::named`].
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let mut out: Vec<&mut Vec<f32>> = vec![&mut self.item, &mut self.pos];
        for layer in &mut self.layers {
            out.extend([
                &mut layer.ln1_g,
                &mut layer.ln1_b,
                &mut layer.wqkv,
                &mut layer.bqkv,
                &mut layer.wo,
                &mut layer.bo,
                &mut layer.ln2_g,
                &mut layer.ln2_b,
                &mut layer.w1,
                &mut layer.b1,
                &mut layer.w2,
                &mut layer.b2,
            ]);
        }
        out.push(&mut self.lnf_g);
        out.push(&mut self.lnf_b);
        if !self.content_b.is_empty() {
            out.push(&mut self.content_w);
            out.push(&mut self.content_b);
        }
        out
    }

    /// Sets every value to zero.
    pub fn zero(&mut self) {
        for t in self.tensors_mut() {
            t.fill(0.0);
        }
    }

    /// Number of parameters.
    pub fn count(&self, config: &SasRecConfig) -> u64 {
        self.named(config)
            .iter()
            .map(|(_, _, v)| v.len() as u64)
            .sum()
    }
}

/// A SASRec model: config, weights and (with content) the items' content
/// vectors it was trained with.
#[derive(Debug, Clone, PartialEq)]
pub struct SasRec {
    /// Sizes.
    pub config: SasRecConfig,
    /// Weights.
    pub weights: Weights,
    /// `n_items × content_dim` content vectors (empty without content).
    pub content: Vec<f32>,
}

impl SasRec {
    /// A freshly initialized model.
    pub fn new(config: SasRecConfig, content: Vec<f32>, seed: u64) -> Result<SasRec> {
        config.validate().map_err(Error::config)?;
        if content.len() != config.n_items * config.content_dim {
            return Err(Error::internal(format!(
                "content has {} values for {} items × {}",
                content.len(),
                config.n_items,
                config.content_dim
            )));
        }
        Ok(SasRec {
            config,
            weights: Weights::init(&config, seed),
            content,
        })
    }

    /// The item vectors used for input and output: id embedding, plus the
    /// projected content vector when there is one (`n_items × d`).
    pub fn item_table(&self) -> Vec<f32> {
        let mut table = self.weights.item.clone();
        cpu::add_content(&self.config, &self.weights, &self.content, &mut table);
        table
    }

    /// Saves it as an artifact named `name` with the given card fields.
    pub fn to_artifact(
        &self,
        name: &str,
        role: &str,
        training: &str,
        loss: &str,
        distilled_from: Option<crate::model::Lineage>,
    ) -> Result<ModelArtifact> {
        self.artifact(self.card(name, role, training, loss, distilled_from)?)
    }

    /// Its card, named `name`, with the given fields.
    pub fn card(
        &self,
        name: &str,
        role: &str,
        training: &str,
        loss: &str,
        distilled_from: Option<crate::model::Lineage>,
    ) -> Result<ModelCard> {
        Ok(ModelCard {
            name: name.to_string(),
            kind: KIND.into(),
            role: role.into(),
            training: training.into(),
            loss: Some(loss.into()),
            n_items: self.config.n_items,
            config: serde_json::to_value(self.config)
                .map_err(|e| Error::internal(e.to_string()))?,
            distilled_from,
            variant: crate::model::FP32.into(),
            warm_started_from: None,
        })
    }

    /// Saves it as an artifact with `card` (from [`SasRec::card`]).
    pub fn artifact(&self, card: ModelCard) -> Result<ModelArtifact> {
        let mut tensors: Vec<(&str, Vec<usize>, &[f32])> = Vec::new();
        let named = self.weights.named(&self.config);
        for (n, shape, data) in &named {
            tensors.push((n.as_str(), shape.clone(), data));
        }
        if self.config.content_dim > 0 {
            tensors.push((
                "content",
                vec![self.config.n_items, self.config.content_dim],
                &self.content,
            ));
        }
        ModelArtifact::from_f32(card, tensors)
    }

    /// Loads it from an artifact, checking every tensor against the card.
    pub fn from_artifact(artifact: &ModelArtifact) -> Result<SasRec> {
        let location = artifact.location.clone();
        let config: SasRecConfig = serde_json::from_value(artifact.card.config.clone())
            .map_err(|e| Error::data(&location, format!("bad sasrec config: {e}")))?;
        config
            .validate()
            .map_err(|e| Error::data(&location, format!("bad sasrec config: {e}")))?;
        if config.n_items != artifact.card.n_items {
            return Err(Error::data(
                &location,
                "card and config disagree on n_items",
            ));
        }
        let mut weights = Weights::zeros(&config);
        let shapes: Vec<(String, Vec<usize>)> = weights
            .named(&config)
            .into_iter()
            .map(|(n, s, _)| (n, s))
            .collect();
        for ((name, shape), slot) in shapes.iter().zip(weights.tensors_mut()) {
            *slot = artifact.tensor_f32(name, shape)?;
        }
        let content = if config.content_dim > 0 {
            artifact.tensor_f32("content", &[config.n_items, config.content_dim])?
        } else {
            Vec::new()
        };
        let expected = shapes.len() + usize::from(config.content_dim > 0);
        if artifact.tensor_count()? != expected {
            return Err(Error::data(
                &location,
                format!(
                    "expected {expected} tensors, found {}",
                    artifact.tensor_count()?
                ),
            ));
        }
        Ok(SasRec {
            config,
            weights,
            content,
        })
    }
}

impl Scorer for SasRec {
    fn n_items(&self) -> usize {
        self.config.n_items
    }

    fn score(&self, histories: &[&[u32]], out: &mut Vec<f32>) -> Result<()> {
        let table = self.item_table();
        cpu::score(self, &table, histories, out);
        Ok(())
    }
}

impl SasRec {
    /// A model of `config` (this run's catalogue) that starts from
    /// `previous` (an earlier run's model of the same name): every tensor
    /// copied, item rows by id through `rows` (see
    /// [`crate::model::warm::carry_items`]), the rows of new items as
    /// [`SasRec::new`] with `seed` draws them. `Err` names the first setting
    /// whose change alters a tensor's shape: the caller trains that model
    /// from scratch instead.
    pub fn warm_started(
        config: SasRecConfig,
        content: Vec<f32>,
        seed: u64,
        previous: &SasRec,
        rows: &[Option<usize>],
    ) -> Result<std::result::Result<SasRec, &'static str>> {
        let (now, then) = (&config, &previous.config);
        let changed = [
            ("d_model", now.d_model == then.d_model),
            ("layers", now.layers == then.layers),
            ("heads", now.heads == then.heads),
            ("ffn", now.ffn == then.ffn),
            ("max_len", now.max_len == then.max_len),
            ("content", now.content_dim == then.content_dim),
        ]
        .into_iter()
        .find_map(|(key, same)| (!same).then_some(key));
        if let Some(key) = changed {
            return Ok(Err(key));
        }
        if rows.len() != config.n_items || rows.iter().flatten().any(|&j| j >= then.n_items) {
            return Err(Error::internal(format!(
                "{} carried rows for {} items, from a catalogue of {}",
                rows.len(),
                config.n_items,
                then.n_items
            )));
        }
        let mut model = SasRec::new(config, content, seed)?;
        let fresh_items = std::mem::take(&mut model.weights.item);
        model.weights = previous.weights.clone();
        model.weights.item = fresh_items;
        crate::model::warm::copy_rows(
            &mut model.weights.item,
            &previous.weights.item,
            config.d_model,
            rows,
        );
        if config.content_dim > 0 {
            // A new item of a content-fed model (teacher-content,
            // teacher-text) starts as the learned projection of its content
            // vector alone, its text or genres placing it among the items
            // like it, instead of as a random draw.
            let d = config.d_model;
            for (i, _) in rows.iter().enumerate().filter(|(_, r)| r.is_none()) {
                model.weights.item[i * d..(i + 1) * d].fill(0.0);
            }
        }
        Ok(Ok(model))
    }
}

/// Models for tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// 13 items, d 8, 2 heads, ffn 16, 5 positions, weights away from the
    /// initialization so every tensor matters.
    pub fn random_model(layers: usize, content_dim: usize) -> SasRec {
        let config = SasRecConfig {
            n_items: 13,
            d_model: 8,
            layers,
            heads: 2,
            ffn: 16,
            max_len: 5,
            dropout: 0.1,
            content_dim,
        };
        let content = (0..13 * content_dim).map(|i| (i % 3) as f32).collect();
        let mut m = SasRec::new(config, content, 11).unwrap();
        let mut rng = StdRng::seed_from_u64(2);
        let normal = Normal::new(0.0f32, 0.3).unwrap();
        for t in m.weights.tensors_mut() {
            t.iter_mut().for_each(|v| *v += normal.sample(&mut rng));
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(content_dim: usize) -> SasRec {
        tests_support::random_model(2, content_dim)
    }

    fn scores(m: &dyn Scorer, histories: &[&[u32]]) -> Vec<f32> {
        let mut out = Vec::new();
        m.score(histories, &mut out).unwrap();
        out
    }

    const HISTORIES: [&[u32]; 3] = [&[3], &[1, 2, 3, 4, 5, 6, 7, 8], &[12, 0]];

    #[test]
    fn a_new_item_of_a_content_model_starts_as_its_projected_content() {
        let previous = model(3);
        // Today: yesterday's 13 items, then two new ones.
        let rows: Vec<Option<usize>> = (0..15).map(|i| (i < 13).then_some(i)).collect();
        let config = SasRecConfig {
            n_items: 15,
            ..previous.config
        };
        let mut content = previous.content.clone();
        content.extend([1.0, 0.0, 2.0, 0.0, 3.0, 1.0]);
        let warm = SasRec::warm_started(config, content.clone(), 5, &previous, &rows)
            .unwrap()
            .unwrap();
        let d = config.d_model;
        let table = warm.item_table();
        for i in [13usize, 14] {
            let c = &content[i * 3..(i + 1) * 3];
            let want: Vec<f32> = (0..d)
                .map(|k| {
                    warm.weights.content_b[k]
                        + (0..3)
                            .map(|j| c[j] * warm.weights.content_w[j * d + k])
                            .sum::<f32>()
                })
                .collect();
            for (g, w) in table[i * d..(i + 1) * d].iter().zip(&want) {
                assert!((g - w).abs() < 1e-5, "new item {i}: {g} vs {w}");
            }
        }
        // The projection is the earlier model's, and kept items keep their rows.
        assert_eq!(warm.weights.content_w, previous.weights.content_w);
        assert_eq!(warm.weights.item[..13 * d], previous.weights.item[..13 * d]);
    }

    #[test]
    fn a_warm_start_carries_every_tensor_and_each_kept_items_row() {
        let previous = model(0);
        // Today's catalogue: 15 items; item 0 is new, item i (1..=13) was
        // yesterday's item 13 - i (reordered), item 14 is new.
        let rows: Vec<Option<usize>> = (0..15)
            .map(|i| (1..=13).contains(&i).then(|| 13 - i))
            .collect();
        let config = SasRecConfig {
            n_items: 15,
            ..previous.config
        };
        let cold = SasRec::new(config, Vec::new(), 5).unwrap();
        let warm = SasRec::warm_started(config, Vec::new(), 5, &previous, &rows)
            .unwrap()
            .unwrap();
        let d = config.d_model;
        let row = |m: &SasRec, i: usize| m.weights.item[i * d..(i + 1) * d].to_vec();
        for (i, carried) in rows.iter().enumerate() {
            match carried {
                Some(j) => assert_eq!(row(&warm, i), row(&previous, *j), "item {i}"),
                None => assert_eq!(row(&warm, i), row(&cold, i), "new item {i} starts cold"),
            }
        }
        assert_eq!(warm.weights.pos, previous.weights.pos);
        assert_eq!(warm.weights.layers, previous.weights.layers);
        assert_eq!(warm.weights.lnf_g, previous.weights.lnf_g);
        // A shape change names its key; the caller starts cold.
        for (key, changed) in [
            (
                "d_model",
                SasRecConfig {
                    d_model: 16,
                    ..config
                },
            ),
            (
                "layers",
                SasRecConfig {
                    layers: 3,
                    ..config
                },
            ),
            (
                "max_len",
                SasRecConfig {
                    max_len: 9,
                    ..config
                },
            ),
            ("ffn", SasRecConfig { ffn: 32, ..config }),
        ] {
            let outcome = SasRec::warm_started(changed, Vec::new(), 5, &previous, &rows).unwrap();
            assert_eq!(outcome.err(), Some(key));
        }
        // Rows that point past the earlier catalogue are a bug, not data.
        let bad = vec![Some(13); 15];
        assert!(SasRec::warm_started(config, Vec::new(), 5, &previous, &bad).is_err());
    }

    #[test]
    fn saved_and_loaded_models_score_identically() {
        for content_dim in [0, 4] {
            let m = model(content_dim);
            let artifact = m
                .to_artifact("teacher", "teacher", "supervised", "ce", None)
                .unwrap();
            let parsed = ModelArtifact::parse("test", artifact.bytes.clone()).unwrap();
            assert_eq!(
                parsed.params,
                m.weights.count(&m.config) + (13 * content_dim) as u64
            );
            let loaded = SasRec::from_artifact(&parsed).unwrap();
            assert_eq!(loaded, m);
            let scorer = parsed.scorer(13).unwrap();
            // The artifact scores through the stored engine: the same up to rounding.
            let (got, want) = (scores(scorer.as_ref(), &HISTORIES), scores(&m, &HISTORIES));
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4 * w.abs().max(1.0), "{g} vs {w}");
            }
        }
    }

    #[test]
    fn padding_positions_are_never_computed_and_change_nothing() {
        let m = model(0);
        let len = m.config.max_len;
        // An empty window, a short one, one cut to the last `len` items.
        let histories: [&[u32]; 3] = [&[], &[3, 7], &[1, 2, 3, 4, 5, 6, 7, 8]];
        let mut inputs = vec![PAD; histories.len() * len];
        for (slot, h) in inputs.chunks_mut(len).zip(histories) {
            cpu::window_into(h, slot);
        }
        let mut ws = cpu::Workspace::new(&m.config, histories.len());
        cpu::forward(&m, &m.weights.item, &mut ws, &inputs, histories.len(), None);
        // One row per item, plus the empty window's last position.
        let items = inputs.iter().filter(|&&x| x != PAD).count();
        assert_eq!(ws.rows(), items + 1);
        for (p, &x) in inputs.iter().enumerate() {
            let last = p % len == len - 1;
            assert_eq!(ws.hidden(p).is_some(), x != PAD || last, "position {p}");
        }
        for (b, h) in histories.iter().enumerate() {
            assert_eq!(ws.hidden(b * len + len - 1), Some(ws.last_hidden(b)));
            // A window's last state does not depend on the others in the batch.
            let mut alone = cpu::Workspace::new(&m.config, 1);
            cpu::forward(
                &m,
                &m.weights.item,
                &mut alone,
                &inputs[b * len..(b + 1) * len],
                1,
                None,
            );
            assert_eq!(alone.last_hidden(0), ws.last_hidden(b), "history {h:?}");
        }
        // Against the stored engine, which runs whole windows, padding included.
        let artifact = m
            .to_artifact("teacher", "teacher", "supervised", "ce", None)
            .unwrap();
        let parsed = ModelArtifact::parse("test", artifact.bytes).unwrap();
        let scorer = parsed.scorer(13).unwrap();
        let (got, want) = (scores(&m, &histories), scores(scorer.as_ref(), &histories));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4 * w.abs().max(1.0), "{g} vs {w}");
        }
    }

    #[test]
    fn scoring_in_chunks_equals_scoring_one_by_one() {
        let m = model(0);
        let histories: Vec<Vec<u32>> = (0..150)
            .map(|u| (0..u % 7 + 1).map(|t| ((u + t) % 13) as u32).collect())
            .collect();
        let refs: Vec<&[u32]> = histories.iter().map(|h| h.as_slice()).collect();
        let all = scores(&m, &refs);
        for (u, h) in refs.iter().enumerate() {
            let alone = scores(&m, &[h]);
            for (a, b) in all[u * 13..(u + 1) * 13].iter().zip(&alone) {
                assert!((a - b).abs() < 1e-5, "history {u}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn cpu_scores_match_the_candle_model() {
        use candle_core::Device;
        for content_dim in [0, 4] {
            let m = model(content_dim);
            let got = scores(&m, &HISTORIES);
            let candle = candle::CandleSasRec::from_model(&m, &Device::Cpu).unwrap();
            let mut inputs = vec![PAD; HISTORIES.len() * 5];
            for (slot, h) in inputs.chunks_mut(5).zip(HISTORIES) {
                cpu::window_into(h, slot);
            }
            let want = candle
                .score_last(&inputs, HISTORIES.len())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4 * w.abs().max(1.0), "{g} vs {w}");
            }
        }
    }

    #[test]
    fn a_file_that_does_not_match_its_config_is_refused() {
        let m = model(0);
        let artifact = m
            .to_artifact("teacher", "teacher", "supervised", "ce", None)
            .unwrap();
        // The card claims a wider model than the tensors hold.
        let mut card = artifact.card.clone();
        card.config["d_model"] = serde_json::json!(16);
        let named = m.weights.named(&m.config);
        let tensors = named
            .iter()
            .map(|(n, s, v)| (n.as_str(), s.clone(), *v))
            .collect();
        let forged = ModelArtifact::from_f32(card, tensors).unwrap();
        let forged =
            ModelArtifact::parse("models/teacher/model.safetensors", forged.bytes).unwrap();
        let err = SasRec::from_artifact(&forged).unwrap_err();
        assert_eq!(err.exit_code(), crate::error::exit_code::DATA);
        assert!(
            err.to_string().contains("models/teacher/model.safetensors"),
            "{err}"
        );
        assert!(err.to_string().contains("item"), "{err}");

        // An impossible config (heads do not divide d_model).
        let mut card = artifact.card.clone();
        card.config["heads"] = serde_json::json!(3);
        let tensors = named
            .iter()
            .map(|(n, s, v)| (n.as_str(), s.clone(), *v))
            .collect();
        let forged = ModelArtifact::from_f32(card, tensors).unwrap();
        let err = SasRec::from_artifact(&forged).unwrap_err();
        assert_eq!(err.exit_code(), crate::error::exit_code::DATA);

        // A model trained for another catalogue.
        assert!(artifact.scorer(14).is_err());
    }
}
