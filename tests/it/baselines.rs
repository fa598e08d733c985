//! The neighbour baselines (`transitions`, `cooccurrence`) and the Bayes
//! ceiling: built in SQL, stored sparse, ranked and evaluated like every
//! model; each accuracy row as a fraction of the log's ceiling where the
//! log has one.

use std::collections::HashMap;
use std::path::Path;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int32Type, Int64Type};

use crate::common::*;

/// Only the baselines: fast, and enough for everything here.
const BASELINES_ONLY: [&str; 8] = [
    "--set",
    "models.teacher.enabled=false",
    "--set",
    "models.meanpool.enabled=false",
    "--set",
    "distill.enabled=false",
    "--set",
    "compress.enabled=false",
];

fn column(b: &RecordBatch, name: &str) -> arrow::array::ArrayRef {
    b.column(b.schema().index_of(name).unwrap()).clone()
}

fn int64(b: &RecordBatch, name: &str) -> Vec<i64> {
    let c = arrow::compute::cast(&column(b, name), &DataType::Int64).unwrap();
    c.as_primitive::<Int64Type>().values().to_vec()
}

/// An evaluation row's (model, metric, k), and its (value, ceiling, fraction).
type Row = (String, String, i32);
type Bounded = (f64, Option<f64>, Option<f64>);

/// The evaluation rows as (model, metric, k) → (value, ceiling, fraction).
fn ceiling_columns(run: &Path) -> HashMap<Row, Bounded> {
    let b = read_all(&run.join("evaluation/evaluation.parquet"));
    let model = column(&b, "model");
    let metric = column(&b, "metric");
    let k = column(&b, "k");
    let value = column(&b, "value");
    let ceiling = column(&b, "ceiling");
    let fraction = column(&b, "ceiling_fraction");
    let f = |a: &arrow::array::ArrayRef, r: usize| {
        (!a.is_null(r)).then(|| a.as_primitive::<Float64Type>().value(r))
    };
    (0..b.num_rows())
        .map(|r| {
            (
                (
                    model.as_string::<i32>().value(r).to_string(),
                    metric.as_string::<i32>().value(r).to_string(),
                    if k.is_null(r) {
                        0
                    } else {
                        k.as_primitive::<Int32Type>().value(r)
                    },
                ),
                (
                    value.as_primitive::<Float64Type>().value(r),
                    f(&ceiling, r),
                    f(&fraction, r),
                ),
            )
        })
        .collect()
}

#[test]
fn the_neighbour_baselines_are_sql_tables_stored_sparse_and_evaluated_like_every_model() {
    let lake = TestLake::with_sample();
    ok(&mut lake.run_job("jobs/sample.toml", &BASELINES_ONLY));
    let run = lake.run_folder("sample");

    // The transitions table holds, for each item, its most frequent
    // successors in the train split, counted here from the split itself.
    let split = read_all(&run.join("features/split.parquet"));
    let (users, items) = (int64(&split, "user_index"), int64(&split, "item_index"));
    let kinds = arrow::compute::cast(&column(&split, "split"), &DataType::Utf8).unwrap();
    let train: Vec<bool> = (0..split.num_rows())
        .map(|r| kinds.as_string::<i32>().value(r) == "train")
        .collect();
    let mut want: HashMap<(i64, i64), i64> = HashMap::new();
    let rows: Vec<usize> = (0..split.num_rows()).filter(|&r| train[r]).collect();
    for w in rows.windows(2) {
        let (a, b) = (w[0], w[1]);
        if users[a] == users[b] && items[a] != items[b] {
            *want.entry((items[a], items[b])).or_default() += 1;
        }
    }
    let table = read_all(&run.join("features/transitions.parquet"));
    let contract = recdistill::lake::schema::contract("transitions").unwrap();
    let names: Vec<String> = table
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let want_names: Vec<String> = contract.columns.iter().map(|c| c.name.clone()).collect();
    assert_eq!(names, want_names);
    let (from, to) = (int64(&table, "item_index"), int64(&table, "neighbor_index"));
    let rank = int64(&table, "rank");
    let score = column(&table, "score");
    let score = score.as_primitive::<Float64Type>();
    assert!(table.num_rows() > 100);
    let neighbors = 50;
    for r in 0..table.num_rows() {
        assert_eq!(score.value(r), want[&(from[r], to[r])] as f64, "row {r}");
        assert!(rank[r] >= 1 && rank[r] <= neighbors);
        if r > 0 && from[r] == from[r - 1] {
            assert_eq!(rank[r], rank[r - 1] + 1);
            assert!(score.value(r) <= score.value(r - 1));
        } else {
            assert_eq!(rank[r], 1);
        }
    }
    // An item keeps every successor when it has fewer than the cut.
    let kept = (0..table.num_rows())
        .filter(|&r| from[r] == from[0])
        .count();
    let all = want.keys().filter(|(a, _)| *a == from[0]).count();
    assert_eq!(kept, all.min(neighbors as usize));
    // The ids are the item map's.
    let item_map = read_all(&run.join("features/item_map.parquet"));
    let map: HashMap<i64, i64> = int64(&item_map, "item_index")
        .into_iter()
        .zip(int64(&item_map, "item_id"))
        .collect();
    let (ids, neighbor_ids) = (int64(&table, "item_id"), int64(&table, "neighbor_id"));
    assert!(
        (0..table.num_rows()).all(|r| map[&from[r]] == ids[r] && map[&to[r]] == neighbor_ids[r])
    );

    // Cooccurrence: cosine similarities, symmetric before the cut, in (0, 1].
    let cooc = read_all(&run.join("features/cooccurrence.parquet"));
    let sim = column(&cooc, "score");
    let sim = sim.as_primitive::<Float64Type>();
    assert!(cooc.num_rows() > 100);
    assert!((0..cooc.num_rows()).all(|r| sim.value(r) > 0.0 && sim.value(r) <= 1.0));

    // Both are models: stored, ranked, timed and on the results table, and
    // transitions beats popularity on the sample's ring.
    for name in ["transitions", "cooccurrence"] {
        assert!(
            run.join(format!("models/{name}/model.safetensors"))
                .is_file()
        );
        assert!(
            run.join(format!("recommendations/{name}.parquet"))
                .is_file()
        );
    }
    let values = all_evaluation_values(&run);
    for name in ["transitions", "cooccurrence"] {
        assert!(metric(&values, name, "users_per_s", 0) > 0.0);
        assert!(metric(&values, name, "ndcg", 10) > metric(&values, "popularity", "ndcg", 10));
    }
    let inspect = ok(recdistill()
        .arg("inspect")
        .arg(run.join("models/transitions/model.safetensors")));
    assert!(inspect.contains("neighbors"), "{inspect}");

    // And they are queryable as the run's tables.
    let out = ok(recdistill().args(["sql", "--lake"]).arg(lake.path()).args([
        "--format",
        "csv",
        "SELECT COUNT(*) AS n FROM transitions WHERE rank = 1",
    ]));
    let distinct: std::collections::HashSet<i64> = from.iter().copied().collect();
    assert!(out.contains(&distinct.len().to_string()), "{out}");
}

#[test]
fn each_accuracy_row_is_a_fraction_of_the_logs_ceiling_when_the_log_has_one() {
    let lake = TestLake::with_sample();
    ok(&mut lake.run_job("jobs/sample.toml", &BASELINES_ONLY));
    let run = lake.run_folder("sample");
    let rows = ceiling_columns(&run);

    // The ceiling of NDCG@10: the table's mean over the test users, read
    // here with polars, an independent reader.
    use polars::prelude::{DataType as PolarsType, ParquetReader, SerReader};
    let file = std::fs::File::open(lake.path().join("ceiling/part-00000.parquet")).unwrap();
    let table = ParquetReader::new(file).finish().unwrap();
    let values = |name: &str| -> Vec<f64> {
        let c = table
            .column(name)
            .unwrap()
            .cast(&PolarsType::Float64)
            .unwrap();
        c.f64()
            .unwrap()
            .iter()
            .map(|v| v.expect("no nulls"))
            .collect()
    };
    let cuts = values("k");
    let at_10: Vec<usize> = (0..cuts.len()).filter(|&r| cuts[r] == 10.0).collect();
    let users = at_10.len();
    let mean = |name: &str| {
        let v = values(name);
        at_10.iter().map(|&r| v[r]).sum::<f64>() / users as f64
    };
    for model in ["popularity", "transitions", "cooccurrence"] {
        let (value, ceiling, fraction) = rows[&(model.into(), "ndcg".into(), 10)];
        let ceiling = ceiling.expect("a ceiling on the sample");
        assert!(
            (ceiling - mean("ndcg")).abs() < 1e-9,
            "{ceiling} {}",
            mean("ndcg")
        );
        assert!((fraction.unwrap() - value / ceiling).abs() < 1e-12);
        let (_, hr_ceiling, _) = rows[&(model.into(), "hr".into(), 10)];
        assert!((hr_ceiling.unwrap() - mean("hr")).abs() < 1e-9);
        // Timings have no ceiling.
        let (_, none, _) = rows[&(model.into(), "users_per_s".into(), 0)];
        assert!(none.is_none());
    }
    assert_eq!(users, 300);
    let stdout = ok(&mut lake.run_job("jobs/sample.toml", &BASELINES_ONLY));
    assert!(stdout.contains("Bayes ceiling"), "{stdout}");
    let report = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(report.contains("of ceiling"));

    // Another run date: the targets are not the log's, so no fraction.
    let earlier = "2025-03-01";
    ok(recdistill()
        .arg("run")
        .arg("--job")
        .arg(repo().join("jobs/sample.toml"))
        .arg("--lake")
        .arg(lake.path())
        .args(["--run-date", earlier])
        .args(BASELINES_ONLY));
    let earlier_run = lake
        .path()
        .join(format!("recdistill/sample/run_date={earlier}"));
    let earlier_rows = ceiling_columns(&earlier_run);
    assert!(
        earlier_rows
            .values()
            .all(|(_, c, f)| c.is_none() && f.is_none())
    );

    // A lake without a ceiling table (every real log): no fraction, no failure.
    std::fs::remove_dir_all(lake.path().join("ceiling")).unwrap();
    let stdout = ok(&mut lake.run_job("jobs/sample.toml", &BASELINES_ONLY));
    assert!(!stdout.contains("Bayes ceiling"), "{stdout}");
    let rows = ceiling_columns(&run);
    assert!(rows.values().all(|(_, c, f)| c.is_none() && f.is_none()));
}

/// Users whose items are their own: every transition happens once, and a
/// test user's last item (their valid event) never precedes anything in
/// the train split.
fn unrepeated_lake() -> TestLake {
    use arrow::array::{ArrayRef, Float32Array, Int64Array, TimestampMicrosecondArray};
    use std::sync::Arc;
    let lake = TestLake::new();
    let (mut u, mut i, mut t) = (Vec::new(), Vec::new(), Vec::new());
    for user in 0..40i64 {
        for k in 0..4i64 {
            u.push(user + 1);
            i.push(1000 + user * 4 + k);
            t.push(1_735_689_600_000_000 + (user * 10 + k) * 60_000_000);
        }
    }
    let n = u.len();
    let b = batch(vec![
        ("user_id", Arc::new(Int64Array::from(u)) as ArrayRef),
        ("item_id", Arc::new(Int64Array::from(i))),
        (
            "timestamp",
            Arc::new(TimestampMicrosecondArray::from(t).with_timezone("UTC")),
        ),
        ("rating", Arc::new(Float32Array::from(vec![3.0; n]))),
    ]);
    write_parquet(
        &lake
            .path()
            .join("interactions/dt=2025-01-01/part-0.parquet"),
        &b,
    );
    lake
}

#[test]
fn transitions_that_never_repeat_fall_back_to_popularity() {
    let lake = unrepeated_lake();
    let mut args = BASELINES_ONLY.to_vec();
    args.extend(NO_CONTENT);
    ok(&mut lake.run_job("jobs/sample.toml", &args));
    let run = lake.run_folder("sample");
    let lists = |model: &str| {
        let b = read_all(&run.join(format!("recommendations/{model}.parquet")));
        let (users, items) = (int64(&b, "user_id"), int64(&b, "item_id"));
        users.into_iter().zip(items).collect::<Vec<_>>()
    };
    let popular = lists("popularity");
    assert!(!popular.is_empty());
    assert_eq!(lists("transitions"), popular);
    // Items seen together once each: co-occurrence still ranks (its own
    // rows first), never crashes.
    assert!(!lists("cooccurrence").is_empty());
}

#[test]
fn a_neighbour_table_that_disagrees_with_the_item_map_is_refused_naming_it() {
    let lake = TestLake::with_sample();
    // Edited SQL whose neighbour ids are not the item map's.
    let sql = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("sql"), sql.path());
    let path = sql.path().join("transitions.sql");
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text.replace("b.item_id AS neighbor_id", "b.item_id + 1 AS neighbor_id");
    assert_ne!(text, edited);
    std::fs::write(&path, edited).unwrap();
    let mut args = BASELINES_ONLY.to_vec();
    let dir = format!("features.sql_dir={:?}", sql.path().display().to_string());
    args.extend(["--set", &dir]);
    let err = fails(&mut lake.run_job("jobs/sample.toml", &args), 3);
    assert!(
        err.contains("features/transitions.parquet") && err.contains("neighbor_id"),
        "{err}"
    );
    assert!(!lake.run_folder("sample").join("_SUCCESS").exists());
    assert!(
        !lake
            .run_folder("sample")
            .join("models/transitions/model.safetensors")
            .exists()
    );
}

#[test]
fn a_teacher_learns_from_a_baseline_on_every_window_and_its_own_int8_is_on_the_frontier() {
    let lake = TestLake::with_sample();
    let args = [
        "--set",
        "models.teacher.baseline=transitions",
        "--set",
        "models.teacher.windows=all",
        "--set",
        "models.teacher.content=false",
        "--set",
        "models.teacher.epochs=8",
        "--set",
        "models.meanpool.enabled=false",
        "--set",
        "distill.losses=[\"kl\"]",
        "--set",
        "distill.assistants=[]",
        "--set",
        "distill.student.epochs=2",
        "--set",
        "compress.models=[\"teacher\"]",
        "--set",
        "compress.variants=[\"int8\", \"int4\"]",
    ];
    ok(&mut lake.run_job("jobs/sample.toml", &args));
    let run = lake.run_folder("sample");
    let artifact = std::fs::read(run.join("models/teacher/model.safetensors")).unwrap();
    let inspect = ok(recdistill()
        .arg("inspect")
        .arg(run.join("models/teacher/model.safetensors")));
    assert!(inspect.contains("kd-baseline"), "{inspect}");
    assert!(inspect.contains("transitions"), "{inspect}");
    let transitions = std::fs::read(run.join("models/transitions/model.safetensors")).unwrap();
    use sha2::Digest;
    let sha = hex::encode(sha2::Sha256::digest(&transitions));
    assert!(
        String::from_utf8_lossy(&artifact).contains(&sha),
        "the teacher's card names the baseline's SHA-256"
    );
    let values = evaluation_values(&run);
    let teacher = metric(&values, "teacher", "ndcg", 10);
    assert!(teacher > 2.0 * metric(&values, "popularity", "ndcg", 10));
    // The teacher's own compressed variants are evaluated beside it.
    for variant in ["teacher@int8", "teacher@int4"] {
        let v = metric(&values, variant, "ndcg", 10);
        assert!(v > 0.8 * teacher, "{variant} {v} vs teacher {teacher}");
    }

    // A baseline the job does not build: exit 2 before any I/O.
    let err = fails(
        &mut lake.run_job(
            "jobs/sample.toml",
            &[
                "--set",
                "models.teacher.baseline=cooccurrence",
                "--set",
                "models.cooccurrence.enabled=false",
            ],
        ),
        2,
    );
    assert!(err.contains("models.cooccurrence.enabled"), "{err}");
}
