//! The Bayes ceiling of a synthetic log, `ceiling/` at the lake root
//! (schemas/ceiling.json), written by `recdistill sample` beside the log
//! it describes: for every user's leave-one-out test target, the expected
//! HR, NDCG and MRR at each of [`CEILING_KS`] of the Bayes-optimal ranking
//! (the generator's own next-item probabilities given everything before the
//! target, earlier items excluded, ties by item id), and the rank that
//! ranking gives the target that was drawn.
//!
//! The evaluate stage reads it back ([`load_ceiling`]) and sets each
//! accuracy row's `ceiling` beside its value, when every test user of the
//! run has a row whose target and history length are the run's own. A lake
//! without the table (every real log) has no ceiling, and nothing fails.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int32Array, Int64Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Float64Type, Int32Type, Int64Type, Schema, SchemaRef};
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Target};
use crate::error::{Error, Result};
use crate::lake::{Lake, engine};

/// The cut-offs the table holds a row for, per user.
pub const CEILING_KS: [u32; 6] = [1, 5, 10, 20, 50, 100];

/// The deepest rank the ceiling ranks (the largest of [`CEILING_KS`]).
pub const CEILING_DEPTH: usize = 100;

/// Table name in `recdistill sql` and the session.
pub const CEILING_TABLE: &str = "ceiling";

/// One user's ceiling.
#[derive(Debug, Clone, PartialEq)]
pub struct CeilingRow {
    /// The user's id.
    pub user_id: i64,
    /// The test target's item id.
    pub item_id: i64,
    /// Events before the target.
    pub history_len: i64,
    /// 1-based rank of the drawn target in the Bayes-optimal ranking;
    /// `None` when it was an earlier item (excluded) or ranked below
    /// [`CEILING_DEPTH`].
    pub target_rank: Option<u32>,
    /// Expected HR, NDCG and MRR at each of [`CEILING_KS`].
    pub expected: [[f64; 3]; CEILING_KS.len()],
}

impl CeilingRow {
    /// The row of a user whose Bayes-optimal ranking gives the unseen
    /// items `probability` (best first, at most [`CEILING_DEPTH`]) and the
    /// drawn target `target_rank`.
    pub fn from_ranking(
        user_id: i64,
        item_id: i64,
        history_len: i64,
        probability: &[f64],
        target_rank: Option<u32>,
    ) -> CeilingRow {
        let mut expected = [[0.0; 3]; CEILING_KS.len()];
        let (mut hr, mut ndcg, mut mrr) = (0.0, 0.0, 0.0);
        let mut next = 0;
        for (r, &p) in probability.iter().take(CEILING_DEPTH).enumerate() {
            let rank = (r + 1) as f64;
            hr += p;
            ndcg += p / (rank + 1.0).log2();
            mrr += p / rank;
            while next < CEILING_KS.len() && CEILING_KS[next] as usize == r + 1 {
                expected[next] = [hr, ndcg, mrr];
                next += 1;
            }
        }
        // A catalogue shorter than a cut-off: the sums stop growing.
        for cell in &mut expected[next..] {
            *cell = [hr, ndcg, mrr];
        }
        CeilingRow {
            user_id,
            item_id,
            history_len,
            target_rank,
            expected,
        }
    }
}

/// Schema of the ceiling table (schemas/ceiling.json): one row per (user, k).
pub fn ceiling_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("user_id", DataType::Int64, false),
        Field::new("item_id", DataType::Int64, false),
        Field::new("history_len", DataType::Int64, false),
        Field::new("k", DataType::Int32, false),
        Field::new("hr", DataType::Float64, false),
        Field::new("ndcg", DataType::Float64, false),
        Field::new("mrr", DataType::Float64, false),
        Field::new("target_rank", DataType::Int32, true),
    ]))
}

/// The table's rows for `rows`, in user order.
pub fn ceiling_batch(rows: &[CeilingRow]) -> Result<RecordBatch> {
    let n = rows.len() * CEILING_KS.len();
    let each = |f: &dyn Fn(&CeilingRow, usize) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(
            rows.iter()
                .flat_map(|r| (0..CEILING_KS.len()).map(move |i| f(r, i))),
        ))
    };
    let repeat = |f: &dyn Fn(&CeilingRow) -> i64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(
            rows.iter()
                .flat_map(|r| std::iter::repeat_n(f(r), CEILING_KS.len())),
        ))
    };
    let columns: Vec<ArrayRef> = vec![
        repeat(&|r| r.user_id),
        repeat(&|r| r.item_id),
        repeat(&|r| r.history_len),
        Arc::new(Int32Array::from_iter_values(
            (0..n).map(|i| CEILING_KS[i % CEILING_KS.len()] as i32),
        )),
        each(&|r, i| r.expected[i][0]),
        each(&|r, i| r.expected[i][1]),
        each(&|r, i| r.expected[i][2]),
        Arc::new(Int32Array::from_iter(rows.iter().flat_map(|r| {
            std::iter::repeat_n(r.target_rank.map(|v| v as i32), CEILING_KS.len())
        }))),
    ];
    RecordBatch::try_new(ceiling_schema(), columns).map_err(|e| Error::internal(e.to_string()))
}

/// One user's row of a loaded ceiling: the target and history length it is
/// for, and the expected (HR, NDCG, MRR) at each of the job's cut-offs
/// (`None` for a cut-off the table has no row for).
#[derive(Debug, Clone)]
struct UserCeiling {
    item_id: i64,
    history_len: i64,
    expected: Vec<Option<[f64; 3]>>,
}

/// A log's ceiling, read for a job's cut-offs.
#[derive(Debug, Clone)]
pub struct Ceiling {
    /// Where it was read from, for messages.
    pub location: String,
    /// The job's cut-offs.
    ks: Vec<u32>,
    by_user: HashMap<i64, UserCeiling>,
}

/// Reads the ceiling table at `folder` (relative to the lake root) for the
/// cut-offs `ks`; `None` when the folder holds no files. A table without
/// the contract's columns, or with two rows for one (user, k), is refused
/// (exit 3, naming the folder).
pub async fn load_ceiling(
    ctx: &SessionContext,
    lake: &Lake,
    folder: &str,
    ks: &[u32],
) -> Result<Option<Ceiling>> {
    let folder = folder.trim_matches('/');
    if folder.is_empty() || !engine::register_folder(lake, ctx, CEILING_TABLE, folder).await? {
        return Ok(None);
    }
    let location = lake.url_of(&format!("{folder}/"));
    let what = format!("reading the ceiling table {location}");
    let df = engine::plan_sql(
        ctx,
        "SELECT user_id, item_id, history_len, k, hr, ndcg, mrr FROM ceiling",
        &[],
        &what,
    )
    .await
    .map_err(|e| match e {
        Error::Config(message) => Error::data(&location, message),
        other => other,
    })?;
    let mut stream = df
        .execute_stream()
        .await
        .map_err(|e| Error::from_datafusion(&what, e))?;
    let mut by_user: HashMap<i64, UserCeiling> = HashMap::new();
    let bad = |rule: String| Error::data(&location, rule);
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| Error::from_datafusion(&what, e))?;
        let column = |i: usize, to: &DataType| {
            cast(batch.column(i), to).map_err(|e| {
                bad(format!(
                    "column `{}` is not {to}: {e}",
                    batch.schema().field(i).name()
                ))
            })
        };
        let (users, items, lens) = (
            column(0, &DataType::Int64)?,
            column(1, &DataType::Int64)?,
            column(2, &DataType::Int64)?,
        );
        let cuts = column(3, &DataType::Int32)?;
        let values = [
            column(4, &DataType::Float64)?,
            column(5, &DataType::Float64)?,
            column(6, &DataType::Float64)?,
        ];
        let (users, items, lens) = (
            users.as_primitive::<Int64Type>(),
            items.as_primitive::<Int64Type>(),
            lens.as_primitive::<Int64Type>(),
        );
        let cuts = cuts.as_primitive::<Int32Type>();
        let values: Vec<&arrow::array::PrimitiveArray<Float64Type>> = values
            .iter()
            .map(|v| v.as_primitive::<Float64Type>())
            .collect();
        for row in 0..batch.num_rows() {
            let nulls = [users.is_null(row), items.is_null(row), lens.is_null(row)];
            if nulls.iter().any(|&n| n)
                || cuts.is_null(row)
                || values.iter().any(|v| v.is_null(row))
            {
                return Err(bad(format!(
                    "row for user {} has a null; every column but target_rank is required",
                    users.value(row)
                )));
            }
            let Some(slot) = ks.iter().position(|&k| k as i32 == cuts.value(row)) else {
                continue;
            };
            let user = users.value(row);
            let entry = by_user.entry(user).or_insert_with(|| UserCeiling {
                item_id: items.value(row),
                history_len: lens.value(row),
                expected: vec![None; ks.len()],
            });
            if entry.item_id != items.value(row)
                || entry.history_len != lens.value(row)
                || entry.expected[slot].is_some()
            {
                return Err(bad(format!(
                    "user {user} has two rows for k = {} (one target per user and k)",
                    cuts.value(row)
                )));
            }
            entry.expected[slot] = Some([
                values[0].value(row),
                values[1].value(row),
                values[2].value(row),
            ]);
        }
    }
    ctx.deregister_table(CEILING_TABLE)
        .map_err(|e| Error::from_datafusion(&what, e))?;
    Ok(Some(Ceiling {
        location,
        ks: ks.to_vec(),
        by_user,
    }))
}

/// A ceiling's mean expected (HR, NDCG, MRR) at each of a job's cut-offs,
/// `None` for a cut-off the table has no rows for.
pub type CeilingMeans = Vec<Option<[f64; 3]>>;

/// Fixed-point unit of [`CeilingSums`]: sums of integers add up the same
/// in any order, so a sharded evaluation's ceiling equals the unsharded one
/// bit for bit.
const UNIT: f64 = (1u64 << 36) as f64;

/// The ceiling of a share of an evaluation's targets: how many there were,
/// how many the table describes (same user, target and history length),
/// and the sums of their expected values at each of the job's cut-offs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CeilingSums {
    /// Targets of the share.
    pub targets: u64,
    /// Targets the ceiling table describes.
    pub matched: u64,
    /// Per cut-off: Σ expected (HR, NDCG, MRR) in units of 2⁻³⁶, or `None`
    /// where the table has no row for the cut-off.
    pub sums: Vec<Option<[u64; 3]>>,
}

impl Ceiling {
    /// The ceiling of `targets` (of `dataset`).
    pub fn sums(&self, dataset: &Dataset, targets: &[Target]) -> CeilingSums {
        let user_ids = cast(&dataset.user_ids, &DataType::Int64).ok();
        let item_ids = cast(&dataset.item_ids, &DataType::Int64).ok();
        let mut sums: Vec<Option<[u64; 3]>> = vec![Some([0; 3]); self.ks.len()];
        let mut matched = 0;
        if let (Some(user_ids), Some(item_ids)) = (user_ids, item_ids) {
            let (user_ids, item_ids) = (
                user_ids.as_primitive::<Int64Type>(),
                item_ids.as_primitive::<Int64Type>(),
            );
            for t in targets {
                let (u, i) = (t.user as usize, t.item as usize);
                if user_ids.is_null(u) || item_ids.is_null(i) {
                    continue;
                }
                let Some(row) = self.by_user.get(&user_ids.value(u)) else {
                    continue;
                };
                if row.item_id != item_ids.value(i) || row.history_len != t.position as i64 {
                    continue;
                }
                matched += 1;
                for (sum, expected) in sums.iter_mut().zip(&row.expected) {
                    *sum = match (*sum, expected) {
                        (Some(s), Some(e)) => Some(
                            [0, 1, 2].map(|m| s[m] + (e[m].clamp(0.0, 1.0) * UNIT).round() as u64),
                        ),
                        _ => None,
                    };
                }
            }
        }
        CeilingSums {
            targets: targets.len() as u64,
            matched,
            sums,
        }
    }
}

impl CeilingSums {
    /// Adds another share's sums (of the same cut-offs).
    pub fn merge(&mut self, other: &CeilingSums) -> Result<()> {
        if other.sums.len() != self.sums.len() {
            return Err(Error::internal("ceiling shares of different cut-offs"));
        }
        self.targets += other.targets;
        self.matched += other.matched;
        for (a, b) in self.sums.iter_mut().zip(&other.sums) {
            *a = match (*a, b) {
                (Some(x), Some(y)) => Some([0, 1, 2].map(|m| x[m] + y[m])),
                _ => None,
            };
        }
        Ok(())
    }

    /// The mean expected (HR, NDCG, MRR) per cut-off, when the table
    /// describes every target; `None` otherwise (the run's targets are not
    /// the log's: another run date, filters, protocol).
    pub fn means(&self) -> Option<CeilingMeans> {
        if self.targets == 0 || self.matched != self.targets {
            return None;
        }
        let n = self.targets as f64;
        Some(
            self.sums
                .iter()
                .map(|s| s.map(|s| s.map(|v| v as f64 / UNIT / n)))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_sums_the_probabilities_of_each_cut_off() {
        let p = [0.5, 0.2, 0.1];
        let row = CeilingRow::from_ranking(1, 2, 3, &p, Some(2));
        // k = 1: the first item only.
        assert_eq!(row.expected[0], [0.5, 0.5, 0.5]);
        // k = 5 and beyond: all three.
        let ndcg = 0.5 + 0.2 / 3f64.log2() + 0.1 / 2.0;
        let mrr = 0.5 + 0.2 / 2.0 + 0.1 / 3.0;
        for cell in &row.expected[1..] {
            assert!((cell[0] - 0.8).abs() < 1e-12);
            assert!((cell[1] - ndcg).abs() < 1e-12);
            assert!((cell[2] - mrr).abs() < 1e-12);
        }
        let batch = ceiling_batch(&[row.clone(), row]).unwrap();
        assert_eq!(batch.num_rows(), 2 * CEILING_KS.len());
        assert_eq!(batch.schema(), ceiling_schema());
    }

    #[test]
    fn sums_of_shares_equal_the_whole_and_a_partial_match_has_no_mean() {
        let whole = CeilingSums {
            targets: 3,
            matched: 3,
            sums: vec![Some([3 << 35, 1 << 36, 0]), None],
        };
        let mut a = CeilingSums {
            targets: 2,
            matched: 2,
            sums: vec![Some([2 << 35, 1 << 35, 0]), None],
        };
        let b = CeilingSums {
            targets: 1,
            matched: 1,
            sums: vec![Some([1 << 35, 1 << 35, 0]), None],
        };
        a.merge(&b).unwrap();
        assert_eq!(a, whole);
        let means = a.means().unwrap();
        assert_eq!(means[0], Some([0.5, 1.0 / 3.0, 0.0]));
        assert_eq!(means[1], None);
        let partial = CeilingSums {
            matched: 2,
            ..whole.clone()
        };
        assert_eq!(partial.means(), None);
    }

    async fn lake_with(batch: Option<RecordBatch>) -> (Lake, SessionContext) {
        let lake = Lake::open(&crate::config::LakeSpec {
            url: format!("memory://ceiling-{}", rand::random::<u32>()),
            ..Default::default()
        })
        .unwrap();
        if let Some(batch) = batch {
            lake.write_batches(
                "ceiling/part-0.parquet",
                batch.schema(),
                vec![batch],
                vec![],
            )
            .await
            .unwrap();
        }
        let ctx = SessionContext::new();
        lake.register(&ctx);
        (lake, ctx)
    }

    #[tokio::test]
    async fn a_ceiling_is_read_for_the_jobs_cut_offs_and_a_broken_one_is_refused() {
        use crate::dataset::{Dataset, Split};
        // Absent: no ceiling, no error.
        let (lake, ctx) = lake_with(None).await;
        assert!(
            load_ceiling(&ctx, &lake, "ceiling", &[10])
                .await
                .unwrap()
                .is_none()
        );

        // Two users; the job asks for k = 10 and k = 7 (which the table lacks).
        let rows = [
            CeilingRow::from_ranking(1, 10, 2, &[0.5, 0.25], Some(1)),
            CeilingRow::from_ranking(2, 11, 3, &[0.25], None),
        ];
        let (lake, ctx) = lake_with(Some(ceiling_batch(&rows).unwrap())).await;
        let ceiling = load_ceiling(&ctx, &lake, "ceiling", &[10, 7])
            .await
            .unwrap()
            .unwrap();
        // Users 1 and 2 with targets 10 and 11 after 2 and 3 events.
        let mut dataset = Dataset::from_train_sequences(12, &[vec![3, 4, 10], vec![5, 6, 7, 11]]);
        dataset.splits = vec![
            Split::Train,
            Split::Valid,
            Split::Test,
            Split::Train,
            Split::Train,
            Split::Valid,
            Split::Test,
        ];
        dataset.user_ids = Arc::new(Int64Array::from(vec![1, 2]));
        let targets = dataset.targets(Split::Test);
        let sums = ceiling.sums(&dataset, &targets);
        assert_eq!((sums.targets, sums.matched), (2, 2));
        let means = sums.means().unwrap();
        let ndcg = (0.5 + 0.25 / 3f64.log2() + 0.25) / 2.0;
        assert!((means[0].unwrap()[1] - ndcg).abs() < 1e-9);
        assert_eq!(means[1], None);
        // Another target for a user: that user is not the log's; no mean.
        let other = [Target {
            item: 9,
            ..targets[0]
        }];
        assert_eq!(ceiling.sums(&dataset, &other).means(), None);

        // Two rows for one (user, k), and a table without a column: exit 3.
        let doubled = ceiling_batch(&[rows[0].clone(), rows[0].clone()]).unwrap();
        let (lake, ctx) = lake_with(Some(doubled)).await;
        let err = load_ceiling(&ctx, &lake, "ceiling", &[10])
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), 3, "{err}");
        assert!(err.to_string().contains("ceiling"), "{err}");
        let batch = ceiling_batch(&rows).unwrap();
        let without_hr = batch.project(&[0, 1, 2, 3, 5, 6, 7]).unwrap();
        let (lake, ctx) = lake_with(Some(without_hr)).await;
        let err = load_ceiling(&ctx, &lake, "ceiling", &[10])
            .await
            .unwrap_err();
        assert_eq!(err.exit_code(), 3, "{err}");
    }
}
