//! Text encoders: an item's text (title, genres, year, …) to one vector,
//! through a language model whose weights ship inside a registry package.
//!
//! - [`bert`]: `minilm-l6`, all-MiniLM-L6-v2 (a 6-layer BERT, width 384)
//!   from `model.safetensors`, `config.json` and `tokenizer.json`, run by
//!   candle-transformers' BERT; mean over the attention mask, then L2
//!   normalised (as sentence-transformers pools it).
//! - [`llama`]: `smollm2-135m`, SmolLM2-135M-Instruct as a GGUF file (a
//!   30-layer llama, width 576, 4-bit weights, the tokenizer inside), run
//!   by our own forward pass over candle's quantized matrices so that any
//!   block's hidden states can be pooled (candle-transformers' quantized
//!   llama returns only the last position's logits); mean over the text's
//!   tokens of one block's output, then L2 normalised.
//!
//! Both encode a batch at a time, padded on the right to its longest text
//! and masked, so a text's vector does not depend on its batch.

pub mod bert;
pub mod llama;

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// What one call to [`TextEncoder::encode`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// `texts × dim`, row-major, each row of unit length (zero for an
    /// empty text).
    pub vectors: Vec<f32>,
    /// Texts cut to the encoder's window.
    pub truncated: usize,
    /// Texts with no token at all, given the zero vector.
    pub empty: usize,
    /// Tokens encoded, over every text.
    pub tokens: usize,
}

/// A loaded text encoder.
pub trait TextEncoder: Send {
    /// What the vectors depend on: the encoder's name, its pooling and its
    /// weights' SHA-256. Items encoded under another identity are encoded
    /// again.
    fn identity(&self) -> &str;

    /// Width of every vector.
    fn dim(&self) -> usize;

    /// Most tokens of a text; longer ones are cut.
    fn window(&self) -> usize;

    /// The vectors of `texts`.
    fn encode(&self, texts: &[&str]) -> Result<Encoded>;

    /// Multiply-adds a forward pass of `tokens` tokens costs, for the
    /// throughput floor (weights only; attention over short texts is small
    /// beside them).
    fn flops_per_token(&self) -> f64;
}

pub use crate::config::text::TEXT_ENCODERS as ENCODERS;

/// Loads the encoder named `name` from the folder `weights` onto `device`.
/// `layer` picks the llama block whose output is pooled (0: the last, after
/// the final norm); `window` caps a text's tokens. Missing or damaged
/// weights, or a tokenizer that does not match the model, are refused
/// (exit 2) naming the file.
pub fn load_encoder(
    name: &str,
    weights: &Path,
    layer: usize,
    window: usize,
    device: &Device,
) -> Result<Box<dyn TextEncoder>> {
    match name {
        bert::MINILM_L6 => Ok(Box::new(bert::BertEncoder::load(weights, window, device)?)),
        llama::SMOLLM2_135M => Ok(Box::new(llama::LlamaEncoder::load(
            &weights.join(llama::SMOLLM2_FILE),
            layer,
            window,
            device,
        )?)),
        other => Err(Error::config(format!(
            "text.encoder = {other:?}: the encoders are {}",
            ENCODERS.join(", ")
        ))),
    }
}

/// A weights file that must exist, named in the error when it does not.
pub(crate) fn weights_file(path: PathBuf) -> Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::config(format!(
            "text encoder weights {}: no such file (scripts/fetch-text-models.sh fetches them)",
            path.display()
        )))
    }
}

/// The SHA-256 of a file, hex.
pub(crate) fn file_sha256(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| Error::config(format!("cannot read {}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| Error::config(format!("cannot read {}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// A candle error while loading `path`: the file is damaged (exit 2).
pub(crate) fn damaged(path: &Path, err: impl std::fmt::Display) -> Error {
    Error::config(format!(
        "text encoder file {} is damaged or not what the encoder expects: {err}",
        path.display()
    ))
}

/// A candle error while encoding: a bug or a device failure.
pub(crate) fn failed(what: &str, err: impl std::fmt::Display) -> Error {
    Error::internal(format!("{what}: {err}"))
}

/// Encodes `texts` into `dim`-wide vectors, the part both encoders share:
/// an empty text gets the zero vector and is counted; `tokenize` gives a
/// text's token ids already cut to the window and whether they were cut
/// (`None`: no token at all, counted as empty); the tokens of the other
/// texts are padded on the right with `pad`, masked, run through `hidden`
/// (ids, mask → `[texts, positions, dim]`) and mean-pooled to unit length.
pub(crate) fn encode_texts(
    texts: &[&str],
    dim: usize,
    mut tokenize: impl FnMut(&str) -> Result<Option<(Vec<u32>, bool)>>,
    pad: u32,
    device: &Device,
    hidden: impl FnOnce(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<Encoded> {
    let mut out = Encoded {
        vectors: vec![0.0; texts.len() * dim],
        truncated: 0,
        empty: 0,
        tokens: 0,
    };
    let mut rows = Vec::new();
    let mut ids = Vec::new();
    for (row, text) in texts.iter().enumerate() {
        let tokens = if text.trim().is_empty() {
            None
        } else {
            tokenize(text)?
        };
        let Some((tokens, cut)) = tokens else {
            out.empty += 1;
            continue;
        };
        out.truncated += usize::from(cut);
        out.tokens += tokens.len();
        rows.push(row);
        ids.push(tokens);
    }
    if ids.is_empty() {
        return Ok(out);
    }
    let pooled = (|| {
        let (input, mask) = pad_batch(&ids, pad, device)?;
        mean_pool_normalized(&hidden(&input, &mask)?, &mask)
    })()
    .map_err(|e| failed("encoding item text", e))?;
    for (i, row) in rows.into_iter().enumerate() {
        out.vectors[row * dim..(row + 1) * dim].copy_from_slice(&pooled[i * dim..(i + 1) * dim]);
    }
    Ok(out)
}

/// Token ids of a batch padded on the right with `pad`, and the mask
/// (1 for a token, 0 for padding), both `[texts, longest]`.
pub(crate) fn pad_batch(
    ids: &[Vec<u32>],
    pad: u32,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let longest = ids.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut flat = Vec::with_capacity(ids.len() * longest);
    let mut mask = Vec::with_capacity(ids.len() * longest);
    for row in ids {
        flat.extend_from_slice(row);
        flat.extend(std::iter::repeat_n(pad, longest - row.len()));
        mask.extend(std::iter::repeat_n(1f32, row.len()));
        mask.extend(std::iter::repeat_n(0f32, longest - row.len()));
    }
    Ok((
        Tensor::from_vec(flat, (ids.len(), longest), device)?,
        Tensor::from_vec(mask, (ids.len(), longest), device)?,
    ))
}

/// Mean of `hidden` (`[texts, positions, dim]`) over the positions `mask`
/// (`[texts, positions]`, 1 or 0) keeps, each row then scaled to unit
/// length; a row with no position is zero.
pub(crate) fn mean_pool_normalized(
    hidden: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<Vec<f32>> {
    let hidden = hidden.to_dtype(DType::F32)?;
    let mask = mask.to_dtype(DType::F32)?;
    let summed = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
    let counts = mask.sum_keepdim(1)?.clamp(1f32, f32::MAX)?;
    let mean = summed.broadcast_div(&counts)?;
    let norm = mean
        .sqr()?
        .sum_keepdim(1)?
        .sqrt()?
        .clamp(1e-12f32, f32::MAX)?;
    let unit = mean.broadcast_div(&norm)?;
    unit.flatten_all()?.to_vec1::<f32>()
}

#[cfg(test)]
pub(crate) mod testing {
    //! Small tokenizers the encoders' tests build themselves.

    /// Cosine of two vectors.
    pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (na * nb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_ignores_padding_and_normalizes() {
        let device = Device::Cpu;
        // Two texts: 2 tokens, and 1 token then padding of huge values.
        let hidden =
            Tensor::from_vec(vec![1f32, 0., 3., 4., 0., 2., 99., 99.], (2, 2, 2), &device).unwrap();
        let mask = Tensor::from_vec(vec![1f32, 1., 1., 0.], (2, 2), &device).unwrap();
        let pooled = mean_pool_normalized(&hidden, &mask).unwrap();
        // Text 0: mean (2, 2) → (0.7071, 0.7071); text 1: (0, 2) → (0, 1).
        let want = [
            std::f32::consts::FRAC_1_SQRT_2,
            std::f32::consts::FRAC_1_SQRT_2,
            0.0,
            1.0,
        ];
        for (g, w) in pooled.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{pooled:?}");
        }
        // A text without tokens pools to zero, not NaN.
        let none = Tensor::zeros((1, 2), DType::F32, &device).unwrap();
        let pooled = mean_pool_normalized(&hidden.narrow(0, 0, 1).unwrap(), &none).unwrap();
        assert_eq!(pooled, vec![0.0, 0.0]);
    }

    #[test]
    fn a_missing_weights_file_and_an_unknown_encoder_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        for name in ENCODERS {
            let err = load_encoder(name, dir.path(), 0, 128, &Device::Cpu)
                .err()
                .expect("no weights");
            assert_eq!(err.exit_code(), 2, "{err}");
            assert!(
                err.to_string().contains(&dir.path().display().to_string()),
                "{err}"
            );
        }
        let err = load_encoder("gpt-5", dir.path(), 0, 128, &Device::Cpu)
            .err()
            .unwrap();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("minilm-l6"), "{err}");
    }
}
