//! Joins Parquet parts, written by shards of one stage, into the one object
//! an unsharded stage would have written.
//!
//! A part is written with one row group per batch its producer handed over
//! ([`RowGroups::BetweenBatches`] with `rows: 1`). Reading each row group
//! back as one batch and writing the batches in part order through the
//! writer settings of the unsharded file gives the writer the very batches
//! it would have had: the joined object is byte for byte the unsharded one.

use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use futures::StreamExt;
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::arrow::arrow_reader::ArrowReaderMetadata;

use super::reader::ParquetObject;
use super::{Lake, RowGroups, WrittenObject};
use crate::error::{Error, Result};

/// The key-value metadata the Arrow writer adds by itself.
const ARROW_SCHEMA_KEY: &str = "ARROW:schema";

/// One part opened for joining.
struct Part {
    rel: String,
    reader: ParquetObject,
    metadata: ArrowReaderMetadata,
    /// Key-value metadata, writer-added keys and `drop_keys` removed.
    kv: Vec<(String, String)>,
}

impl Lake {
    async fn open_part(&self, rel: &str, drop_keys: &[&str]) -> Result<Part> {
        let location = self.url_of(rel);
        let head = self.head(rel).await?.ok_or_else(|| {
            Error::data(&location, "part not found: rerun the shard that writes it")
        })?;
        let mut reader = ParquetObject::new(self.store(), self.path(rel), head.size);
        let metadata = ArrowReaderMetadata::load_async(&mut reader, Default::default())
            .await
            .map_err(|e| Error::data(&location, format!("not a readable Parquet part: {e}")))?;
        let kv = metadata
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .map(|kv| {
                kv.iter()
                    .filter(|e| e.key != ARROW_SCHEMA_KEY && !drop_keys.contains(&e.key.as_str()))
                    .map(|e| (e.key.clone(), e.value.clone().unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Part {
            rel: rel.to_string(),
            reader,
            metadata,
            kv,
        })
    }

    /// Writes the Parquet objects `parts` (relative to the lake root), in
    /// order, into one object at `out`, its row groups cut as `groups`
    /// says. The parts must share one schema and one key-value metadata
    /// apart from `drop_keys`, which the joined object leaves out. Nothing
    /// is visible at `out` unless every part was read whole.
    pub async fn concat_parquet(
        &self,
        parts: &[String],
        out: &str,
        drop_keys: &[&str],
        groups: RowGroups,
    ) -> Result<WrittenObject> {
        let mut opened = Vec::with_capacity(parts.len());
        for rel in parts {
            opened.push(self.open_part(rel, drop_keys).await?);
        }
        let Some(first) = opened.first() else {
            return Err(Error::internal(format!("no parts to join into {out}")));
        };
        // The schema as written, without the file metadata the reader folds in.
        let schema: SchemaRef = Arc::new(Schema::new(first.metadata.schema().fields().clone()));
        let kv = first.kv.clone();
        for part in &opened[1..] {
            let location = self.url_of(&part.rel);
            if part.metadata.schema().fields() != schema.fields() {
                return Err(Error::data(
                    location,
                    format!(
                        "part's schema differs from that of {}: the parts come from different runs; rerun every shard",
                        self.url_of(&first.rel)
                    ),
                ));
            }
            if part.kv != kv {
                return Err(Error::data(
                    location,
                    format!(
                        "part's key-value metadata differs from that of {}: the parts come from different models or settings; rerun every shard",
                        self.url_of(&first.rel)
                    ),
                ));
            }
        }
        let mut upload = self.start_parquet_grouped(out, Arc::clone(&schema), kv, groups)?;
        for part in opened {
            if let Err(e) = append_part(&mut upload, part, self, &schema).await {
                upload.abort().await;
                return Err(e);
            }
        }
        upload.finish().await
    }
}

/// Appends every row group of `part` to `upload`, each as one batch.
async fn append_part(
    upload: &mut super::ParquetUpload,
    part: Part,
    lake: &Lake,
    schema: &SchemaRef,
) -> Result<()> {
    let location = lake.url_of(&part.rel);
    let bad = |e: String| Error::data(&location, format!("cannot read part: {e}"));
    let groups = part.metadata.metadata().num_row_groups();
    for g in 0..groups {
        let rows = part.metadata.metadata().row_group(g).num_rows().max(1) as usize;
        let mut stream = ParquetRecordBatchStreamBuilder::new_with_metadata(
            part.reader.clone(),
            part.metadata.clone(),
        )
        .with_row_groups(vec![g])
        .with_batch_size(rows)
        .build()
        .map_err(|e| bad(e.to_string()))?;
        let mut batches = Vec::new();
        while let Some(batch) = stream.next().await {
            batches.push(batch.map_err(|e| bad(e.to_string()))?);
        }
        let batch = match batches.len() {
            1 => batches.pop().expect("one batch"),
            _ => arrow::compute::concat_batches(schema, &batches)
                .map_err(|e| Error::internal(e.to_string()))?,
        };
        let batch = RecordBatch::try_new(Arc::clone(schema), batch.columns().to_vec())
            .map_err(|e| bad(e.to_string()))?;
        upload.write(&batch).await?;
    }
    Ok(())
}
