//! Soft labels: a trained SASRec model's top-K items and logits at the last
//! `m` positions of every user's train sequence, streamed batch by batch to
//! `soft_labels/<model>.parquet` (schemas/soft_labels.json) with each user's
//! rows in one row group, and streamed back row group by row group —
//! checked against the reader's catalogue, K and temperature — into the
//! models distilled from them.
//!
//! Position `p` of a user with `L` train items is the prediction of train
//! item `p` (0-based) from the items before it; position `L` predicts the
//! next, unseen item. Positions before `L` are scored in the window the
//! model trained on (its last `max_len` inputs, without the last item),
//! position `L` in the window recommendations use (ending with the last
//! item). Besides the top-K logits `z`, each row keeps
//! `rest_logit = T · ln Σ exp(z_j / T)` over every other item, so the
//! teacher's distribution over the K items plus "the rest of the catalogue"
//! is exact at the file's temperature `T`.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Float32Array, Int32Array, ListArray, RecordBatch, StringArray,
    UInt32Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::compute::{cast, take};
use arrow::datatypes::{DataType, Field, Float32Type, Int32Type, Schema, SchemaRef, UInt32Type};
use futures::StreamExt;
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::arrow::arrow_reader::ArrowReaderMetadata;
use rayon::prelude::*;

use crate::config::DistillSpec;
use crate::dataset::Dataset;
use crate::error::{Error, Result};
use crate::lake::reader::ParquetObject;
use crate::lake::schema::contract;
use crate::lake::{RowGroups, WrittenObject};
use crate::model::ModelArtifact;
use crate::model::kernels::{View, exp_sum, matmul, par_all};
use crate::model::sasrec::cpu::{self, Workspace};
use crate::model::sasrec::{PAD, SasRec};
use crate::model::score::top_k;
use crate::run::RunFolder;
use crate::run::shard::Shard;
use crate::train::{
    GroupOrder, LabelInfo, LabelSource, SoftRows, fill_window, target_position, thread_pool,
};

/// Metadata key: K, the length of every list.
pub const META_K: &str = "recdistill.soft_labels.k";
/// Metadata key: the temperature `rest_logit` was computed at.
pub const META_TEMPERATURE: &str = "recdistill.soft_labels.temperature";
/// Metadata key: the producing model's name.
pub const META_MODEL: &str = "recdistill.soft_labels.model";
/// Metadata key: SHA-256 of the producing model's artifact.
pub const META_MODEL_SHA256: &str = "recdistill.soft_labels.model_sha256";
/// Metadata key: the catalogue size the item indices refer to.
pub const META_N_ITEMS: &str = "recdistill.soft_labels.n_items";

/// Users scored at once.
const USERS_PER_BATCH: usize = 64;
/// Positions whose logits exist at once.
const ROWS_PER_BLOCK: usize = 512;
/// Rows after which a row group ends (at the next batch of whole users):
/// what a reader holds at once, besides its shuffle buffer.
const ROWS_PER_GROUP: usize = 16_384;

/// Where `model`'s soft labels live in a run folder.
pub fn soft_labels_path(model: &str) -> String {
    format!("soft_labels/{model}.parquet")
}

/// Schema of a soft-label file for the given id types.
pub fn soft_labels_schema(user_id: &DataType, item_id: &DataType) -> SchemaRef {
    let list = |t: DataType| DataType::List(Arc::new(Field::new_list_field(t, false)));
    Arc::new(Schema::new(vec![
        Field::new("user_id", user_id.clone(), false),
        Field::new("position", DataType::Int32, false),
        Field::new("items", list(DataType::UInt32), false),
        Field::new("item_ids", list(item_id.clone()), false),
        Field::new("logits", list(DataType::Float32), false),
        Field::new("rest_logit", DataType::Float32, false),
        Field::new("model", DataType::Utf8, false),
    ]))
}

/// What to emit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoftLabelSettings {
    /// Items per list (at most the catalogue).
    pub k: usize,
    /// Temperature of `rest_logit`.
    pub temperature: f32,
    /// The last `positions` positions of each user; 0 for the model's `max_len`.
    pub positions: usize,
}

impl SoftLabelSettings {
    /// The labels read by chain link `link` (0-based, in
    /// [`DistillSpec::links`] order), emitted at its temperature. The
    /// source teacher's labels are read by link 0 and by the students
    /// distilled directly from the teacher.
    pub fn for_link(spec: &DistillSpec, link: usize) -> SoftLabelSettings {
        SoftLabelSettings {
            k: spec.k,
            temperature: spec.temperature_of(spec.links()[link]),
            positions: spec.positions,
        }
    }

    /// The source teacher's labels: those of link 0.
    pub fn for_source(spec: &DistillSpec) -> SoftLabelSettings {
        SoftLabelSettings::for_link(spec, 0)
    }

    /// What a reader of these labels expects of the file.
    pub fn expected(&self) -> Expected {
        Expected {
            k: self.k,
            temperature: self.temperature,
        }
    }
}

/// The positions `model` labels for a user with `train_len` train items:
/// the last `m` of `1..=train_len` that fit its window.
fn labelled_positions(
    train_len: usize,
    max_len: usize,
    m: usize,
) -> std::ops::RangeInclusive<usize> {
    let m = if m == 0 { max_len } else { m.min(max_len) };
    (train_len + 1).saturating_sub(m).max(1)..=train_len
}

/// The users a shard labels: its share of the `USERS_PER_BATCH`-user
/// batches, so the shards' batches are the unsharded stage's batches.
pub fn shard_users(n_users: usize, shard: Option<Shard>) -> Range<usize> {
    let Some(shard) = shard else {
        return 0..n_users;
    };
    let batches = shard.units(n_users.div_ceil(USERS_PER_BATCH));
    (batches.start * USERS_PER_BATCH).min(n_users)..(batches.end * USERS_PER_BATCH).min(n_users)
}

/// Runs `model` over the train sequences of `users`, `USERS_PER_BATCH`
/// users at a time, handing each batch of soft-label rows to `sink`.
#[allow(clippy::too_many_arguments)]
pub fn label_users(
    model: &SasRec,
    name: &str,
    dataset: &Dataset,
    users: Range<usize>,
    settings: &SoftLabelSettings,
    schema: &SchemaRef,
    mut sink: impl FnMut(RecordBatch) -> Result<()>,
) -> Result<usize> {
    let c = model.config;
    let (len, d, n_items) = (c.max_len, c.d_model, c.n_items);
    let k = settings.k.min(n_items);
    let t = settings.temperature;
    let table = model.item_table();
    let mut ws = Workspace::new(&c, USERS_PER_BATCH);
    let mut inputs = vec![PAD; USERS_PER_BATCH * len];
    let not_excluded = vec![false; n_items];
    let mut logits = vec![0.0f32; ROWS_PER_BLOCK * n_items];
    let mut targets = vec![PAD; USERS_PER_BATCH * len];
    let mut rows_total = 0;
    let users: Vec<usize> = users.collect();
    for chunk in users.chunks(USERS_PER_BATCH) {
        let b = chunk.len();
        let trains: Vec<Vec<u32>> = chunk.iter().map(|&u| dataset.train_items(u)).collect();
        // (user, position, hidden state) of every position to label.
        let mut wanted: Vec<(usize, usize, Vec<f32>)> = Vec::new();
        // Positions before the last: the training window, the view the
        // model learned them in (and the student learns them in).
        for (slot, train) in trains.iter().enumerate() {
            let span = slot * len..(slot + 1) * len;
            fill_window(train, &mut inputs[span.clone()], &mut targets[span]);
        }
        cpu::forward(model, &table, &mut ws, &inputs[..b * len], b, None);
        for (slot, (&u, train)) in chunk.iter().zip(&trains).enumerate() {
            let labelled = labelled_positions(train.len(), len, settings.positions);
            for i in 0..len {
                if let Some(p) = target_position(train.len(), len, i)
                    && labelled.contains(&p)
                {
                    let hidden = ws.hidden(slot * len + i).ok_or_else(|| {
                        Error::internal("a labelled position without an input item")
                    })?;
                    wanted.push((u, p, hidden.to_vec()));
                }
            }
        }
        // The last position: the recommendation-time window, ending with
        // the last train item.
        for (slot, train) in trains.iter().enumerate() {
            cpu::window_into(train, &mut inputs[slot * len..(slot + 1) * len]);
        }
        cpu::forward(model, &table, &mut ws, &inputs[..b * len], b, None);
        for (slot, (&u, train)) in chunk.iter().zip(&trains).enumerate() {
            if !train.is_empty() {
                wanted.push((u, train.len(), ws.last_hidden(slot).to_vec()));
            }
        }
        if wanted.is_empty() {
            continue;
        }
        wanted.sort_by_key(|(u, p, _)| (*u, *p));
        let mut user_idx = Vec::with_capacity(wanted.len());
        let mut positions = Vec::with_capacity(wanted.len());
        let mut top_items = Vec::with_capacity(wanted.len() * k);
        let mut top_logits = Vec::with_capacity(wanted.len() * k);
        let mut rest = Vec::with_capacity(wanted.len());
        let mut hidden = vec![0.0f32; ROWS_PER_BLOCK * d];
        for block in wanted.chunks(ROWS_PER_BLOCK) {
            for (r, (_, _, h)) in block.iter().enumerate() {
                hidden[r * d..(r + 1) * d].copy_from_slice(h);
            }
            let n = block.len();
            let out = &mut logits[..n * n_items];
            matmul(
                out,
                n_items,
                View::rm(&hidden[..n * d], n, d),
                View::rm(&table, n_items, d).t(),
                false,
                1.0,
                par_all(),
            );
            // Per row, in parallel: the top K, then the rest of the
            // catalogue's mass with the top K masked out.
            let labelled: Vec<(Vec<(u32, f32)>, f32)> = out
                .par_chunks_mut(n_items)
                .map(|row| {
                    let top = top_k(row, &not_excluded, k);
                    let max = top.first().map_or(f32::NEG_INFINITY, |(_, s)| *s);
                    for &(i, _) in &top {
                        row[i as usize] = f32::NEG_INFINITY;
                    }
                    let rest_sum = if max.is_finite() {
                        exp_sum(row, max, 1.0 / t)
                    } else {
                        0.0
                    };
                    let rest = if rest_sum > 0.0 {
                        max + t * rest_sum.ln()
                    } else {
                        f32::NEG_INFINITY
                    };
                    (top, rest)
                })
                .collect();
            for ((top, rest_logit), &(u, p, _)) in labelled.into_iter().zip(block) {
                for (i, z) in top {
                    top_items.push(i);
                    top_logits.push(z);
                }
                rest.push(rest_logit);
                user_idx.push(u as u32);
                positions.push(p as i32);
            }
        }
        for (v, name) in [(&top_logits, "logits"), (&rest, "rest_logit")] {
            if v.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
                return Err(Error::internal(format!(
                    "soft labels: the model produced non-finite {name}"
                )));
            }
        }
        rows_total += positions.len();
        sink(label_batch(
            schema, dataset, name, k, user_idx, positions, top_items, top_logits, rest,
        )?)?;
    }
    Ok(rows_total)
}

#[allow(clippy::too_many_arguments)]
fn label_batch(
    schema: &SchemaRef,
    dataset: &Dataset,
    model: &str,
    k: usize,
    users: Vec<u32>,
    positions: Vec<i32>,
    items: Vec<u32>,
    logits: Vec<f32>,
    rest: Vec<f32>,
) -> Result<RecordBatch> {
    let rows = positions.len();
    let internal = |e: arrow::error::ArrowError| Error::internal(e.to_string());
    let offsets = OffsetBuffer::from_lengths(std::iter::repeat_n(k, rows));
    let list = |values: ArrayRef| -> Result<ArrayRef> {
        let field = Arc::new(Field::new_list_field(values.data_type().clone(), false));
        Ok(Arc::new(
            ListArray::try_new(field, offsets.clone(), values, None).map_err(internal)?,
        ))
    };
    let item_indices = UInt32Array::from(items);
    let item_ids = take(&dataset.item_ids, &item_indices, None).map_err(internal)?;
    let columns: Vec<ArrayRef> = vec![
        take(&dataset.user_ids, &UInt32Array::from(users), None).map_err(internal)?,
        Arc::new(Int32Array::from(positions)),
        list(Arc::new(item_indices))?,
        list(item_ids)?,
        list(Arc::new(Float32Array::from(logits)))?,
        Arc::new(Float32Array::from(rest)),
        Arc::new(StringArray::from(vec![model; rows])),
    ];
    RecordBatch::try_new(Arc::clone(schema), columns).map_err(internal)
}

/// Streams the soft labels of `artifact` (a SASRec model) to
/// `soft_labels/<name>.parquet`; returns the file and the rows written.
pub async fn write_soft_labels(
    run: &RunFolder,
    dataset: Arc<Dataset>,
    artifact: &ModelArtifact,
    settings: SoftLabelSettings,
    threads: usize,
) -> Result<(WrittenObject, usize)> {
    let rel = soft_labels_path(&artifact.card.name);
    write_soft_label_part(run, dataset, artifact, settings, threads, None, &rel).await
}

/// Key-value metadata of a shard's part: which part (`I/N`). The joined
/// file leaves it out.
pub const META_SHARD: &str = "recdistill.soft_labels.shard";

/// [`write_soft_labels`] for the users of `shard` (all users without one),
/// to `rel` in the run folder. A part has one row group per batch of users,
/// so [`gather_soft_labels`] can give the writer the unsharded batches.
pub async fn write_soft_label_part(
    run: &RunFolder,
    dataset: Arc<Dataset>,
    artifact: &ModelArtifact,
    settings: SoftLabelSettings,
    threads: usize,
    shard: Option<Shard>,
    rel: &str,
) -> Result<(WrittenObject, usize)> {
    let model = SasRec::from_artifact(artifact)?;
    let name = artifact.card.name.clone();
    let k = settings.k.min(model.config.n_items);
    let metadata = vec![
        (META_K.to_string(), k.to_string()),
        (
            META_TEMPERATURE.to_string(),
            settings.temperature.to_string(),
        ),
        (META_MODEL.to_string(), name.clone()),
        (META_MODEL_SHA256.to_string(), artifact.sha256()),
        (META_N_ITEMS.to_string(), model.config.n_items.to_string()),
    ];
    let mut metadata = metadata;
    let groups = match shard {
        Some(shard) => {
            metadata.push((META_SHARD.to_string(), shard.to_string()));
            RowGroups::PER_BATCH
        }
        None => RowGroups::BetweenBatches {
            rows: ROWS_PER_GROUP,
        },
    };
    let users = shard_users(dataset.n_users(), shard);
    let schema = soft_labels_schema(dataset.user_ids.data_type(), dataset.item_ids.data_type());
    let producer_schema = Arc::clone(&schema);
    let producer_name = name.clone();
    let pool = thread_pool(threads)?;
    let (rows, written) = run
        .write_parquet_from(rel, schema, metadata, groups, move |sink| {
            pool.install(|| {
                label_users(
                    &model,
                    &producer_name,
                    &dataset,
                    users,
                    &settings,
                    &producer_schema,
                    sink,
                )
            })
        })
        .await?;
    tracing::info!(model = %name, rows, k, temperature = settings.temperature, "soft labels written");
    Ok((written, rows))
}

/// Joins the shards' parts `parts` (in shard order, relative to the run
/// folder) into the soft-label file `rel`, byte for byte the file the
/// unsharded stage writes.
pub async fn gather_soft_labels(
    run: &RunFolder,
    parts: &[String],
    rel: &str,
) -> Result<WrittenObject> {
    let parts: Vec<String> = parts.iter().map(|p| run.rel(p)).collect();
    let mut written = run
        .lake()
        .concat_parquet(
            &parts,
            &run.rel(rel),
            &[META_SHARD],
            RowGroups::BetweenBatches {
                rows: ROWS_PER_GROUP,
            },
        )
        .await?;
    written.path = rel.to_string();
    Ok(written)
}

/// What a reader expects of a soft-label file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Expected {
    /// Items per list.
    pub k: usize,
    /// Temperature the reader's loss runs at.
    pub temperature: f32,
}

/// A soft-label file in the lake, checked once when opened and then
/// streamed row group by row group (in an order each epoch shuffles), never
/// held whole. The soft-labels stage writes a user's rows into one row
/// group, so a group is a set of whole users. Clones share the checked
/// footer and read the file independently.
#[derive(Clone)]
pub struct SoftLabelFile {
    info: LabelInfo,
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    size: u64,
    metadata: ArrowReaderMetadata,
    runtime: tokio::runtime::Handle,
    dataset: Arc<Dataset>,
    user_index: Arc<HashMap<String, u32>>,
    order: GroupOrder,
}

impl std::fmt::Debug for SoftLabelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftLabelFile")
            .field("info", &self.info)
            .field("row_groups", &self.row_groups())
            .finish()
    }
}

/// Opens the soft labels at `rel` in the run folder and checks them against
/// `dataset` (catalogue, item ids, users, positions) and `expected`, reading
/// every row group once; any mismatch is refused with exit 3, naming the
/// file, the column and the rule.
pub async fn open_soft_labels(
    run: &RunFolder,
    rel: &str,
    dataset: &Arc<Dataset>,
    expected: Expected,
) -> Result<SoftLabelFile> {
    let location = run.url_of(rel);
    let bad = |msg: String| Error::data(&location, msg);
    let lake = run.lake();
    let Some(head) = lake.head(&run.rel(rel)).await? else {
        return Err(bad(
            "no such file: run the soft-labels stage (or the link that emits it) first".into(),
        ));
    };
    let store = lake.store();
    let path = lake.path(&run.rel(rel));
    let mut reader = ParquetObject::new(Arc::clone(&store), path.clone(), head.size);
    let metadata = ArrowReaderMetadata::load_async(&mut reader, Default::default())
        .await
        .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;

    let schema = metadata.schema().clone();
    let problems = contract("soft_labels")?.output_mismatches(
        &schema,
        dataset.user_ids.data_type(),
        dataset.item_ids.data_type(),
    );
    if !problems.is_empty() {
        return Err(bad(format!(
            "does not match schemas/soft_labels.json: {}",
            problems.join("; ")
        )));
    }
    let kv: HashMap<String, String> = metadata
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| {
            kv.iter()
                .filter_map(|e| e.value.clone().map(|v| (e.key.clone(), v)))
                .collect()
        })
        .unwrap_or_default();
    let get = |key: &str| {
        kv.get(key)
            .cloned()
            .ok_or_else(|| bad(format!("no {key} in the Parquet key-value metadata")))
    };
    let parse_err = |key: &str, v: &str| bad(format!("metadata {key} = {v:?} is not a number"));
    let k_text = get(META_K)?;
    let k: usize = k_text.parse().map_err(|_| parse_err(META_K, &k_text))?;
    let t_text = get(META_TEMPERATURE)?;
    let temperature: f32 = t_text
        .parse()
        .map_err(|_| parse_err(META_TEMPERATURE, &t_text))?;
    let n_text = get(META_N_ITEMS)?;
    let n_items: usize = n_text
        .parse()
        .map_err(|_| parse_err(META_N_ITEMS, &n_text))?;
    let model = get(META_MODEL)?;
    let model_sha256 = get(META_MODEL_SHA256)?;
    if n_items != dataset.n_items() {
        return Err(bad(format!(
            "soft labels of {model} index a catalogue of {n_items} items, but this run's item_map has {}; emit them again from a model of this run",
            dataset.n_items()
        )));
    }
    let want_k = expected.k.min(n_items);
    if k != want_k {
        return Err(bad(format!(
            "soft labels hold the top {k} items, but distill.k asks for {want_k}"
        )));
    }
    if temperature != expected.temperature {
        return Err(bad(format!(
            "soft labels were produced at temperature {temperature}, but the link distils at {}; emit them at its temperature",
            expected.temperature
        )));
    }
    let groups = metadata.metadata().num_row_groups();
    let file = SoftLabelFile {
        info: LabelInfo {
            k,
            temperature,
            model,
            model_sha256,
            location: location.clone(),
        },
        store,
        path,
        size: head.size,
        metadata,
        runtime: tokio::runtime::Handle::current(),
        dataset: Arc::clone(dataset),
        user_index: Arc::new(user_index(dataset)?),
        order: GroupOrder::new(groups),
    };
    // Every row group once, in file order: each user's rows in one group.
    let mut group_of = vec![u32::MAX; dataset.n_users()];
    for g in 0..groups {
        let rows = file.group(g).await?;
        for i in 0..rows.users() {
            let (user, _) = rows.user(i);
            let first = &mut group_of[user as usize];
            if *first != u32::MAX {
                return Err(bad(format!(
                    "column `user_id`: the rows of user {} are split, in row groups {} and {g}: a user's soft labels must be together in one row group, positions ascending (write them again with the soft-labels stage)",
                    user_label(dataset, user),
                    *first
                )));
            }
            *first = g as u32;
        }
    }
    Ok(file)
}

impl SoftLabelFile {
    /// Row groups in the file.
    pub fn row_groups(&self) -> usize {
        self.metadata.metadata().num_row_groups()
    }

    /// Rows in the file.
    pub fn rows(&self) -> usize {
        let meta = self.metadata.metadata();
        (0..meta.num_row_groups())
            .map(|g| meta.row_group(g).num_rows() as usize)
            .sum()
    }

    /// Reads and checks row group `g`: its rows, grouped by user.
    pub async fn group(&self, g: usize) -> Result<SoftRows> {
        let location = &self.info.location;
        let bad = |msg: String| Error::data(location, msg);
        let reader = ParquetObject::new(Arc::clone(&self.store), self.path.clone(), self.size);
        let mut stream =
            ParquetRecordBatchStreamBuilder::new_with_metadata(reader, self.metadata.clone())
                .with_row_groups(vec![g])
                .build()
                .map_err(|e| bad(format!("cannot read row group {g}: {e}")))?;
        let mut rows = SoftRows::new(self.info.k);
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| bad(format!("cannot read row group {g}: {e}")))?;
            let names = cast(batch.column(6), &DataType::Utf8)
                .map_err(|e| Error::internal(e.to_string()))?;
            if let Some(other) = names
                .as_string::<i32>()
                .iter()
                .flatten()
                .find(|n| *n != self.info.model)
            {
                return Err(bad(format!(
                    "column `model`: row of model {other:?} in soft labels of {:?}",
                    self.info.model
                )));
            }
            check_batch(
                &batch,
                &self.dataset,
                self.info.k,
                &self.user_index,
                location,
                |u, p, its, ls, r| {
                    rows.push(u, p, its, ls, r).map_err(|rule| {
                        bad(format!(
                            "column `position`: user {}: {rule}",
                            user_label(&self.dataset, u)
                        ))
                    })
                },
            )?;
        }
        Ok(rows)
    }
}

impl LabelSource for SoftLabelFile {
    fn info(&self) -> &LabelInfo {
        &self.info
    }

    fn start_epoch(&mut self, seed: u64) -> Result<()> {
        self.order.start_epoch(seed);
        Ok(())
    }

    fn next_group(&mut self) -> Result<Option<SoftRows>> {
        let Some(g) = self.order.next_group() else {
            return Ok(None);
        };
        // Training runs on a blocking thread; the read is the runtime's.
        self.runtime.block_on(self.group(g)).map(Some)
    }
}

/// The source teacher's soft labels, opened from the run at the
/// temperature they were emitted with (the first link's).
pub async fn open_source_labels(
    spec: &DistillSpec,
    run: &RunFolder,
    dataset: &Arc<Dataset>,
) -> Result<SoftLabelFile> {
    let expected = SoftLabelSettings::for_source(spec).expected();
    open_soft_labels(run, &soft_labels_path(&spec.source), dataset, expected).await
}

/// Dataset user index by original id (as text, whatever the id type).
fn user_index(dataset: &Dataset) -> Result<HashMap<String, u32>> {
    let ids =
        cast(&dataset.user_ids, &DataType::Utf8).map_err(|e| Error::internal(e.to_string()))?;
    Ok(ids
        .as_string::<i32>()
        .iter()
        .enumerate()
        .filter_map(|(i, id)| id.map(|id| (id.to_string(), i as u32)))
        .collect())
}

fn user_label(dataset: &Dataset, user: u32) -> String {
    cast(&dataset.user_ids.slice(user as usize, 1), &DataType::Utf8)
        .ok()
        .and_then(|a| a.as_string_opt::<i32>().map(|s| s.value(0).to_string()))
        .unwrap_or_else(|| format!("#{user}"))
}

/// Checks one batch row by row and hands each row (user index, position,
/// items, logits, rest logit) to `row`.
fn check_batch(
    batch: &RecordBatch,
    dataset: &Dataset,
    k: usize,
    user_index: &HashMap<String, u32>,
    location: &str,
    mut row: impl FnMut(u32, u32, &[u32], &[f32], f32) -> Result<()>,
) -> Result<()> {
    let bad =
        |column: &str, msg: String| Error::data(location, format!("column `{column}`: {msg}"));
    for (i, column) in batch.columns().iter().enumerate() {
        if column.null_count() > 0 {
            return Err(bad(
                batch.schema().field(i).name(),
                "has nulls; every value is required".into(),
            ));
        }
    }
    let internal = |e: arrow::error::ArrowError| Error::internal(e.to_string());
    let user_ids = cast(batch.column(0), &DataType::Utf8).map_err(internal)?;
    let user_ids = user_ids.as_string::<i32>();
    let positions = batch.column(1).as_primitive::<Int32Type>();
    let lists: Vec<&ListArray> = (2..5).map(|i| batch.column(i).as_list::<i32>()).collect();
    let rest = cast(batch.column(5), &DataType::Float32).map_err(internal)?;
    let rest = rest.as_primitive::<Float32Type>();
    for (name, list) in ["items", "item_ids", "logits"].iter().zip(&lists) {
        if let Some(len) = list.offsets().lengths().find(|&l| l != k) {
            return Err(bad(name, format!("a list of {len} values; K is {k}")));
        }
        if list.values().null_count() > 0 {
            return Err(bad(name, "has null values inside its lists".into()));
        }
    }
    let flat = |list: &ListArray| {
        let start = list.offsets()[0] as usize;
        list.values().slice(start, list.len() * k)
    };
    let items = flat(lists[0]);
    let items = items.as_primitive::<UInt32Type>().values();
    let n_items = dataset.n_items() as u32;
    if let Some(bad_item) = items.iter().find(|&&i| i >= n_items) {
        return Err(bad(
            "items",
            format!("item index {bad_item} is outside this run's catalogue of {n_items} items"),
        ));
    }
    // The ids must be this run's ids of those indices: same item index.
    let ids = flat(lists[1]);
    let want_ids =
        take(&dataset.item_ids, &UInt32Array::from(items.to_vec()), None).map_err(internal)?;
    if ids.as_ref() != want_ids.as_ref() {
        return Err(bad(
            "item_ids",
            "the item ids do not match this run's item_map at the given item indices: the labels come from another catalogue"
                .into(),
        ));
    }
    let logits = cast(&flat(lists[2]), &DataType::Float32).map_err(internal)?;
    let logits = logits.as_primitive::<Float32Type>().values();
    if logits.iter().any(|v| !v.is_finite()) {
        return Err(bad("logits", "holds a non-finite value".into()));
    }
    if rest
        .values()
        .iter()
        .any(|v| v.is_nan() || *v == f32::INFINITY)
    {
        return Err(bad("rest_logit", "holds NaN or +inf".into()));
    }
    let mut seen = Vec::with_capacity(k);
    for r in 0..batch.num_rows() {
        let id = user_ids.value(r);
        let &u = user_index.get(id).ok_or_else(|| {
            bad(
                "user_id",
                format!("user {id} is not in this run's user_map"),
            )
        })?;
        let p = positions.value(r);
        let train_len = dataset.train_items(u as usize).len();
        if p < 1 || p as usize > train_len {
            return Err(bad(
                "position",
                format!(
                    "user {id} has position {p}, outside 1..={train_len} (the user's train items)"
                ),
            ));
        }
        let its = &items[r * k..(r + 1) * k];
        seen.clear();
        seen.extend_from_slice(its);
        seen.sort_unstable();
        if seen.windows(2).any(|w| w[0] == w[1]) {
            return Err(bad(
                "items",
                format!("user {id}, position {p}: an item appears twice in the list"),
            ));
        }
        row(u, p as u32, its, &logits[r * k..(r + 1) * k], rest.value(r))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LakeSpec;
    use crate::lake::Lake;
    use crate::model::Scorer;
    use crate::model::sasrec::SasRecConfig;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn model() -> SasRec {
        let config = SasRecConfig {
            n_items: 12,
            d_model: 8,
            layers: 1,
            heads: 2,
            ffn: 8,
            max_len: 8,
            dropout: 0.0,
            content_dim: 0,
        };
        let mut m = SasRec::new(config, Vec::new(), 3).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        for t in m.weights.tensors_mut() {
            t.iter_mut().for_each(|v| *v += rng.random_range(-0.5..0.5));
        }
        m
    }

    fn run(name: &str) -> RunFolder {
        let lake = Lake::open(&LakeSpec {
            url: format!("memory://{name}"),
            ..Default::default()
        })
        .unwrap();
        RunFolder::new(lake, "out", "job", chrono::NaiveDate::default())
    }

    /// Every row of `file`, in file order.
    async fn all_rows(file: &SoftLabelFile) -> SoftRows {
        let mut all = SoftRows::new(file.info().k);
        for g in 0..file.row_groups() {
            let rows = file.group(g).await.unwrap();
            for i in 0..rows.users() {
                let (user, range) = rows.user(i);
                for r in range {
                    all.push_row(user, &rows, r);
                }
            }
        }
        all
    }

    /// The row of user `user` at `position`.
    fn find(rows: &SoftRows, user: usize, position: usize) -> Option<usize> {
        (0..rows.users())
            .find(|&i| rows.user(i).0 == user as u32)
            .and_then(|i| rows.row(i, position))
    }

    const SEQUENCES: [&[u32]; 4] = [&[1, 2, 3, 4], &[5, 6], &[7], &[0, 3, 5, 7, 9, 11]];

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn soft_labels_round_trip_and_hold_the_models_top_k() {
        let sequences: Vec<Vec<u32>> = SEQUENCES.iter().map(|s| s.to_vec()).collect();
        let dataset = Arc::new(Dataset::from_train_sequences(12, &sequences));
        let m = model();
        let artifact = m
            .to_artifact("teacher", "teacher", "supervised", "ce", None)
            .unwrap();
        let run = run("soft-labels-round-trip");
        let settings = SoftLabelSettings {
            k: 4,
            temperature: 2.0,
            positions: 0,
        };
        let (written, rows) = write_soft_labels(&run, Arc::clone(&dataset), &artifact, settings, 1)
            .await
            .unwrap();
        assert_eq!(written.path, "soft_labels/teacher.parquet");
        // Every position 1..=L of every user: 4 + 2 + 1 + 6.
        assert_eq!(rows, 13);
        let expected = Expected {
            k: 4,
            temperature: 2.0,
        };
        let file = open_soft_labels(&run, &written.path, &dataset, expected)
            .await
            .unwrap();
        let labels = all_rows(&file).await;
        assert_eq!(labels.len(), 13);
        assert_eq!(file.info().model, "teacher");
        assert_eq!(file.info().model_sha256, artifact.sha256());
        let excluded = vec![false; 12];
        let candle =
            crate::model::sasrec::candle::CandleSasRec::from_model(&m, &candle_core::Device::Cpu)
                .unwrap();
        let table = candle.item_table().unwrap();
        for (u, sequence) in SEQUENCES.iter().enumerate() {
            assert!(find(&labels, u, 0).is_none());
            // Positions before the last: the training window, scored by the candle model.
            let (mut inputs, mut targets) = (vec![PAD; 8], vec![PAD; 8]);
            fill_window(sequence, &mut inputs, &mut targets);
            let hidden = candle.hidden(&table, &inputs, 1, false).unwrap();
            let window_scores: Vec<Vec<f32>> = hidden
                .squeeze(0)
                .unwrap()
                .matmul(&table.t().unwrap())
                .unwrap()
                .to_vec2()
                .unwrap();
            for p in 1..=sequence.len() {
                let scores = if p < sequence.len() {
                    let slot = (0..8)
                        .find(|&i| target_position(sequence.len(), 8, i) == Some(p))
                        .unwrap();
                    window_scores[slot].clone()
                } else {
                    // The last: the model's ranking for recommendations.
                    let mut scores = Vec::new();
                    m.score(&[sequence], &mut scores).unwrap();
                    scores
                };
                let target = labels.target(find(&labels, u, p).unwrap());
                let top = top_k(&scores, &excluded, 4);
                let items: Vec<u32> = top.iter().map(|(i, _)| *i).collect();
                assert_eq!(target.items, &items[..], "user {u} position {p}");
                for ((_, want), got) in top.iter().zip(target.logits) {
                    assert!((want - got).abs() < 1e-4, "{want} vs {got}");
                }
                let rest: f64 = (0..12)
                    .filter(|i| !items.contains(&(*i as u32)))
                    .map(|i| (f64::from(scores[i]) / 2.0).exp())
                    .sum();
                let want_rest = 2.0 * rest.ln();
                assert!((f64::from(target.rest) - want_rest).abs() < 1e-3);
            }
            assert!(find(&labels, u, sequence.len() + 1).is_none());
        }

        // A reader expecting another K or temperature, or with another
        // catalogue, is refused (exit 3) naming the file.
        let refused = [
            (Expected { k: 5, ..expected }, Arc::clone(&dataset)),
            (
                Expected {
                    temperature: 1.0,
                    ..expected
                },
                Arc::clone(&dataset),
            ),
            (
                expected,
                Arc::new(Dataset::from_train_sequences(13, &sequences)),
            ),
        ];
        for (expected, data) in refused {
            let err = open_soft_labels(&run, &written.path, &data, expected)
                .await
                .unwrap_err();
            assert_eq!(err.exit_code(), crate::error::exit_code::DATA, "{err}");
            assert!(
                err.to_string().contains("soft_labels/teacher.parquet"),
                "{err}"
            );
        }
        let missing = open_soft_labels(&run, "soft_labels/nobody.parquet", &dataset, expected)
            .await
            .unwrap_err();
        assert_eq!(missing.exit_code(), crate::error::exit_code::DATA);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_last_m_positions_only() {
        let sequences: Vec<Vec<u32>> = SEQUENCES.iter().map(|s| s.to_vec()).collect();
        let dataset = Arc::new(Dataset::from_train_sequences(12, &sequences));
        let artifact = model()
            .to_artifact("teacher", "teacher", "supervised", "ce", None)
            .unwrap();
        let run = run("soft-labels-last-m");
        let settings = SoftLabelSettings {
            k: 3,
            temperature: 1.0,
            positions: 2,
        };
        let (written, rows) = write_soft_labels(&run, Arc::clone(&dataset), &artifact, settings, 1)
            .await
            .unwrap();
        // min(2, L) positions per user: 2 + 2 + 1 + 2.
        assert_eq!(rows, 7);
        let file = open_soft_labels(
            &run,
            &written.path,
            &dataset,
            Expected {
                k: 3,
                temperature: 1.0,
            },
        )
        .await
        .unwrap();
        let labels = all_rows(&file).await;
        assert!(
            find(&labels, 0, 2).is_none()
                && find(&labels, 0, 3).is_some()
                && find(&labels, 0, 4).is_some()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn split_or_unordered_users_and_truncated_files_are_refused() {
        use crate::error::exit_code::DATA;
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let sequences: Vec<Vec<u32>> = SEQUENCES.iter().map(|s| s.to_vec()).collect();
        let dataset = Arc::new(Dataset::from_train_sequences(12, &sequences));
        let artifact = model()
            .to_artifact("teacher", "teacher", "supervised", "ce", None)
            .unwrap();
        let run = run("soft-labels-damaged");
        let settings = SoftLabelSettings {
            k: 3,
            temperature: 1.0,
            positions: 0,
        };
        let (written, _) = write_soft_labels(&run, Arc::clone(&dataset), &artifact, settings, 1)
            .await
            .unwrap();
        let expected = settings.expected();
        open_soft_labels(&run, &written.path, &dataset, expected)
            .await
            .unwrap();
        let bytes = run.get(&written.path).await.unwrap();
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes.clone()).unwrap();
        let metadata: Vec<(String, String)> = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .unwrap()
            .iter()
            .filter(|kv| kv.key.starts_with("recdistill."))
            .map(|kv| (kv.key.clone(), kv.value.clone().unwrap()))
            .collect();
        let batches: Vec<RecordBatch> = builder.build().unwrap().map(|b| b.unwrap()).collect();
        let all = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
        let schema = all.schema();
        let write = |rel: &'static str, batches: Vec<RecordBatch>, groups: RowGroups| {
            let (run, metadata, schema) = (&run, metadata.clone(), Arc::clone(&schema));
            async move {
                let stream = futures::stream::iter(batches.into_iter().map(Ok));
                run.lake()
                    .write_parquet_grouped(&run.rel(rel), schema, stream, metadata, groups)
                    .await
                    .unwrap();
            }
        };
        let refused = |rel: &'static str| {
            let (run, dataset) = (&run, &dataset);
            async move {
                let err = open_soft_labels(run, rel, dataset, expected)
                    .await
                    .unwrap_err();
                assert_eq!(err.exit_code(), DATA, "{err}");
                assert!(err.to_string().contains(rel), "{err}");
                err.to_string()
            }
        };

        // One row per row group: the first user's four rows are split.
        let one_each = (0..all.num_rows()).map(|r| all.slice(r, 1)).collect();
        write(
            "soft_labels/split.parquet",
            one_each,
            RowGroups::BetweenBatches { rows: 1 },
        )
        .await;
        let err = refused("soft_labels/split.parquet").await;
        assert!(err.contains("`user_id`") && err.contains("split"), "{err}");

        // The first user's positions in reverse.
        let mut order: Vec<u32> = (0..all.num_rows() as u32).collect();
        order[..4].reverse();
        let reordered = arrow::compute::take_record_batch(&all, &UInt32Array::from(order)).unwrap();
        write(
            "soft_labels/unordered.parquet",
            vec![reordered],
            RowGroups::Bounded,
        )
        .await;
        let err = refused("soft_labels/unordered.parquet").await;
        assert!(
            err.contains("`position`") && err.contains("ascend"),
            "{err}"
        );

        // Cut short: the footer is gone.
        run.put(
            "soft_labels/truncated.parquet",
            bytes.slice(..bytes.len() - 100),
        )
        .await
        .unwrap();
        let err = refused("soft_labels/truncated.parquet").await;
        assert!(err.contains("not a readable Parquet file"), "{err}");
    }

    #[test]
    fn labelled_positions_are_the_last_m_that_fit_the_window() {
        assert_eq!(labelled_positions(10, 4, 0), 7..=10);
        assert_eq!(labelled_positions(10, 4, 2), 9..=10);
        assert_eq!(labelled_positions(10, 4, 9), 7..=10);
        assert_eq!(labelled_positions(3, 50, 0), 1..=3);
        assert!(labelled_positions(0, 50, 0).is_empty());
    }
}
