//! Deterministic synthetic interaction logs.
//!
//! - The sample shipped in `data-samples/sample/` ([`SampleSpec`];
//!   `recdistill sample --out DIR` writes it again, bit for bit). Items form
//!   a ring, and from the item a user just consumed they usually move to one
//!   of the next few items on the ring; otherwise they jump to an item drawn
//!   by popularity (Zipf-like).
//! - A log of any size ([`LogSpec`]; `recdistill sample --mean-events L`),
//!   for the scale benchmarks: Zipf popularity, taste clusters and
//!   item-to-item successions, written as `dt=` partitions of a few files
//!   each. Users are generated independently from their own seeds, in
//!   parallel, so the log is the same on any number of threads.
//!
//! Both have structure a sequential model can learn, so a next-item model
//! must beat popularity on them.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float32Array, Int32Array, Int64Array, ListBuilder, RecordBatch, StringArray,
    StringBuilder, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::artifacts::ceiling::{CEILING_KS, CeilingRow, ceiling_batch, ceiling_schema};
use crate::error::{Error, Result};
use crate::lake::{Lake, WrittenObject};

mod ceiling;

/// Shape of the sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleSpec {
    /// Users.
    pub users: usize,
    /// Items.
    pub items: usize,
    /// Seed of every random choice.
    pub seed: u64,
}

impl Default for SampleSpec {
    fn default() -> Self {
        SampleSpec {
            users: 300,
            items: 200,
            seed: 20_250_101,
        }
    }
}

/// Probability of following the ring rather than jumping.
const FOLLOW: f64 = 0.8;
/// Steps along the ring when following it, and how often each is taken.
const SAMPLE_STEPS: [usize; 3] = [1, 2, 3];
const SAMPLE_STEP_SHARE: [f64; 3] = [0.6, 0.25, 0.15];
/// 2025-01-01T00:00:00Z in microseconds.
const START_MICROS: i64 = 1_735_689_600_000_000;
const GENRES: [&str; 6] = [
    "Drama",
    "Comedy",
    "Action",
    "Documentary",
    "Animation",
    "Thriller",
];

/// Schema of the sample's (and the importer's) interactions files.
pub fn interactions_file_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Int64, false),
        Field::new("item_id", DataType::Int64, false),
        Field::new(
            "timestamp",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new("rating", DataType::Float32, true),
    ]))
}

/// Schema of items files (schemas/items.json).
pub fn items_file_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("item_id", DataType::Int64, false),
        Field::new("title", DataType::Utf8, true),
        Field::new("release_year", DataType::Int32, true),
        Field::new(
            "genres",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            true,
        ),
    ]))
}

/// One generated event.
#[derive(Debug, Clone, Copy)]
struct Event {
    user: i64,
    item: i64,
    micros: i64,
    rating: f32,
}

/// The sample's Zipf-like popularity: weight 1/(rank+1), items shuffled
/// into ranks by index.
fn sample_weights(items: usize) -> Vec<f64> {
    let n = items as i64;
    (0..n).map(|i| 1.0 / ((i * 7919 % n) + 1) as f64).collect()
}

/// Generates the events, sorted by (day, user, time, item).
fn events(spec: &SampleSpec) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let n = spec.items as i64;
    let weights = sample_weights(spec.items);
    let total: f64 = weights.iter().sum();
    let mut cumulative = Vec::with_capacity(weights.len());
    let mut acc = 0.0;
    for w in &weights {
        acc += w / total;
        cumulative.push(acc);
    }
    let draw = |rng: &mut StdRng| -> i64 {
        let x: f64 = rng.random();
        cumulative.partition_point(|&c| c < x).min(n as usize - 1) as i64
    };
    let mut out = Vec::new();
    for u in 0..spec.users as i64 {
        let length = rng.random_range(8..40);
        let mut t = START_MICROS + rng.random_range(0..60 * 86_400i64) * 1_000_000;
        let mut item = draw(&mut rng);
        for _ in 0..length {
            out.push(Event {
                user: u + 1,
                item: item + ITEM_ID_BASE,
                micros: t,
                rating: rng.random_range(1..=5) as f32,
            });
            item = if rng.random_bool(FOLLOW) {
                let step = match rng.random_range(0..100) {
                    0..60 => SAMPLE_STEPS[0],
                    60..85 => SAMPLE_STEPS[1],
                    _ => SAMPLE_STEPS[2],
                } as i64;
                (item + step) % n
            } else {
                draw(&mut rng)
            };
            t += rng.random_range(60..2 * 86_400i64) * 1_000_000;
        }
    }
    out.sort_by_key(|e| {
        (
            e.micros.div_euclid(86_400_000_000),
            e.user,
            e.micros,
            e.item,
        )
    });
    out
}

/// The sample's interactions as one batch with a `dt` column (for partitioning).
pub fn interactions_batch(spec: &SampleSpec) -> Result<RecordBatch> {
    let events = events(spec);
    let dt: Vec<String> = events
        .iter()
        .map(|e| {
            chrono::DateTime::from_timestamp_micros(e.micros)
                .map(|t| t.format("%Y-%m-%d").to_string())
                .unwrap_or_default()
        })
        .collect();
    let mut fields: Vec<Field> = interactions_file_schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new("dt", DataType::Utf8, false));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(events.iter().map(|e| e.user))),
        Arc::new(Int64Array::from_iter_values(events.iter().map(|e| e.item))),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(events.iter().map(|e| e.micros))
                .with_timezone("UTC"),
        ),
        Arc::new(Float32Array::from_iter_values(
            events.iter().map(|e| e.rating),
        )),
        Arc::new(StringArray::from(dt)),
    ];
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|e| Error::internal(e.to_string()))
}

/// The sample's items.
pub fn items_batch(spec: &SampleSpec) -> Result<RecordBatch> {
    let n = spec.items;
    let mut genres = ListBuilder::new(StringBuilder::new());
    for i in 0..n {
        genres
            .values()
            .append_value(GENRES[(i / 20) % GENRES.len()]);
        if i % 3 == 0 {
            genres
                .values()
                .append_value(GENRES[(i / 20 + 1) % GENRES.len()]);
        }
        genres.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(
            (0..n as i64).map(|i| i + ITEM_ID_BASE),
        )),
        Arc::new(StringArray::from_iter_values(
            (0..n as i64).map(|i| format!("Item {}", i + ITEM_ID_BASE)),
        )),
        Arc::new(Int32Array::from_iter_values(
            (0..n as i32).map(|i| 1990 + i % 35),
        )),
        Arc::new(genres.finish()),
    ];
    RecordBatch::try_new(items_file_schema(), columns).map_err(|e| Error::internal(e.to_string()))
}

/// Writes the sample as `interactions/` and `items/` tables under the lake
/// root, replacing what those folders held.
pub async fn write_sample(lake: &Lake, spec: &SampleSpec) -> Result<Vec<WrittenObject>> {
    let interactions = interactions_batch(spec)?;
    let mut written = lake
        .write_hive_partitions(
            "interactions",
            "dt",
            futures::stream::iter([Ok(interactions)]),
        )
        .await?;
    lake.delete_others("interactions", &written).await?;
    let items = lake
        .write_batches(
            "items/part-00000.parquet",
            items_file_schema(),
            vec![items_batch(spec)?],
            vec![],
        )
        .await?;
    written.push(items);
    lake.delete_others("items", &written).await?;
    written.push(write_ceiling(lake, &sample_ceiling(spec)).await?);
    Ok(written)
}

/// The sample's ceiling rows, in user order.
fn sample_ceiling(spec: &SampleSpec) -> Vec<CeilingRow> {
    let ranked = ceiling::sample_ranked(spec.items);
    let mut events = events(spec);
    events.sort_by_key(|e| (e.user, e.micros, e.item));
    events
        .chunk_by(|a, b| a.user == b.user)
        .filter_map(|user| {
            let items = split_order(
                user.iter()
                    .map(|e| (e.micros, (e.item - ITEM_ID_BASE) as u32)),
            )?;
            let (target, history) = items.split_last()?;
            let next = ceiling::sample_next(&ranked, history[history.len() - 1]);
            Some(ceiling::ceiling_row(
                &next,
                history,
                *target,
                user[0].user,
                ITEM_ID_BASE,
            ))
        })
        .collect()
}

/// Shape of a synthetic log of any size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogSpec {
    /// Users.
    pub users: usize,
    /// Items.
    pub items: usize,
    /// Mean events per user (at least [`LogSpec::MIN_EVENTS`]).
    pub mean_events: f64,
    /// Days the log spans, one `dt=` partition each.
    pub days: usize,
    /// Parquet files per day.
    pub files_per_day: usize,
    /// Seed of every random choice.
    pub seed: u64,
}

impl LogSpec {
    /// The fewest events a user has (a leave-one-out split needs three).
    pub const MIN_EVENTS: usize = 5;

    /// Checks the shape; the message names the flag.
    pub fn validate(&self) -> Result<()> {
        let rule = if self.users == 0 || self.users > u32::MAX as usize {
            "--users must be between 1 and 2^32-1"
        } else if self.items < 16 || self.items > u32::MAX as usize {
            "--items must be between 16 and 2^32-1"
        } else if !(self.mean_events >= Self::MIN_EVENTS as f64 && self.mean_events <= 100_000.0) {
            "--mean-events must be between 5 and 100000"
        } else if self.days == 0 || self.days > 3650 {
            "--days must be between 1 and 3650"
        } else if self.files_per_day == 0 || self.files_per_day > 1000 {
            "--files-per-day must be between 1 and 1000"
        } else {
            return Ok(());
        };
        Err(Error::config(rule))
    }

    /// Taste clusters: about 250 items each.
    fn clusters(&self) -> usize {
        (self.items / 250).clamp(4, 4096)
    }
}

/// Probabilities of a log user's next item: a succession of the last item,
/// else an item of the user's own clusters, else any item (by popularity).
const LOG_SUCCESSION: f64 = 0.5;
const LOG_OWN_CLUSTER: f64 = 0.3;
/// Of the draws from the user's own clusters, the share from the home one.
const LOG_HOME: f64 = 0.7;
/// Offsets, on the cluster's ring, of an item's three successors, and how
/// often each is taken.
const SUCCESSOR_STEPS: [usize; 3] = [1, 2, 7];
const SUCCESSOR_SHARE: [f64; 3] = [0.6, 0.25, 0.15];

/// Popularity and cluster tables of a log's catalogue.
struct Catalogue {
    /// Popularity weight of every item (Zipf: 1 / (rank + 1)).
    weight: Vec<f64>,
    /// Cumulative popularity over all items.
    cumulative: Vec<f64>,
    /// Per cluster: its items (ascending) and their cumulative popularity.
    members: Vec<Vec<u32>>,
    member_cumulative: Vec<Vec<f64>>,
    clusters: usize,
}

impl Catalogue {
    fn new(spec: &LogSpec) -> Catalogue {
        let n = spec.items;
        let clusters = spec.clusters();
        // Popularity ranks: a seeded shuffle, Zipf weights 1/(rank+1).
        let mut rank: Vec<u32> = (0..n as u32).collect();
        let mut rng = StdRng::seed_from_u64(spec.seed ^ 0x9e37_79b9_7f4a_7c15);
        for i in (1..n).rev() {
            rank.swap(i, rng.random_range(0..=i));
        }
        let weight: Vec<f64> = rank.iter().map(|&r| 1.0 / (r as f64 + 1.0)).collect();
        let mut cumulative = Vec::with_capacity(n);
        let mut acc = 0.0;
        for w in &weight {
            acc += w;
            cumulative.push(acc);
        }
        let mut members = vec![Vec::new(); clusters];
        let mut member_cumulative = vec![Vec::new(); clusters];
        for (item, w) in weight.iter().enumerate() {
            let c = item % clusters;
            let last = member_cumulative[c].last().copied().unwrap_or(0.0);
            members[c].push(item as u32);
            member_cumulative[c].push(last + w);
        }
        Catalogue {
            weight,
            cumulative,
            members,
            member_cumulative,
            clusters,
        }
    }

    fn draw_any(&self, rng: &mut StdRng) -> u32 {
        draw_cumulative(&self.cumulative, rng) as u32
    }

    fn draw_in(&self, cluster: usize, rng: &mut StdRng) -> u32 {
        self.members[cluster][draw_cumulative(&self.member_cumulative[cluster], rng)]
    }

    fn successor(&self, item: u32, rng: &mut StdRng) -> u32 {
        let x: f64 = rng.random();
        let mut step = SUCCESSOR_STEPS.len() - 1;
        let mut acc = 0.0;
        for (s, share) in SUCCESSOR_SHARE.iter().enumerate() {
            acc += share;
            if x < acc {
                step = s;
                break;
            }
        }
        self.successors(item)[step].0
    }

    /// The successors of `item` (the items [`SUCCESSOR_STEPS`] ahead on its
    /// cluster's ring), each with its share of the successions.
    fn successors(&self, item: u32) -> [(u32, f64); SUCCESSOR_STEPS.len()] {
        let ring = &self.members[item as usize % self.clusters];
        let position = item as usize / self.clusters;
        std::array::from_fn(|s| {
            (
                ring[(position + SUCCESSOR_STEPS[s]) % ring.len()],
                SUCCESSOR_SHARE[s],
            )
        })
    }

    /// Sum of every item's weight.
    fn total_weight(&self) -> f64 {
        self.cumulative.last().copied().unwrap_or(0.0)
    }

    /// Sum of the weights of cluster `c`'s items.
    fn cluster_weight(&self, c: usize) -> f64 {
        self.member_cumulative[c].last().copied().unwrap_or(0.0)
    }
}

/// Index drawn with probability proportional to the increments of `cumulative`.
fn draw_cumulative(cumulative: &[f64], rng: &mut StdRng) -> usize {
    let total = cumulative.last().copied().unwrap_or(0.0);
    let x = rng.random::<f64>() * total;
    cumulative
        .partition_point(|&c| c <= x)
        .min(cumulative.len() - 1)
}

/// One event of a log, compact (a 10 M-event log is about 240 MB of these).
#[derive(Debug, Clone, Copy, PartialEq)]
struct LogEvent {
    micros: i64,
    user: u32,
    item: u32,
    rating: u8,
}

const DAY_MICROS: i64 = 86_400_000_000;

/// One user's events in time order, from the user's own seed.
fn log_user(spec: &LogSpec, catalogue: &Catalogue, user: u32, out: &mut Vec<LogEvent>) {
    let mut rng = StdRng::seed_from_u64(
        spec.seed
            .wrapping_mul(0x2545_f491_4f6c_dd1d)
            .wrapping_add(u64::from(user).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
    );
    // Lengths: MIN_EVENTS plus an exponential tail with the requested mean.
    let tail = spec.mean_events - LogSpec::MIN_EVENTS as f64;
    let u: f64 = rng.random::<f64>().max(1e-12);
    let length = (LogSpec::MIN_EVENTS as f64 - tail * u.ln())
        .round()
        .min(spec.mean_events * 20.0) as usize;
    let home = rng.random_range(0..catalogue.clusters);
    let second = rng.random_range(0..catalogue.clusters);
    let span = spec.days as i64 * DAY_MICROS;
    let mut times: Vec<i64> = (0..length).map(|_| rng.random_range(0..span)).collect();
    times.sort_unstable();
    let mut item = catalogue.draw_in(home, &mut rng);
    for t in times {
        out.push(LogEvent {
            micros: START_MICROS + t,
            user,
            item,
            rating: rng.random_range(1..=5),
        });
        let x: f64 = rng.random();
        item = if x < LOG_SUCCESSION {
            catalogue.successor(item, &mut rng)
        } else if x < LOG_SUCCESSION + LOG_OWN_CLUSTER {
            let cluster = if rng.random_bool(LOG_HOME) {
                home
            } else {
                second
            };
            catalogue.draw_in(cluster, &mut rng)
        } else {
            catalogue.draw_any(&mut rng)
        };
    }
}

/// The log's events bucketed by day, each day sorted by (user, time), and,
/// with `ceiling`, every user's ceiling row, in user order.
fn generate_log(spec: &LogSpec, with_ceiling: bool) -> (Vec<Vec<LogEvent>>, Vec<CeilingRow>) {
    use rayon::prelude::*;
    let catalogue = Catalogue::new(spec);
    let ranked = with_ceiling.then(|| ceiling::log_ranked(&catalogue));
    let chunk = 4096;
    let chunks: Vec<(Vec<LogEvent>, Vec<CeilingRow>)> = (0..spec.users.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let mut out = Vec::new();
            let mut rows = Vec::new();
            for user in c * chunk..((c + 1) * chunk).min(spec.users) {
                let start = out.len();
                log_user(spec, &catalogue, user as u32, &mut out);
                if let Some(ranked) = &ranked
                    && let Some(row) = log_ceiling_row(&catalogue, ranked, &out[start..])
                {
                    rows.push(row);
                }
            }
            (out, rows)
        })
        .collect();
    let mut days = vec![Vec::new(); spec.days];
    let mut ceiling = Vec::new();
    for (events, rows) in chunks {
        for e in events {
            let day = ((e.micros - START_MICROS) / DAY_MICROS) as usize;
            days[day.min(spec.days - 1)].push(e);
        }
        ceiling.extend(rows);
    }
    (days, ceiling)
}

/// The ceiling row of one log user's events (in time order), or `None`
/// when the user has no leave-one-out test target (fewer than 3 events).
fn log_ceiling_row(
    catalogue: &Catalogue,
    ranked: &ceiling::Ranked,
    events: &[LogEvent],
) -> Option<CeilingRow> {
    let items = split_order(events.iter().map(|e| (e.micros, e.item)))?;
    let (target, history) = items.split_last()?;
    let next = ceiling::log_next(catalogue, ranked, history);
    let user_id = i64::from(events[0].user) + 1;
    Some(ceiling::ceiling_row(
        &next,
        history,
        *target,
        user_id,
        ITEM_ID_BASE,
    ))
}

/// One user's items in the leave-one-out split's order (time, then item
/// id), or `None` when the split gives the user no test target.
fn split_order(events: impl Iterator<Item = (i64, u32)>) -> Option<Vec<u32>> {
    let mut events: Vec<(i64, u32)> = events.collect();
    if events.len() < 3 {
        return None;
    }
    events.sort_unstable();
    Some(events.into_iter().map(|(_, item)| item).collect())
}

/// External ids, in the sample and in the logs: items from 1001, users from 1.
const ITEM_ID_BASE: i64 = 1001;

fn log_batch(events: &[LogEvent]) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(
            events.iter().map(|e| i64::from(e.user) + 1),
        )),
        Arc::new(Int64Array::from_iter_values(
            events.iter().map(|e| i64::from(e.item) + ITEM_ID_BASE),
        )),
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(events.iter().map(|e| e.micros))
                .with_timezone("UTC"),
        ),
        Arc::new(Float32Array::from_iter_values(
            events.iter().map(|e| f32::from(e.rating)),
        )),
    ];
    RecordBatch::try_new(interactions_file_schema(), columns)
        .map_err(|e| Error::internal(e.to_string()))
}

/// A log's items: genres from the item's taste cluster.
fn log_items_batch(spec: &LogSpec) -> Result<RecordBatch> {
    let n = spec.items;
    let clusters = spec.clusters();
    let mut genres = ListBuilder::new(StringBuilder::new());
    for i in 0..n {
        let c = i % clusters;
        genres.values().append_value(GENRES[c % GENRES.len()]);
        let second = GENRES[(c / GENRES.len()) % GENRES.len()];
        if second != GENRES[c % GENRES.len()] {
            genres.values().append_value(second);
        }
        genres.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(
            (0..n as i64).map(|i| i + ITEM_ID_BASE),
        )),
        Arc::new(StringArray::from_iter_values(
            (0..n).map(|i| format!("Item {}", i as i64 + ITEM_ID_BASE)),
        )),
        Arc::new(Int32Array::from_iter_values(
            (0..n).map(|i| 1990 + (i % 35) as i32),
        )),
        Arc::new(genres.finish()),
    ];
    RecordBatch::try_new(items_file_schema(), columns).map_err(|e| Error::internal(e.to_string()))
}

/// What [`write_log`] wrote.
#[derive(Debug)]
pub struct LogSummary {
    /// Events written.
    pub events: usize,
    /// Objects written (interaction files, then the items file, then the
    /// ceiling table).
    pub written: Vec<WrittenObject>,
    /// The Bayes ceiling's mean expected (HR, NDCG, MRR) at each of
    /// [`CEILING_KS`] over the users with a test target.
    pub ceiling: Vec<(u32, [f64; 3])>,
}

/// The mean expected (HR, NDCG, MRR) at each of [`CEILING_KS`].
fn ceiling_means(rows: &[CeilingRow]) -> Vec<(u32, [f64; 3])> {
    let n = rows.len().max(1) as f64;
    CEILING_KS
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            let sum = |m: usize| rows.iter().map(|r| r.expected[i][m]).sum::<f64>() / n;
            (k, [sum(0), sum(1), sum(2)])
        })
        .collect()
}

/// Writes the ceiling table `ceiling/part-00000.parquet`, replacing what
/// the folder held.
async fn write_ceiling(lake: &Lake, rows: &[CeilingRow]) -> Result<WrittenObject> {
    let object = lake
        .write_batches(
            CEILING_FILE,
            ceiling_schema(),
            vec![ceiling_batch(rows)?],
            vec![],
        )
        .await?;
    lake.delete_others("ceiling", std::slice::from_ref(&object))
        .await?;
    Ok(object)
}

/// Where a sample writes its ceiling table, relative to the lake root.
pub const CEILING_FILE: &str = "ceiling/part-00000.parquet";

/// Writes a synthetic log as `interactions/dt=YYYY-MM-DD/part-0000N.parquet`
/// (`files_per_day` files a day, rows in (user, time) order) and
/// `items/part-00000.parquet`, replacing what those folders held.
pub async fn write_log(lake: &Lake, spec: &LogSpec) -> Result<LogSummary> {
    spec.validate()?;
    let (days, ceiling) = generate_log(spec, true);
    let mut written = Vec::new();
    let mut events = 0;
    for (d, day) in days.iter().enumerate() {
        let date = chrono::DateTime::from_timestamp_micros(START_MICROS + d as i64 * DAY_MICROS)
            .map(|t| t.format("%Y-%m-%d").to_string())
            .ok_or_else(|| Error::internal("log date out of range"))?;
        events += day.len();
        for f in 0..spec.files_per_day {
            let part =
                &day[f * day.len() / spec.files_per_day..(f + 1) * day.len() / spec.files_per_day];
            let rel = format!("interactions/dt={date}/part-{f:05}.parquet");
            written.push(
                lake.write_batches(
                    &rel,
                    interactions_file_schema(),
                    vec![log_batch(part)?],
                    vec![],
                )
                .await?,
            );
        }
    }
    lake.delete_others("interactions", &written).await?;
    let items = lake
        .write_batches(
            "items/part-00000.parquet",
            items_file_schema(),
            vec![log_items_batch(spec)?],
            vec![],
        )
        .await?;
    written.push(items);
    lake.delete_others("items", &written).await?;
    written.push(write_ceiling(lake, &ceiling).await?);
    Ok(LogSummary {
        events,
        written,
        ceiling: ceiling_means(&ceiling),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_spec() -> LogSpec {
        LogSpec {
            users: 3000,
            items: 2000,
            mean_events: 20.0,
            days: 7,
            files_per_day: 2,
            seed: 7,
        }
    }

    #[test]
    fn a_log_is_deterministic_sized_and_dated_as_asked() {
        let spec = log_spec();
        let a = generate_log(&spec, false).0;
        // The same on a single thread as on the pool.
        let b = crate::train::thread_pool(1)
            .unwrap()
            .install(|| generate_log(&spec, false).0);
        assert_eq!(a, b);
        let total: usize = a.iter().map(Vec::len).sum();
        let expected = spec.users as f64 * spec.mean_events;
        assert!(
            (total as f64 - expected).abs() < 0.05 * expected,
            "{total} events, expected about {expected}"
        );
        for (d, day) in a.iter().enumerate() {
            assert!(!day.is_empty());
            assert!(
                day.iter()
                    .all(|e| (e.micros - START_MICROS) / DAY_MICROS == d as i64)
            );
            assert!(
                day.windows(2)
                    .all(|w| (w[0].user, w[0].micros) <= (w[1].user, w[1].micros))
            );
            assert!(
                day.iter()
                    .all(|e| (e.item as usize) < spec.items && (e.user as usize) < spec.users)
            );
        }
        let other = generate_log(&LogSpec { seed: 8, ..spec }, false).0;
        assert_ne!(a, other);
    }

    #[test]
    fn a_log_has_successions_clusters_and_a_popularity_head() {
        let spec = log_spec();
        let catalogue = Catalogue::new(&spec);
        let mut events = Vec::new();
        for user in 0..spec.users as u32 {
            log_user(&spec, &catalogue, user, &mut events);
        }
        let clusters = spec.clusters();
        let (mut pairs, mut successions, mut same_cluster) = (0usize, 0usize, 0usize);
        for w in events.windows(2).filter(|w| w[0].user == w[1].user) {
            pairs += 1;
            let (a, b) = (w[0].item as usize, w[1].item as usize);
            if a % clusters == b % clusters {
                same_cluster += 1;
                let ring = clusters * catalogue.members[a % clusters].len();
                if SUCCESSOR_STEPS
                    .iter()
                    .any(|s| (a + s * clusters) % ring == b)
                {
                    successions += 1;
                }
            }
        }
        // About half the steps follow a succession, most stay in a cluster
        // (by chance alone: 1/clusters and about 3/items).
        let share = successions as f64 / pairs as f64;
        assert!((0.45..0.6).contains(&share), "successions {share}");
        assert!(same_cluster as f64 / pairs as f64 > 0.65);
        // Zipf head: the most popular 1% of items hold well over 1% of events.
        let mut counts = vec![0usize; spec.items];
        for e in &events {
            counts[e.item as usize] += 1;
        }
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let head: usize = counts[..spec.items / 100].iter().sum();
        assert!(head as f64 > 0.05 * events.len() as f64, "head {head}");
    }

    #[tokio::test]
    async fn a_log_is_written_as_daily_partitions_of_several_files() {
        let lake = Lake::open(&crate::config::LakeSpec {
            url: "memory://sample-log".into(),
            ..Default::default()
        })
        .unwrap();
        let spec = LogSpec {
            users: 200,
            items: 100,
            mean_events: 8.0,
            days: 3,
            files_per_day: 2,
            seed: 1,
        };
        let summary = write_log(&lake, &spec).await.unwrap();
        let files = lake.list("interactions").await.unwrap();
        assert_eq!(files.len(), 6);
        assert!(files.iter().any(|f| {
            f.location
                .as_ref()
                .ends_with("dt=2025-01-03/part-00001.parquet")
        }));
        // Six interaction files, the items file, the ceiling table.
        assert_eq!(summary.written.len(), 8);
        assert_eq!(lake.list("ceiling").await.unwrap().len(), 1);
        let rows: usize = generate_log(&spec, false).0.iter().map(Vec::len).sum();
        assert_eq!(summary.events, rows);
        assert!(
            LogSpec {
                mean_events: 2.0,
                ..spec
            }
            .validate()
            .is_err()
                && LogSpec { days: 0, ..spec }.validate().is_err()
        );
    }

    /// The ceiling's next-item distribution of a log user equals the one
    /// summed by brute force over every (home, second) cluster pair, weighed
    /// by the pair's likelihood of the user's history.
    #[test]
    fn a_log_users_next_item_distribution_is_the_posterior_mixture() {
        let spec = LogSpec {
            users: 60,
            items: 40,
            mean_events: 12.0,
            days: 3,
            files_per_day: 1,
            seed: 11,
        };
        let catalogue = Catalogue::new(&spec);
        let ranked = ceiling::log_ranked(&catalogue);
        let clusters = catalogue.clusters;
        let total = catalogue.total_weight();
        // P(item | previous item, home, second), as log_user draws it.
        let step = |prev: u32, item: u32, home: usize, second: usize| -> f64 {
            let c = item as usize % clusters;
            let own = |cluster: usize| {
                if c == cluster {
                    catalogue.weight[item as usize] / catalogue.cluster_weight(cluster)
                } else {
                    0.0
                }
            };
            let succession: f64 = catalogue
                .successors(prev)
                .iter()
                .filter(|(s, _)| *s == item)
                .map(|(_, share)| share)
                .sum();
            LOG_SUCCESSION * succession
                + LOG_OWN_CLUSTER * (LOG_HOME * own(home) + (1.0 - LOG_HOME) * own(second))
                + (1.0 - LOG_SUCCESSION - LOG_OWN_CLUSTER) * catalogue.weight[item as usize] / total
        };
        let mut checked = 0;
        for user in 0..spec.users as u32 {
            let mut events = Vec::new();
            log_user(&spec, &catalogue, user, &mut events);
            let history: Vec<u32> = events[..events.len() - 1].iter().map(|e| e.item).collect();
            let next = ceiling::log_next(&catalogue, &ranked, &history);
            let mut want = vec![0.0f64; spec.items];
            let mut evidence = 0.0;
            for home in 0..clusters {
                for second in 0..clusters {
                    let first = history[0] as usize;
                    let mut likelihood = if first % clusters == home {
                        catalogue.weight[first] / catalogue.cluster_weight(home)
                    } else {
                        0.0
                    };
                    for w in history.windows(2) {
                        likelihood *= step(w[0], w[1], home, second);
                    }
                    evidence += likelihood;
                    let last = history[history.len() - 1];
                    for (item, p) in want.iter_mut().enumerate() {
                        *p += likelihood * step(last, item as u32, home, second);
                    }
                }
            }
            let mut sum = 0.0;
            for (item, p) in want.iter().enumerate() {
                let got = next.probability(item as u32);
                sum += got;
                assert!(
                    (got - p / evidence).abs() < 1e-9 * (1.0 + got),
                    "user {user} item {item}: {got} against {}",
                    p / evidence
                );
            }
            assert!(
                (sum - 1.0).abs() < 1e-9,
                "user {user}: probabilities sum to {sum}"
            );
            checked += 1;
        }
        assert_eq!(checked, spec.users);
    }

    /// Over many users, a ceiling's expected metrics agree with what its
    /// ranking scored on the targets that were drawn; and ranking every
    /// item by the generator's probabilities through the evaluation's own
    /// ranking gives the targets the ranks the table records.
    #[test]
    fn the_ceiling_is_what_its_ranking_scores_in_the_evaluation() {
        use crate::artifacts::ceiling::CEILING_DEPTH;
        use crate::dataset::{Dataset, Split};
        use crate::model::Scorer;

        let spec = LogSpec {
            users: 4000,
            items: 2000,
            mean_events: 20.0,
            days: 5,
            files_per_day: 1,
            seed: 5,
        };
        let (days, rows) = generate_log(&spec, true);
        assert_eq!(rows.len(), spec.users);
        let at_10 = CEILING_KS.iter().position(|&k| k == 10).unwrap();
        let n = rows.len() as f64;
        let expected_hr: f64 = rows.iter().map(|r| r.expected[at_10][0]).sum::<f64>() / n;
        let expected_ndcg: f64 = rows.iter().map(|r| r.expected[at_10][1]).sum::<f64>() / n;
        let hits = |r: &CeilingRow| r.target_rank.is_some_and(|k| k <= 10);
        let realized_hr = rows.iter().filter(|r| hits(r)).count() as f64 / n;
        let realized_ndcg = rows
            .iter()
            .filter(|r| hits(r))
            .map(|r| 1.0 / (r.target_rank.unwrap() as f64 + 1.0).log2())
            .sum::<f64>()
            / n;
        // Four standard errors of a mean of 4,000 values in [0, 1].
        assert!(
            (expected_hr - realized_hr).abs() < 0.032,
            "{expected_hr} {realized_hr}"
        );
        assert!(
            (expected_ndcg - realized_ndcg).abs() < 0.032,
            "{expected_ndcg} {realized_ndcg}"
        );
        assert!(expected_hr > 0.4 && expected_hr < 0.9, "{expected_hr}");

        // The same users as a dataset (ids = indices + 1, 1001 + index),
        // leave-one-out, scored by the generator's probabilities.
        let mut by_user: Vec<Vec<(i64, u32)>> = vec![Vec::new(); spec.users];
        for e in days.iter().flatten() {
            by_user[e.user as usize].push((e.micros, e.item));
        }
        let mut offsets = vec![0];
        let (mut items, mut splits) = (Vec::new(), Vec::new());
        for events in &mut by_user {
            events.sort_unstable();
            let len = events.len();
            for (i, &(_, item)) in events.iter().enumerate() {
                items.push(item);
                splits.push(match len - i {
                    1 => Split::Test,
                    2 => Split::Valid,
                    _ => Split::Train,
                });
            }
            offsets.push(items.len());
        }
        let dataset = Dataset {
            user_ids: Arc::new(Int64Array::from_iter_values(1..=spec.users as i64)),
            item_ids: Arc::new(Int64Array::from_iter_values(
                (0..spec.items as i64).map(|i| i + ITEM_ID_BASE),
            )),
            offsets,
            items,
            splits,
            train_counts: vec![0; spec.items],
        };
        struct Bayes {
            catalogue: Catalogue,
            ranked: ceiling::Ranked,
        }
        impl Scorer for Bayes {
            fn n_items(&self) -> usize {
                self.catalogue.weight.len()
            }
            fn score(&self, histories: &[&[u32]], out: &mut Vec<f32>) -> Result<()> {
                out.clear();
                for history in histories {
                    let next = ceiling::log_next(&self.catalogue, &self.ranked, history);
                    out.extend((0..self.n_items() as u32).map(|i| next.probability(i) as f32));
                }
                Ok(())
            }
        }
        let catalogue = Catalogue::new(&spec);
        let ranked = ceiling::log_ranked(&catalogue);
        let bayes = Bayes { catalogue, ranked };
        let targets = dataset.targets(Split::Test);
        assert_eq!(targets.len(), spec.users);
        let mut same = 0;
        crate::model::score::rank_targets(&bayes, &dataset, &targets, 256, 0, |ranked| {
            for r in ranked {
                let row = &rows[r.target.user as usize];
                assert_eq!(row.history_len, r.target.position as i64);
                assert_eq!(row.item_id, i64::from(r.target.item) + ITEM_ID_BASE);
                let rank = r.rank.filter(|&k| k <= CEILING_DEPTH).map(|k| k as u32);
                if rank == row.target_rank {
                    same += 1;
                }
            }
            Ok(())
        })
        .unwrap();
        // Scores rounded to f32 may swap two items whose probabilities
        // differ in the eighth digit; nothing else may differ.
        assert!(same as f64 >= 0.995 * n, "{same} of {n} ranks agree");
    }

    #[test]
    fn the_samples_ceiling_follows_the_ring() {
        let spec = SampleSpec::default();
        let rows = sample_ceiling(&spec);
        assert_eq!(rows.len(), spec.users);
        let at_10 = CEILING_KS.iter().position(|&k| k == 10).unwrap();
        for r in &rows {
            let hr = r.expected[at_10][0];
            assert!(hr > 0.0 && hr <= 1.0 + 1e-12, "{r:?}");
            assert!(r.expected.windows(2).all(|w| w[0][0] <= w[1][0] + 1e-15));
        }
        // The three ring steps hold 0.8 of the mass, and are mostly unseen.
        let mean = ceiling_means(&rows)[at_10].1[0];
        assert!(mean > 0.7, "{mean}");
    }

    #[test]
    fn deterministic_and_in_range() {
        let a = events(&SampleSpec::default());
        let b = events(&SampleSpec::default());
        assert_eq!(a.len(), b.len());
        assert!(
            a.iter()
                .zip(&b)
                .all(|(x, y)| x.micros == y.micros && x.item == y.item)
        );
        assert!(
            a.iter()
                .all(|e| (1001..1201).contains(&e.item) && e.micros >= START_MICROS)
        );
        let c = events(&SampleSpec {
            seed: 1,
            ..SampleSpec::default()
        });
        assert!(a.iter().zip(&c).any(|(x, y)| x.item != y.item));
    }
}
