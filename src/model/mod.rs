//! Models: how each one scores, and the safetensors artifact every trained
//! model is saved as (its card — name, kind, role, config — in the metadata).
//! Scoring and storage only: how a model learns is [`crate::train`], which
//! this module never imports.
//!
//! [`kernels`] are the numeric kernels (matrix products, layer norm,
//! attention, softmax cross-entropy) the SASRec passes, the stored
//! matrices and the CPU trainer run on; [`score`] ranks the catalogue with any [`Scorer`] (top-K, target ranks,
//! HR/NDCG/MRR, latency); [`stored`] holds weight matrices as stored
//! (f32, int8, int4, sparse, low-rank) and their products.

pub mod kernels;
pub mod meanpool;
pub mod neighbors;
pub mod popularity;
pub mod sasrec;
pub mod score;
pub mod stored;
pub mod text;
pub mod warm;

use std::collections::HashMap;
use std::ops::Range;

use bytes::Bytes;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Metadata key holding the model card.
pub const CARD_KEY: &str = "recdistill.model";

/// Scores every item for a batch of users, each given by their history
/// (time-ordered item indices).
pub trait Scorer: Send + Sync {
    /// Items scored (the catalogue size).
    fn n_items(&self) -> usize;

    /// Writes `histories.len() × n_items` scores, row-major, into `out`.
    fn score(&self, histories: &[&[u32]], out: &mut Vec<f32>) -> Result<()>;

    /// Bytes of scores a ranking task asks for in one call: small enough
    /// that they are still in cache when ranked, large enough that the
    /// product's fixed cost per call (an `f32` gemm packs the item table
    /// each call) is spread over enough users.
    fn slice_bytes(&self) -> usize {
        SLICE_BYTES_PACKED
    }

    /// The scores of `histories`' users, to be computed a block of items at
    /// a time, where this scorer computes them that way (a product that
    /// reads the item table as stored): a ranking then takes each block
    /// while it is in cache, and `users × items` scores never exist at
    /// once. `None` where the scorer only scores whole rows
    /// ([`Scorer::score`]).
    fn item_blocks(&self, histories: &[&[u32]]) -> Result<Option<Box<dyn ItemBlocks + '_>>> {
        let _ = histories;
        Ok(None)
    }
}

/// Some users' scores, computed for any range of items
/// ([`Scorer::item_blocks`]).
pub trait ItemBlocks {
    /// Users: every block has a row for each.
    fn users(&self) -> usize;

    /// A range of items starts at a multiple of this.
    fn granule(&self) -> usize;

    /// Writes the scores of `users` for `items` (starting at a multiple of
    /// [`ItemBlocks::granule`]) into `out`, `items.len()` per user,
    /// row-major: each the same bits as [`Scorer::score`] gives it.
    fn scores(&self, users: Range<usize>, items: Range<usize>, out: &mut [f32]);
}

/// [`Scorer::slice_bytes`] for a product that packs the item table per call.
pub const SLICE_BYTES_PACKED: usize = 32 << 20;
/// [`Scorer::slice_bytes`] for a product that reads the item table as stored.
pub const SLICE_BYTES_STREAMED: usize = 8 << 20;
/// Users a ranking task takes together from a scorer with
/// [`Scorer::item_blocks`]: they share each pass over the item table, and
/// their scores exist one block of items at a time.
pub const SLICE_USERS_IN_BLOCKS: usize = 64;

/// What a model is and how it was made: stored in its artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// Model name (e.g. `popularity`), also its recommendations file name.
    pub name: String,
    /// Architecture: `popularity` or `meanpool`.
    pub kind: String,
    /// `baseline`, `teacher`, `assistant` or `student`.
    pub role: String,
    /// `supervised`, `scratch`, `kd-teacher` or `kd-assistant`.
    pub training: String,
    /// Loss family, `None` for models not trained by a loss.
    pub loss: Option<String>,
    /// Catalogue size it was trained for.
    pub n_items: usize,
    /// Architecture settings (JSON object, kind-specific).
    pub config: serde_json::Value,
    /// For a distilled model: the soft labels it learned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distilled_from: Option<Lineage>,
    /// `fp32`, or the compression applied (`int8`, `lowrank-16+int8`, …).
    #[serde(default = "fp32")]
    pub variant: String,
    /// For a warm-started model: the earlier run's model it began from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_started_from: Option<warm::WarmOrigin>,
}

fn fp32() -> String {
    FP32.to_string()
}

/// The variant of a model as trained.
pub const FP32: &str = "fp32";

/// Where a distilled model's knowledge came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    /// The soft-label file read.
    pub soft_labels: String,
    /// The model that produced it.
    pub model: String,
    /// SHA-256 of that model's artifact.
    pub model_sha256: String,
    /// Weight of the hard-label loss.
    pub alpha: f32,
    /// Temperature of the soft losses.
    pub temperature: f32,
}

/// A trained model as stored: its card and its safetensors bytes.
#[derive(Debug, Clone)]
pub struct ModelArtifact {
    /// The card.
    pub card: ModelCard,
    /// The safetensors file.
    pub bytes: Bytes,
    /// Parameters (elements of all tensors).
    pub params: u64,
    /// Where it was read from (or `model <name>` when built in memory), for messages.
    pub location: String,
}

/// The values of a tensor to store: `f32` weights, or `u32` indices (the
/// neighbour tables' offsets and items).
#[derive(Debug, Clone, Copy)]
pub enum TensorData<'a> {
    /// Weights.
    F32(&'a [f32]),
    /// Indices.
    U32(&'a [u32]),
}

impl TensorData<'_> {
    fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::U32(v) => v.len(),
        }
    }

    fn dtype(&self) -> safetensors::Dtype {
        match self {
            TensorData::F32(_) => safetensors::Dtype::F32,
            TensorData::U32(_) => safetensors::Dtype::U32,
        }
    }

    /// Little-endian bytes (safetensors' layout).
    fn le_bytes(&self) -> Vec<u8> {
        match self {
            TensorData::F32(v) => f32_le_bytes(v),
            TensorData::U32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// The dtypes a model kind stores: `f32`, and for the neighbour tables
/// also `u32` indices.
fn allowed_dtype(kind: &str, dtype: safetensors::Dtype) -> bool {
    dtype == safetensors::Dtype::F32
        || (kind == neighbors::KIND && dtype == safetensors::Dtype::U32)
}

impl ModelArtifact {
    /// Serializes named f32 tensors (shape, values) with the card in the metadata.
    pub fn from_f32(
        card: ModelCard,
        tensors: Vec<(&str, Vec<usize>, &[f32])>,
    ) -> Result<ModelArtifact> {
        let tensors = tensors
            .into_iter()
            .map(|(name, shape, data)| (name, shape, TensorData::F32(data)))
            .collect();
        Self::from_tensors(card, tensors)
    }

    /// Serializes named tensors (shape, values) with the card in the metadata.
    pub fn from_tensors(
        card: ModelCard,
        tensors: Vec<(&str, Vec<usize>, TensorData)>,
    ) -> Result<ModelArtifact> {
        let mut buffers = Vec::with_capacity(tensors.len());
        let mut params = 0u64;
        for (name, shape, data) in &tensors {
            let elements: usize = shape.iter().product();
            if elements != data.len() {
                return Err(Error::internal(format!(
                    "tensor {name}: shape {shape:?} does not hold {} values",
                    data.len()
                )));
            }
            // Indices are not parameters (as for the stored sparse matrices).
            if let TensorData::F32(_) = data {
                params += elements as u64;
            }
            buffers.push((
                name.to_string(),
                shape.clone(),
                data.dtype(),
                data.le_bytes(),
            ));
        }
        let mut views = Vec::with_capacity(buffers.len());
        for (name, shape, dtype, data) in &buffers {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                .map_err(|e| Error::internal(format!("tensor {name}: {e}")))?;
            views.push((name.clone(), view));
        }
        let card_json = serde_json::to_string(&card).map_err(|e| Error::internal(e.to_string()))?;
        let metadata = HashMap::from([(CARD_KEY.to_string(), card_json)]);
        let bytes = safetensors::serialize(views, Some(metadata))
            .map_err(|e| Error::internal(format!("serializing {}: {e}", card.name)))?;
        Ok(ModelArtifact {
            location: format!("model {}", card.name),
            card,
            bytes: Bytes::from(bytes),
            params,
        })
    }

    /// Parses and checks an artifact read from `location`. Refuses (exit 3)
    /// anything malformed: bad header, missing card, wrong dtypes.
    pub fn parse(location: &str, bytes: Bytes) -> Result<ModelArtifact> {
        let bad = |msg: String| Error::data(location, format!("not a valid model artifact: {msg}"));
        let (_, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let stored = metadata
            .metadata()
            .as_ref()
            .is_some_and(|m| m.contains_key(sasrec::infer::LAYOUT_KEY));
        let card_json = metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get(CARD_KEY))
            .ok_or_else(|| bad(format!("no {CARD_KEY} entry in the safetensors metadata")))?;
        let card: ModelCard =
            serde_json::from_str(card_json).map_err(|e| bad(format!("bad model card: {e}")))?;
        if stored {
            // A model with stored (compressed) matrices: decoding it checks everything.
            if card.kind != sasrec::KIND {
                return Err(bad(format!("{} models have no stored layout", card.kind)));
            }
            let model = sasrec::infer::StoredSasRec::decode(location, &card, &bytes)?;
            return Ok(ModelArtifact {
                card,
                params: model.params(),
                bytes,
                location: location.to_string(),
            });
        }
        let tensors = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let mut params = 0u64;
        for (name, view) in tensors.tensors() {
            if !allowed_dtype(&card.kind, view.dtype()) {
                return Err(bad(format!(
                    "tensor {name} is {:?}, expected F32",
                    view.dtype()
                )));
            }
            if view.dtype() == safetensors::Dtype::F32 {
                params += view.shape().iter().product::<usize>() as u64;
            }
        }
        Ok(ModelArtifact {
            card,
            bytes,
            params,
            location: location.to_string(),
        })
    }

    /// The u32 values of tensor `name`, checked against `shape`.
    pub fn tensor_u32(&self, name: &str, shape: &[usize]) -> Result<Vec<u32>> {
        let location = self.location.clone();
        let tensors =
            SafeTensors::deserialize(&self.bytes).map_err(|e| Error::data(&location, e))?;
        let view = tensors
            .tensor(name)
            .map_err(|_| Error::data(&location, format!("missing tensor {name}")))?;
        if view.shape() != shape || view.dtype() != safetensors::Dtype::U32 {
            return Err(Error::data(
                &location,
                format!(
                    "tensor {name} is {:?} {:?}, expected U32 {shape:?} for this model's config",
                    view.dtype(),
                    view.shape()
                ),
            ));
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// The f32 values of tensor `name`, checked against `shape`.
    pub fn tensor_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let location = self.location.clone();
        let tensors =
            SafeTensors::deserialize(&self.bytes).map_err(|e| Error::data(&location, e))?;
        let view = tensors
            .tensor(name)
            .map_err(|_| Error::data(&location, format!("missing tensor {name}")))?;
        if view.shape() != shape || view.dtype() != safetensors::Dtype::F32 {
            return Err(Error::data(
                &location,
                format!(
                    "tensor {name} is {:?} {:?}, expected F32 {shape:?} for this model's config",
                    view.dtype(),
                    view.shape()
                ),
            ));
        }
        Ok(view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// SHA-256 of the artifact's bytes, hex.
    pub fn sha256(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&self.bytes))
    }

    /// Number of tensors in the file.
    pub fn tensor_count(&self) -> Result<usize> {
        let location = self.location.clone();
        Ok(SafeTensors::deserialize(&self.bytes)
            .map_err(|e| Error::data(&location, e))?
            .len())
    }

    /// Whether its matrices are stored in a layout of their own (a compressed model).
    pub fn is_stored(&self) -> bool {
        SafeTensors::read_metadata(&self.bytes)
            .ok()
            .and_then(|(_, m)| m.metadata().clone())
            .is_some_and(|m| m.contains_key(sasrec::infer::LAYOUT_KEY))
    }

    /// A SASRec model in the scoring engine: as stored, or (for a model
    /// saved as trained) its dense weights.
    pub fn stored_sasrec(&self) -> Result<sasrec::infer::StoredSasRec> {
        if self.is_stored() {
            sasrec::infer::StoredSasRec::decode(&self.location, &self.card, &self.bytes)
        } else {
            Ok(sasrec::infer::StoredSasRec::from_dense(
                &sasrec::SasRec::from_artifact(self)?,
            ))
        }
    }

    /// Saves a stored SASRec model with its card and how it was made.
    pub fn from_stored(
        card: ModelCard,
        model: &sasrec::infer::StoredSasRec,
        info: Option<&sasrec::infer::CompressionInfo>,
    ) -> Result<ModelArtifact> {
        let bytes = model.serialize(&card, info)?;
        Ok(ModelArtifact {
            location: format!("model {}", card.name),
            params: model.params(),
            card,
            bytes: Bytes::from(bytes),
        })
    }

    /// Builds the model's scorer, checking it was trained for `n_items` items.
    pub fn scorer(&self, n_items: usize) -> Result<Box<dyn Scorer>> {
        if self.card.n_items != n_items {
            return Err(Error::data(
                self.location.clone(),
                format!(
                    "trained for {} items, but this run's item_map has {n_items}; retrain it",
                    self.card.n_items
                ),
            ));
        }
        match self.card.kind.as_str() {
            popularity::KIND => Ok(Box::new(popularity::Popularity::from_artifact(self)?)),
            meanpool::KIND => Ok(Box::new(meanpool::MeanPool::from_artifact(self)?)),
            neighbors::KIND => Ok(Box::new(neighbors::Neighbors::from_artifact(self)?)),
            sasrec::KIND => Ok(Box::new(self.stored_sasrec()?)),
            other => Err(Error::data(
                self.location.clone(),
                format!("unknown model kind {other:?}"),
            )),
        }
    }
}

/// Little-endian bytes of f32 values (safetensors' layout).
fn f32_le_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card() -> ModelCard {
        ModelCard {
            name: "p".into(),
            kind: popularity::KIND.into(),
            role: "baseline".into(),
            training: "supervised".into(),
            loss: None,
            n_items: 3,
            config: serde_json::json!({}),
            distilled_from: None,
            variant: FP32.into(),
            warm_started_from: None,
        }
    }

    #[test]
    fn artifact_round_trip() {
        let a =
            ModelArtifact::from_f32(card(), vec![("scores", vec![3], &[1.0, 2.5, -1.0])]).unwrap();
        let b = ModelArtifact::parse("mem", a.bytes.clone()).unwrap();
        assert_eq!(b.card, card());
        assert_eq!(b.params, 3);
        assert_eq!(b.tensor_f32("scores", &[3]).unwrap(), vec![1.0, 2.5, -1.0]);
        assert!(b.tensor_f32("scores", &[4]).is_err());
        assert!(b.scorer(4).is_err());
    }

    #[test]
    fn malformed_artifacts_are_refused_not_panics() {
        let good = ModelArtifact::from_f32(card(), vec![("scores", vec![3], &[1.0, 2.0, 3.0])])
            .unwrap()
            .bytes;
        let mut cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![1, 2, 3],
            u64::MAX.to_le_bytes().to_vec(),
            good[..good.len() - 1].to_vec(),
        ];
        let mut huge_header = good.to_vec();
        huge_header[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        cases.push(huge_header);
        for case in cases {
            let err = ModelArtifact::parse("bad.safetensors", Bytes::from(case)).unwrap_err();
            assert_eq!(err.exit_code(), 3, "{err}");
        }
        let no_card = safetensors::serialize(
            vec![(
                "x",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![1],
                    &[0, 0, 0, 0],
                )
                .unwrap(),
            )],
            None,
        )
        .unwrap();
        assert!(ModelArtifact::parse("x", Bytes::from(no_card)).is_err());
    }

    /// A safetensors file written by hand: 8-byte header length, JSON header, data.
    fn raw(header: serde_json::Value, data: &[u8]) -> Bytes {
        let header = header.to_string();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        Bytes::from(bytes)
    }

    #[test]
    fn forged_headers_are_refused() {
        let card = serde_json::to_string(&card()).unwrap();
        let meta = serde_json::json!({ CARD_KEY: card });
        let tensor = |dtype: &str, shape: &[usize], offsets: [usize; 2]| serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": offsets});
        let cases = [
            // Two tensors over the same bytes.
            (
                serde_json::json!({"__metadata__": meta, "a": tensor("F32", &[2], [0, 8]), "scores": tensor("F32", &[1], [4, 8])}),
                vec![0u8; 8],
                "overlapping",
            ),
            // Offsets past the end of the data.
            (
                serde_json::json!({"__metadata__": meta, "scores": tensor("F32", &[3], [0, 1 << 40])}),
                vec![0u8; 12],
                "past the end",
            ),
            // Shape and byte count disagree.
            (
                serde_json::json!({"__metadata__": meta, "scores": tensor("F32", &[1 << 30, 1 << 30], [0, 12])}),
                vec![0u8; 12],
                "shape",
            ),
            // A dtype the model does not use.
            (
                serde_json::json!({"__metadata__": meta, "scores": tensor("F64", &[3], [0, 24])}),
                vec![0u8; 24],
                "dtype F64",
            ),
            // A dtype no one knows.
            (
                serde_json::json!({"__metadata__": meta, "scores": tensor("F33", &[3], [0, 12])}),
                vec![0u8; 12],
                "dtype F33",
            ),
        ];
        for (header, data, case) in cases {
            let err = ModelArtifact::parse("forged.safetensors", raw(header, &data))
                .err()
                .unwrap_or_else(|| panic!("{case}: accepted"));
            assert_eq!(err.exit_code(), 3, "{case}: {err}");
            assert!(
                err.to_string().contains("forged.safetensors"),
                "{case}: {err}"
            );
        }
        // The same writer with sound offsets is accepted: the refusals above
        // are the forgeries, not the hand-written format.
        let sound =
            serde_json::json!({"__metadata__": meta, "scores": tensor("F32", &[3], [0, 12])});
        let data: Vec<u8> = [1.0f32, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let parsed = ModelArtifact::parse("sound.safetensors", raw(sound, &data)).unwrap();
        assert_eq!(
            parsed.tensor_f32("scores", &[3]).unwrap(),
            vec![1.0, 2.0, 3.0]
        );
    }
}
