//! Item text through the real all-MiniLM-L6-v2 on the bundled sample, when
//! `scripts/fetch-text-models.sh` has fetched it into
//! `$RECDISTILL_TEXT_MODELS` (default `text-models/`; CI fetches it): the
//! features stage writes one unit vector per item, `teacher-text` trains
//! on them and is evaluated, and a rerun encodes nothing.

use std::path::PathBuf;

use arrow::array::{Array, AsArray};
use arrow::datatypes::Float32Type;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::common::*;

fn minilm() -> Option<PathBuf> {
    let dir = std::env::var("RECDISTILL_TEXT_MODELS").unwrap_or_else(|_| "text-models".into());
    let dir = repo().join(dir).join("minilm-l6");
    dir.join("model.safetensors").is_file().then_some(dir)
}

/// The `recdistill.text.*` counts a run wrote beside the vectors.
fn counts(path: &std::path::Path) -> (usize, usize) {
    let file = std::fs::File::open(path).unwrap();
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    let kv = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .unwrap();
    let get = |key: &str| -> usize {
        kv.iter()
            .find(|e| e.key == key)
            .and_then(|e| e.value.as_ref())
            .unwrap_or_else(|| panic!("no {key}"))
            .parse()
            .unwrap()
    };
    (
        get("recdistill.text.encoded"),
        get("recdistill.text.reused"),
    )
}

#[test]
fn item_text_feeds_teacher_text_and_a_rerun_encodes_nothing() {
    let Some(weights) = minilm() else {
        eprintln!("skipped: all-MiniLM-L6-v2 not fetched (scripts/fetch-text-models.sh)");
        return;
    };
    let lake = TestLake::with_sample();
    let weights = format!("text.weights={:?}", weights.display().to_string());
    let sets = [
        "--set",
        "text.enabled=true",
        "--set",
        weights.as_str(),
        "--set",
        "models.teacher.text=true",
        "--set",
        "models.teacher.epochs=4",
        "--set",
        "models.meanpool.enabled=false",
        "--set",
        "distill.enabled=false",
    ];
    ok(&mut lake.run_job("jobs/sample.toml", &sets));
    let run = lake.run_folder("sample");
    let table = run.join("features/item_text_embeddings.parquet");
    let vectors = read_all(&table);
    let items_dir = lake.path().join("items");
    let items: usize = files_under(&items_dir)
        .iter()
        .filter(|f| f.ends_with(".parquet"))
        .flat_map(|f| read_parquet(&items_dir.join(f)))
        .map(|b| b.num_rows())
        .sum();
    assert_eq!(vectors.num_rows(), items);
    assert_eq!(counts(&table), (items, 0));
    let embedding = vectors
        .column_by_name("embedding")
        .unwrap()
        .as_list::<i32>();
    for row in [0, items / 2, items - 1] {
        let v = embedding.value(row);
        let v = v.as_primitive::<Float32Type>();
        assert_eq!(v.len(), 384);
        let norm: f32 = v.values().iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "row {row}: norm {norm}");
    }
    assert!(
        vectors
            .column_by_name("encoder")
            .unwrap()
            .as_string::<i32>()
            .value(0)
            .starts_with("minilm-l6/mean/window-128/")
    );
    let rows = evaluation_values(&run);
    let popular = metric(&rows, "popularity", "ndcg", 10);
    let text = metric(&rows, "teacher-text", "ndcg", 10);
    assert!(
        text > popular,
        "teacher-text {text} vs popularity {popular}"
    );
    assert!(run.join("models/teacher-text/model.safetensors").is_file());

    // The same items again: every vector is carried over, none encoded.
    ok(&mut lake.run_job("jobs/sample.toml", &sets));
    assert_eq!(counts(&table), (0, items));
    let again = read_all(&table);
    assert_eq!(
        again.column_by_name("embedding").unwrap().to_data(),
        vectors.column_by_name("embedding").unwrap().to_data()
    );
}
