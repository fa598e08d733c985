//! The transformer teacher on the bundled sample: it learns, beats
//! popularity, is saved and loaded without changing a score, and a damaged
//! or foreign weights file is refused.

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int32Type};

use crate::common::*;

fn f64_column(batch: &RecordBatch, name: &str) -> Vec<f64> {
    batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"))
        .as_primitive::<Float64Type>()
        .values()
        .to_vec()
}

#[test]
fn teacher_learns_and_beats_popularity_on_the_sample() {
    let lake = TestLake::with_sample();
    ok(&mut lake.run_job("jobs/sample.toml", &[]));
    let run = lake.run_folder("sample");

    for model in ["teacher", "teacher-content"] {
        let history = read_all(&run.join(format!("training/{model}.parquet")));
        assert!(
            history.num_rows() >= 3,
            "{model}: {} epochs",
            history.num_rows()
        );
        let epochs = history
            .column_by_name("epoch")
            .unwrap()
            .as_primitive::<Int32Type>();
        assert_eq!(epochs.value(0), 1);
        let loss = f64_column(&history, "loss");
        assert!(
            loss.iter().all(|l| l.is_finite() && *l > 0.0),
            "{model}: {loss:?}"
        );
        assert!(
            loss[loss.len() - 1] < 0.8 * loss[0],
            "{model}: loss did not decrease: {loss:?}"
        );
        assert!(f64_column(&history, "seconds").iter().all(|s| *s >= 0.0));
        let valid = f64_column(&history, "valid_ndcg_10");
        assert!(valid.iter().any(|v| *v > 0.0));
    }

    let rows = evaluation_values(&run);
    let popular = metric(&rows, "popularity", "ndcg", 10);
    for model in ["teacher", "teacher-content"] {
        let teacher = metric(&rows, model, "ndcg", 10);
        assert!(
            teacher > 2.0 * popular,
            "{model} {teacher} vs popularity {popular}"
        );
    }
    let eval = read_all(&run.join("evaluation/evaluation.parquet"));
    let models = eval.column_by_name("model").unwrap().as_string::<i32>();
    let roles = eval.column_by_name("role").unwrap().as_string::<i32>();
    let training = eval.column_by_name("training").unwrap().as_string::<i32>();
    let params = eval.column_by_name("params").unwrap();
    let sizes = eval.column_by_name("size_bytes").unwrap();
    let params = arrow::compute::cast(params, &arrow::datatypes::DataType::Int64).unwrap();
    let sizes = arrow::compute::cast(sizes, &arrow::datatypes::DataType::Int64).unwrap();
    let (params, sizes) = (
        params.as_primitive::<arrow::datatypes::Int64Type>(),
        sizes.as_primitive::<arrow::datatypes::Int64Type>(),
    );
    let mut seen = 0;
    for r in 0..eval.num_rows() {
        let metric = eval.column_by_name("metric").unwrap().as_string::<i32>();
        if models.value(r).starts_with("teacher")
            && ["hr", "ndcg", "mrr"].contains(&metric.value(r))
        {
            seen += 1;
            assert_eq!(roles.value(r), "teacher");
            assert_eq!(training.value(r), "supervised");
            assert!(params.value(r) > 1000);
            let file = run.join(format!("models/{}/model.safetensors", models.value(r)));
            assert_eq!(
                sizes.value(r) as u64,
                std::fs::metadata(file).unwrap().len()
            );
        }
    }
    assert_eq!(seen, 2 * 3 * 3, "2 teachers × 3 metrics × 3 cut-offs");
}

#[test]
fn a_saved_teacher_reloaded_by_a_later_stage_scores_identically() {
    let lake = TestLake::with_sample();
    ok(&mut lake.run_job("jobs/sample.toml", &[]));
    let run = lake.run_folder("sample");
    let whole = std::fs::read(run.join("recommendations/teacher.parquet")).unwrap();
    let values = evaluation_values(&run);

    // `stage evaluate` loads the weights from the lake in a fresh process.
    let mut evaluate = recdistill();
    evaluate
        .args(["stage", "evaluate", "--job"])
        .arg(repo().join("jobs/sample.toml"))
        .arg("--lake")
        .arg(lake.path())
        .args(["--run-date", RUN_DATE]);
    ok(&mut evaluate);
    assert_eq!(
        whole,
        std::fs::read(run.join("recommendations/teacher.parquet")).unwrap()
    );
    let again = evaluation_values(&run);
    for model in ["teacher", "teacher-content"] {
        assert_eq!(
            metric(&values, model, "ndcg", 10),
            metric(&again, model, "ndcg", 10)
        );
    }
}

#[test]
fn damaged_or_foreign_teacher_weights_are_refused() {
    let lake = TestLake::with_sample();
    ok(&mut lake.run_job("jobs/sample.toml", &[]));
    let run = lake.run_folder("sample");
    let weights = run.join("models/teacher/model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    let evaluate = || {
        let mut cmd = recdistill();
        cmd.args(["stage", "evaluate", "--job"])
            .arg(repo().join("jobs/sample.toml"))
            .arg("--lake")
            .arg(lake.path())
            .args(["--run-date", RUN_DATE]);
        cmd
    };

    // One flipped bit in the weights.
    let mut flipped = original.clone();
    let at = flipped.len() - 100;
    flipped[at] ^= 0x10;
    std::fs::write(&weights, &flipped).unwrap();
    let stderr = fails(&mut evaluate(), 3);
    assert!(
        stderr.contains("models/teacher/model.safetensors"),
        "{stderr}"
    );
    assert!(stderr.contains("sha256"), "{stderr}");

    // Truncated.
    std::fs::write(&weights, &original[..original.len() / 2]).unwrap();
    let stderr = fails(&mut evaluate(), 3);
    assert!(
        stderr.contains("models/teacher/model.safetensors"),
        "{stderr}"
    );

    // Another model's (valid) file in the teacher's place.
    let other = std::fs::read(run.join("models/teacher-content/model.safetensors")).unwrap();
    std::fs::write(&weights, &other).unwrap();
    let stderr = fails(&mut evaluate(), 3);
    assert!(
        stderr.contains("models/teacher/model.safetensors"),
        "{stderr}"
    );

    // Nothing was committed by the refused stages, and the original file works again.
    assert!(!run.join("_SUCCESS").exists());
    std::fs::write(&weights, &original).unwrap();
    ok(&mut evaluate());
}

#[test]
fn teacher_settings_are_validated_and_overridable() {
    let lake = TestLake::with_sample();
    let stderr = fails(
        &mut lake.run_job("jobs/sample.toml", &["--set", "models.teacher.heads=3"]),
        2,
    );
    assert!(stderr.contains("models.teacher"), "{stderr}");
    let stderr = fails(
        &mut lake.run_job(
            "jobs/sample.toml",
            &["--set", "models.teacher.softmax=\"huge\""],
        ),
        2,
    );
    assert!(stderr.contains("softmax"), "{stderr}");
    let stderr = fails(
        &mut lake.run_job("jobs/sample.toml", &["--device", "cuda:0"]),
        2,
    );
    assert!(stderr.contains("cuda"), "{stderr}");

    // Sampled softmax trains too, and a one-epoch run writes one history row.
    ok(&mut lake.run_job(
        "jobs/sample.toml",
        &[
            "--set",
            "models.teacher.softmax=\"sampled\"",
            "--set",
            "models.teacher.negatives=32",
            "--set",
            "models.teacher.epochs=1",
            "--set",
            "models.teacher.content=false",
        ],
    ));
    let run = lake.run_folder("sample");
    assert_eq!(
        read_all(&run.join("training/teacher.parquet")).num_rows(),
        1
    );
    assert!(
        !run.join("models/teacher-content/model.safetensors")
            .exists()
    );
}
