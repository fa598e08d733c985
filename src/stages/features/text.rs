//! The features stage's text step (`[text] enabled = true`): each item's
//! text from `sql/item_text.sql` (or the job's own file), through the
//! encoder the job names, into `features/item_text_embeddings.parquet`
//! (`schemas/item_text_embeddings.json`): item id, the text's SHA-256, the
//! encoder's identity (name, pooling, window, weights' SHA-256) and the
//! vector.
//!
//! Incremental: a vector is reused from this run folder's own earlier
//! table (a rerun of the date) or from the newest committed earlier run's,
//! when both the text's SHA-256 and the encoder's identity match; only the
//! rest is encoded. An encoder changed between runs re-encodes every item
//! and says so.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    Array, ArrayRef, AsArray, Float32Builder, ListBuilder, RecordBatch, StringArray,
};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Field, Float32Type, Schema};
use bytes::Bytes;
use datafusion::prelude::SessionContext;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sha2::{Digest, Sha256};

use crate::config::Job;
use crate::config::text::TEXT_MODELS_ENV;
use crate::error::{Error, Result};
use crate::lake::WrittenObject;
use crate::lake::engine::{SqlParams, plan_sql};
use crate::model::text::{TextEncoder, load_encoder};
use crate::run::RunFolder;
use crate::run::commit;

/// The table the step writes, `features/<name>.parquet`.
pub const ITEM_TEXT_EMBEDDINGS_TABLE: &str = "item_text_embeddings";

/// What the step did, for the log and the tests.
#[derive(Debug, Clone, PartialEq)]
pub struct TextSummary {
    /// Items with a row (every item of the items table).
    pub items: usize,
    /// Items encoded by this run.
    pub encoded: usize,
    /// Items whose vector was carried over.
    pub reused: usize,
    /// Items with empty text (the zero vector).
    pub empty: usize,
    /// Items whose text was cut to the window.
    pub truncated: usize,
    /// Items an earlier table had under another encoder identity.
    pub other_encoder: usize,
    /// The encoder's identity.
    pub encoder: String,
    /// Seconds spent encoding (model loading excluded).
    pub encode_seconds: f64,
}

/// A vector an earlier table holds: the text's SHA-256 and the vector.
type Cached = HashMap<String, (String, Vec<f32>)>;

/// An item's row (in the text SQL's order) and its new vector.
type Vector = (usize, Vec<f32>);

/// Runs the text SQL `(file, sql)` and writes the table; registers it in
/// `ctx` as [`ITEM_TEXT_EMBEDDINGS_TABLE`].
pub async fn encode_item_text(
    job: &Job,
    run: &RunFolder,
    ctx: &SessionContext,
    (file, sql): (&str, &str),
    params: &SqlParams,
) -> Result<(WrittenObject, TextSummary)> {
    let spec = &job.spec.text;
    let what = format!("item text SQL {file}");
    if !ctx
        .table_exist("items")
        .map_err(|e| Error::from_datafusion(&what, e))?
    {
        return Err(Error::config(format!(
            "[text] enabled = true encodes each item's text from the items table, but input.items ({:?}) has no files",
            job.spec.input.items
        )));
    }
    let df = plan_sql(ctx, sql, params, &what).await?;
    let schema = df.schema().inner().clone();
    let batches = df
        .collect()
        .await
        .map_err(|e| Error::from_datafusion(&what, e))?;
    let batch = concat_batches(&schema, &batches).map_err(|e| Error::internal(e.to_string()))?;
    let (Some(ids), Some(texts)) = (
        batch.column_by_name("item_id"),
        batch.column_by_name("text"),
    ) else {
        return Err(Error::config(format!(
            "{file} must return columns item_id and text; it returns {}",
            schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let ids = Arc::clone(ids);
    let keys = cast(&ids, &DataType::Utf8).map_err(|e| Error::internal(e.to_string()))?;
    let keys: Vec<String> = keys
        .as_string::<i32>()
        .iter()
        .map(|k| k.unwrap_or_default().to_string())
        .collect();
    if ids.null_count() > 0 {
        return Err(Error::data(&what, "column item_id has a null"));
    }
    let mut seen = HashSet::with_capacity(keys.len());
    for key in &keys {
        if !seen.insert(key.as_str()) {
            return Err(Error::data(
                &what,
                format!("column item_id has {key} twice: one text per item"),
            ));
        }
    }
    let texts = cast(texts, &DataType::Utf8)
        .map_err(|e| Error::config(format!("{file}: column text must be a string: {e}")))?;
    let texts: Vec<String> = texts
        .as_string::<i32>()
        .iter()
        .map(|t| t.unwrap_or_default().to_string())
        .collect();
    let shas: Vec<String> = texts
        .iter()
        .map(|t| hex::encode(Sha256::digest(t.as_bytes())))
        .collect();

    let weights = spec.weights_dir(
        job.dir.as_deref(),
        std::env::var(TEXT_MODELS_ENV).ok().as_deref(),
    );
    let device = crate::train::candle::device(&job.spec.device)?;
    let (encoder_name, layer, window) = (spec.encoder.clone(), spec.layer, spec.max_tokens);
    let encoder = tokio::task::spawn_blocking(move || {
        load_encoder(&encoder_name, &weights, layer, window, &device)
    })
    .await
    .map_err(|e| Error::internal(format!("loading the text encoder failed: {e}")))??;
    let identity = encoder.identity().to_string();
    let dim = encoder.dim();

    let rel = format!("features/{ITEM_TEXT_EMBEDDINGS_TABLE}.parquet");
    let (mut cached, other_encoder) = earlier_vectors(job, run, &rel, &identity, dim).await?;
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; keys.len()];
    let mut todo = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        match cached.remove(key) {
            Some((sha, vector)) if sha == shas[i] => vectors[i] = Some(vector),
            _ => todo.push(i),
        }
    }
    let reused = keys.len() - todo.len();
    if other_encoder > 0 {
        tracing::warn!(
            items = other_encoder,
            encoder = %identity,
            "the text encoder changed since the earlier table: its items are encoded again"
        );
    }
    tracing::info!(
        items = keys.len(),
        reused,
        to_encode = todo.len(),
        encoder = %identity,
        "encoding item text"
    );
    let started = Instant::now();
    let batch_size = spec.batch_size;
    let (encoded, counts) =
        tokio::task::spawn_blocking(move || encode_all(encoder.as_ref(), &texts, todo, batch_size))
            .await
            .map_err(|e| Error::internal(format!("encoding item text failed: {e}")))??;
    let encode_seconds = started.elapsed().as_secs_f64();
    let encoded_count = encoded.len();
    for (i, vector) in encoded {
        vectors[i] = Some(vector);
    }
    let EncodeCounts {
        empty,
        truncated,
        tokens,
        flops,
    } = counts;
    if encoded_count > 0 {
        tracing::info!(
            encoded = encoded_count,
            empty,
            truncated,
            tokens,
            seconds = encode_seconds,
            items_per_s = encoded_count as f64 / encode_seconds.max(1e-9),
            gflops_per_s = flops / encode_seconds.max(1e-9) / 1e9,
            "item text encoded"
        );
    }
    if empty > 0 {
        tracing::warn!(items = empty, "items with empty text get the zero vector");
    }
    if truncated > 0 {
        tracing::warn!(
            items = truncated,
            window,
            "item text longer than the window was cut"
        );
    }

    let mut list = ListBuilder::new(Float32Builder::with_capacity(keys.len() * dim))
        .with_field(Arc::new(Field::new_list_field(DataType::Float32, false)));
    for vector in &vectors {
        let vector = vector
            .as_ref()
            .ok_or_else(|| Error::internal("an item was neither reused nor encoded"))?;
        list.values().append_slice(vector);
        list.append(true);
    }
    let out_schema = Arc::new(Schema::new(vec![
        Field::new("item_id", ids.data_type().clone(), false),
        Field::new("text_sha256", DataType::Utf8, false),
        Field::new("encoder", DataType::Utf8, false),
        Field::new(
            "embedding",
            DataType::List(Arc::new(Field::new_list_field(DataType::Float32, false))),
            false,
        ),
    ]));
    let columns: Vec<ArrayRef> = vec![
        ids,
        Arc::new(StringArray::from(shas)),
        Arc::new(StringArray::from(vec![identity.clone(); keys.len()])),
        Arc::new(list.finish()),
    ];
    let out = RecordBatch::try_new(Arc::clone(&out_schema), columns)
        .map_err(|e| Error::internal(e.to_string()))?;
    // What this run did, beside the vectors (readers see it without logs).
    let metadata = vec![
        ("recdistill.text.encoder".to_string(), identity.clone()),
        (
            "recdistill.text.encoded".to_string(),
            encoded_count.to_string(),
        ),
        ("recdistill.text.reused".to_string(), reused.to_string()),
        ("recdistill.text.empty".to_string(), empty.to_string()),
        (
            "recdistill.text.truncated".to_string(),
            truncated.to_string(),
        ),
    ];
    let object = run
        .write_batches(&rel, out_schema, vec![out], metadata)
        .await?;
    super::register_run_table(ctx, run, ITEM_TEXT_EMBEDDINGS_TABLE, &rel).await?;
    let summary = TextSummary {
        items: keys.len(),
        encoded: encoded_count,
        reused,
        empty,
        truncated,
        other_encoder,
        encoder: identity,
        encode_seconds,
    };
    tracing::info!(
        bytes = object.size,
        items = summary.items,
        "item text embeddings written"
    );
    Ok((object, summary))
}

#[derive(Debug, Default)]
struct EncodeCounts {
    empty: usize,
    truncated: usize,
    tokens: usize,
    flops: f64,
}

/// Encodes the texts at `todo`, shortest first so a batch pads little,
/// with a progress bar; returns (index, vector) pairs.
fn encode_all(
    encoder: &dyn TextEncoder,
    texts: &[String],
    mut todo: Vec<usize>,
    batch_size: usize,
) -> Result<(Vec<Vector>, EncodeCounts)> {
    let dim = encoder.dim();
    todo.sort_by_key(|&i| (texts[i].len(), i));
    let bar = crate::progress::bar(todo.len() as u64, "encoding item text");
    let mut counts = EncodeCounts::default();
    let mut out = Vec::with_capacity(todo.len());
    for chunk in todo.chunks(batch_size) {
        let batch: Vec<&str> = chunk.iter().map(|&i| texts[i].as_str()).collect();
        let encoded = encoder.encode(&batch)?;
        counts.empty += encoded.empty;
        counts.truncated += encoded.truncated;
        counts.tokens += encoded.tokens;
        for (row, &i) in chunk.iter().enumerate() {
            out.push((i, encoded.vectors[row * dim..(row + 1) * dim].to_vec()));
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    counts.flops = counts.tokens as f64 * encoder.flops_per_token();
    Ok((out, counts))
}

/// Vectors an earlier table holds under `identity` (of width `dim`), by
/// item id: this run folder's own (a rerun of the date), then the newest
/// committed earlier run's; and how many of their items were encoded by
/// another encoder. An unreadable earlier table is only a warning: its
/// items are encoded again.
async fn earlier_vectors(
    job: &Job,
    run: &RunFolder,
    rel: &str,
    identity: &str,
    dim: usize,
) -> Result<(Cached, usize)> {
    let mut sources: Vec<(String, Bytes)> = Vec::new();
    let prefix = &job.spec.lake.output_prefix;
    if let Some((earlier, manifest)) =
        commit::committed_runs_before(run.lake(), prefix, run.job(), run.run_date(), 1)
            .await?
            .pop()
        && manifest.listed(rel).is_some()
    {
        match commit::read_listed(&earlier, &manifest, rel).await {
            Ok(bytes) => sources.push((earlier.url_of(rel), bytes)),
            Err(err @ Error::Data { .. }) => {
                tracing::warn!(%err, "the earlier run's item text embeddings are unusable; its items are encoded again");
            }
            Err(err) => return Err(err),
        }
    }
    if run.lake().head(&run.rel(rel)).await?.is_some() {
        sources.push((run.url_of(rel), run.get(rel).await?));
    }
    let mut cached = Cached::new();
    let mut other = HashSet::new();
    for (location, bytes) in sources {
        match read_vectors(bytes, identity, dim) {
            Ok((vectors, others)) => {
                cached.extend(vectors);
                other.extend(others);
            }
            Err(err) => {
                tracing::warn!(table = %location, %err, "an earlier item text table is unreadable; its items are encoded again");
            }
        }
    }
    other.retain(|k| !cached.contains_key(k));
    Ok((cached, other.len()))
}

/// The rows of an item text table encoded under `identity`, and the ids
/// of the rows encoded under another.
fn read_vectors(
    bytes: Bytes,
    identity: &str,
    dim: usize,
) -> std::result::Result<(Cached, Vec<String>), String> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .and_then(|b| b.build())
        .map_err(|e| e.to_string())?;
    let mut cached = Cached::new();
    let mut other = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| format!("no column {name}"))
        };
        let ids = cast(&column("item_id")?, &DataType::Utf8).map_err(|e| e.to_string())?;
        let shas = column("text_sha256")?;
        let encoders = column("encoder")?;
        let vectors = column("embedding")?;
        let (Some(shas), Some(encoders), Some(vectors)) = (
            shas.as_string_opt::<i32>(),
            encoders.as_string_opt::<i32>(),
            vectors.as_list_opt::<i32>(),
        ) else {
            return Err("columns of the wrong type".into());
        };
        for row in 0..batch.num_rows() {
            let id = ids.as_string::<i32>().value(row).to_string();
            if encoders.value(row) != identity {
                other.push(id);
                continue;
            }
            let vector = vectors.value(row);
            let Some(values) = vector.as_primitive_opt::<Float32Type>() else {
                return Err("embedding is not a list of float32".into());
            };
            if values.len() != dim || values.null_count() > 0 {
                continue;
            }
            cached.insert(id, (shas.value(row).to_string(), values.values().to_vec()));
        }
    }
    Ok((cached, other))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, Int64Array, ListBuilder, StringBuilder};
    use datafusion::datasource::MemTable;

    use crate::model::text::bert::{BertEncoder, write_random};

    const CONFIG: &str = r#"{"vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 32, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "max_position_embeddings": 32, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
        "model_type": "bert"}"#;
    const WORDS: [&str; 12] = [
        "toy",
        "story",
        "heat",
        "genres",
        "animation",
        "comedy",
        "action",
        "1995",
        "(",
        ")",
        ".",
        ":",
    ];

    /// Items 1..=3: a titled film, one with only a year, one with nothing.
    fn items(first_title: &str) -> RecordBatch {
        let mut genres = ListBuilder::new(StringBuilder::new());
        genres.values().append_value("Animation");
        genres.values().append_value("Comedy");
        genres.append(true);
        genres.append(false);
        genres.append(false);
        let schema = Arc::new(Schema::new(vec![
            Field::new("item_id", DataType::Int64, false),
            Field::new("title", DataType::Utf8, true),
            Field::new("release_year", DataType::Int32, true),
            Field::new(
                "genres",
                DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
                true,
            ),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3])),
                Arc::new(StringArray::from(vec![Some(first_title), None, None])),
                Arc::new(Int32Array::from(vec![Some(1995), Some(1995), None])),
                Arc::new(genres.finish()),
            ],
        )
        .unwrap()
    }

    /// A run folder in a fresh memory lake.
    fn memory_run() -> RunFolder {
        let lake = crate::lake::Lake::open(&crate::config::LakeSpec {
            url: format!("memory://text-{}", rand::random::<u32>()),
            ..Default::default()
        })
        .unwrap();
        let date = chrono::NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        RunFolder::new(lake, "out", "t", date)
    }

    /// A session with `run`'s lake and the three items as `items`.
    fn with_items(run: &RunFolder, first_title: &str) -> SessionContext {
        let ctx = SessionContext::new();
        run.lake().register(&ctx);
        let batch = items(first_title);
        ctx.register_table(
            "items",
            Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]]).unwrap()),
        )
        .unwrap();
        ctx
    }

    async fn step(job: &Job, run: &RunFolder, first_title: &str) -> (TextSummary, Vec<Vec<f32>>) {
        let ctx = with_items(run, first_title);
        let sql = include_str!("../../../sql/item_text.sql");
        let (_, summary) = encode_item_text(job, run, &ctx, ("item_text.sql", sql), &Vec::new())
            .await
            .unwrap();
        let rows = ctx
            .sql("SELECT item_id, embedding FROM item_text_embeddings ORDER BY item_id")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let mut vectors = Vec::new();
        for b in rows {
            let list = b.column(1).as_list::<i32>();
            for r in 0..b.num_rows() {
                vectors.push(
                    list.value(r)
                        .as_primitive::<Float32Type>()
                        .values()
                        .to_vec(),
                );
            }
        }
        (summary, vectors)
    }

    #[tokio::test]
    async fn a_rerun_encodes_only_what_changed() {
        let weights = tempfile::tempdir().unwrap();
        write_random(weights.path(), CONFIG, &WORDS, 3);
        let job = |max_tokens: usize| {
            Job::parse(
                &format!(
                    "[text]\nenabled = true\nweights = {:?}\nmax_tokens = {max_tokens}\n",
                    weights.path().display().to_string()
                ),
                "t",
                None,
                &[],
            )
            .unwrap()
        };
        let run = memory_run();

        let (first, vectors) = step(&job(32), &run, "Toy Story").await;
        assert_eq!((first.items, first.encoded, first.reused), (3, 3, 0));
        // Item 3 has no title, year or genre: empty text, zero vector.
        assert_eq!(first.empty, 1);
        assert!(vectors[2].iter().all(|&v| v == 0.0));
        // Each vector is the encoder's own for the SQL's text.
        let encoder = BertEncoder::load(weights.path(), 32, &candle_core::Device::Cpu).unwrap();
        let want = encoder
            .encode(&["Toy Story (1995). Genres: Animation, Comedy", "1995"])
            .unwrap();
        for (got, want) in vectors[..2].iter().flatten().zip(&want.vectors) {
            assert!((got - want).abs() < 1e-6);
        }

        // The same texts again: nothing is encoded.
        let (again, same) = step(&job(32), &run, "Toy Story").await;
        assert_eq!(
            (again.encoded, again.reused, again.other_encoder),
            (0, 3, 0)
        );
        assert_eq!(same, vectors);

        // One title changed: that item alone.
        let (changed, after) = step(&job(32), &run, "Heat").await;
        assert_eq!((changed.encoded, changed.reused), (1, 2));
        assert_ne!(after[0], vectors[0]);
        assert_eq!(after[1..], vectors[1..]);

        // Another encoder identity (a new window): every item again, and said.
        let (other, _) = step(&job(4), &run, "Heat").await;
        assert_eq!(
            (other.encoded, other.reused, other.other_encoder),
            (3, 0, 3)
        );
        assert_eq!(other.truncated, 1);
        assert_ne!(other.encoder, changed.encoder);
    }

    #[tokio::test]
    async fn missing_weights_stop_the_step_before_anything_is_written() {
        let job = Job::parse(
            "[text]\nenabled = true\nweights = \"/nonexistent/minilm\"\n",
            "t",
            None,
            &[],
        )
        .unwrap();
        let run = memory_run();
        let ctx = with_items(&run, "Toy Story");
        let sql = include_str!("../../../sql/item_text.sql");
        let err = encode_item_text(&job, &run, &ctx, ("item_text.sql", sql), &Vec::new())
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains("/nonexistent/minilm/config.json"),
            "{err}"
        );
        let rel = format!("features/{ITEM_TEXT_EMBEDDINGS_TABLE}.parquet");
        assert!(run.lake().head(&run.rel(&rel)).await.unwrap().is_none());
        // Without an items table: exit 2, saying so.
        let err = encode_item_text(
            &job,
            &run,
            &SessionContext::new(),
            ("item_text.sql", sql),
            &Vec::new(),
        )
        .await
        .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("items"), "{err}");
    }

    #[tokio::test]
    async fn a_text_sql_that_repeats_an_item_is_refused() {
        let job = Job::parse("[text]\nenabled = true\n", "t", None, &[]).unwrap();
        let run = memory_run();
        let ctx = with_items(&run, "Toy Story");
        let twice =
            "SELECT item_id, title AS text FROM items UNION ALL SELECT item_id, 'x' FROM items";
        let err = encode_item_text(&job, &run, &ctx, ("twice.sql", twice), &Vec::new())
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), 3);
        assert!(
            err.to_string().contains("twice.sql") && err.to_string().contains("item_id"),
            "{err}"
        );
        let no_text = "SELECT item_id FROM items";
        let err = encode_item_text(&job, &run, &ctx, ("no_text.sql", no_text), &Vec::new())
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("no_text.sql"), "{err}");
    }
}
