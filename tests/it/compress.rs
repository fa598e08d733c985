//! Compression on the bundled sample: each variant of the distilled student
//! is its own model with its own recommendations, smaller where it should
//! be, timed, on the report's frontier or not; `inspect` shows how each
//! tensor is stored; `recommend` scores users with any saved model; broken
//! model files are refused.

use std::collections::HashSet;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int64Type};

use crate::common::*;

const STUDENT: &str = "student-kd-teacher-kl";

fn size_of(run: &std::path::Path, model: &str) -> u64 {
    std::fs::metadata(run.join(format!("models/{model}/model.safetensors")))
        .unwrap()
        .len()
}

#[test]
fn compressed_variants_are_evaluated_timed_reported_and_usable() {
    let lake = TestLake::with_sample();
    ok(&mut lake.run_job("jobs/sample.toml", &[]));
    let run = lake.run_folder("sample");
    let rows = all_evaluation_values(&run);
    let ndcg = |m: &str| metric(&rows, m, "ndcg", 10);

    // Every variant is a model of its own, named <student>@<variant>.
    let variants = [
        "int8",
        "int4",
        "prune-unstructured-0.5",
        "prune-structured-0.5",
        "lowrank-4",
        "lowrank-4+int8",
        "prune-structured-0.5+int8",
    ];
    let eval = read_all(&run.join("evaluation/evaluation.parquet"));
    let col = |name: &str| {
        arrow::compute::cast(
            eval.column(eval.schema().index_of(name).unwrap()),
            &DataType::Utf8,
        )
        .unwrap()
    };
    let (model_col, variant_col, role_col, metric_col) =
        (col("model"), col("variant"), col("role"), col("metric"));
    let k_col = eval.column(eval.schema().index_of("k").unwrap());
    let size_col = eval.column(eval.schema().index_of("size_bytes").unwrap());
    for v in variants {
        let name = format!("{STUDENT}@{v}");
        let r = (0..eval.num_rows())
            .find(|&r| model_col.as_string::<i32>().value(r) == name)
            .unwrap_or_else(|| panic!("no rows for {name}"));
        assert_eq!(variant_col.as_string::<i32>().value(r), v);
        assert_eq!(role_col.as_string::<i32>().value(r), "student");
        assert_eq!(
            size_col.as_primitive::<Int64Type>().value(r) as u64,
            size_of(&run, &name),
            "size_bytes is the artifact's real size"
        );
        assert!(
            run.join(format!("recommendations/{name}.parquet"))
                .is_file()
        );
    }
    // Quantized files are smaller; int8 loses (almost) nothing.
    let fp32 = size_of(&run, STUDENT);
    for v in [
        "int8",
        "int4",
        "lowrank-4+int8",
        "prune-structured-0.5+int8",
    ] {
        let s = size_of(&run, &format!("{STUDENT}@{v}"));
        assert!(s < fp32 * 7 / 10, "{v}: {s} vs fp32 {fp32}");
    }
    assert!(size_of(&run, &format!("{STUDENT}@int4")) < size_of(&run, &format!("{STUDENT}@int8")));
    assert!(ndcg(&format!("{STUDENT}@int8")) >= 0.97 * ndcg(STUDENT));

    // Every model is timed (no cut-off: k is null) and marked on or off the frontier.
    let models: HashSet<String> = rows.iter().map(|r| r.0.clone()).collect();
    for m in &models {
        for t in TIMINGS {
            assert!(metric(&rows, m, t, 0) > 0.0, "{m} {t}");
        }
        let p50 = metric(&rows, m, "latency_ms_p50", 0);
        assert!(metric(&rows, m, "latency_ms_p99", 0) >= p50);
        let on = metric(&rows, m, "pareto", 10);
        assert!(on == 0.0 || on == 1.0);
    }
    for r in 0..eval.num_rows() {
        let timing = TIMINGS.contains(&metric_col.as_string::<i32>().value(r));
        assert_eq!(k_col.is_null(r), timing, "row {r}");
    }
    // The smallest model and the most accurate one are on the frontier.
    let smallest = models.iter().min_by_key(|m| size_of(&run, m)).unwrap();
    assert_eq!(metric(&rows, smallest, "pareto", 10), 1.0, "{smallest}");
    let best = models
        .iter()
        .max_by(|a, b| ndcg(a).total_cmp(&ndcg(b)))
        .unwrap();
    assert_eq!(metric(&rows, best, "pareto", 10), 1.0, "{best}");

    // The report: one page with the chart and every model.
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("</svg>"));
    for m in &models {
        assert!(html.contains(m.as_str()), "{m} missing from the report");
    }

    // inspect: each tensor's scheme, shape and bytes.
    let lowrank = run.join(format!("models/{STUDENT}@lowrank-4+int8/model.safetensors"));
    let printed = ok(recdistill().arg("inspect").arg(&lowrank));
    assert!(
        printed.contains("lowrank-r4(int8-row·int8-row)"),
        "{printed}"
    );
    assert!(printed.contains("200×8"), "{printed}");
    let printed = ok(recdistill()
        .arg("inspect")
        .arg(run.join(format!("models/{STUDENT}/model.safetensors"))));
    assert!(
        printed.contains("variant fp32") && printed.contains("f32"),
        "{printed}"
    );

    // recommend: every user, or the users of a file, in the recommendations format.
    let out = lake.path().join("recs.parquet");
    let int8 = run.join(format!("models/{STUDENT}@int8/model.safetensors"));
    let recommend = |extra: &[&str]| {
        let mut cmd = recdistill();
        cmd.arg("recommend")
            .arg("--model")
            .arg(&int8)
            .arg("--out")
            .arg(&out)
            .arg("--job")
            .arg(repo().join("jobs/sample.toml"))
            .arg("--lake")
            .arg(lake.path())
            .args(["--run-date", RUN_DATE, "--k", "7"])
            .args(extra);
        cmd
    };
    ok(&mut recommend(&["--all"]));
    let recs = read_all(&out);
    let reference = read_all(&run.join(format!("recommendations/{STUDENT}@int8.parquet")));
    assert_eq!(recs.schema(), reference.schema());
    assert_eq!(recs.num_rows(), 300 * 7);
    let users_file = lake.path().join("users.txt");
    std::fs::write(&users_file, "# two users\n3\n\n17\n").unwrap();
    ok(&mut recommend(&["--users", users_file.to_str().unwrap()]));
    let recs = read_all(&out);
    assert_eq!(recs.num_rows(), 2 * 7);
    let users: HashSet<i64> = recs
        .column(0)
        .as_primitive::<Int64Type>()
        .iter()
        .flatten()
        .collect();
    assert_eq!(users, HashSet::from([3, 17]));
    std::fs::remove_file(&out).unwrap();
    std::fs::write(&users_file, "3\n999999\n").unwrap();
    let err = fails(
        &mut recommend(&["--users", users_file.to_str().unwrap()]),
        3,
    );
    assert!(err.contains("users.txt") && err.contains("line 2"), "{err}");
    assert!(!out.exists(), "nothing written for a bad user list");

    // A broken model file is refused with exit 3 (never a panic).
    let bytes = std::fs::read(&int8).unwrap();
    let broken = lake.path().join("broken.safetensors");
    for damage in [
        bytes[..bytes.len() / 2].to_vec(),
        {
            let mut b = bytes.clone();
            b[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
            b
        },
        {
            // Rename a tensor in the header: the layout no longer finds it.
            let text = String::from_utf8_lossy(&bytes).replacen("item.q", "item.x", 1);
            text.into_bytes()
        },
    ] {
        std::fs::write(&broken, damage).unwrap();
        let err = fails(recdistill().arg("inspect").arg(&broken), 3);
        assert!(err.contains("broken.safetensors"), "{err}");
    }
}
