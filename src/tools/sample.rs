//! The deterministic synthetic sample shipped in `data-samples/sample/`
//! (`recdistill sample --out DIR` writes it again, bit for bit).
//!
//! It has sequential structure, so a next-item model must beat popularity on
//! it: items form a ring, and from the item a user just consumed they usually
//! move to one of the next few items on the ring; otherwise they jump to an
//! item drawn by popularity (Zipf-like).

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Float32Array, Int32Array, Int64Array, ListBuilder, RecordBatch, StringArray,
    StringBuilder, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::lake::{Lake, WrittenObject};

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

/// Generates the events, sorted by (day, user, time, item).
fn events(spec: &SampleSpec) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let n = spec.items as i64;
    // Zipf-like popularity: weight 1/(rank+1), items shuffled into ranks by index.
    let weights: Vec<f64> = (0..n).map(|i| 1.0 / ((i * 7919 % n) + 1) as f64).collect();
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
                item: item + 1001,
                micros: t,
                rating: rng.random_range(1..=5) as f32,
            });
            item = if rng.random_bool(FOLLOW) {
                let step = match rng.random_range(0..100) {
                    0..60 => 1,
                    60..85 => 2,
                    _ => 3,
                };
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
            (0..n as i64).map(|i| i + 1001),
        )),
        Arc::new(StringArray::from_iter_values(
            (0..n).map(|i| format!("Item {}", i + 1001)),
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
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

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
