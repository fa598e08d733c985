//! `recdistill import movielens` on small RecBole atomic files made here
//! (the repository holds no MovieLens data).

use arrow::array::{Array, AsArray};

use crate::common::*;

fn recbole_dir(inter: &str, item: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tiny.inter"), inter).unwrap();
    std::fs::write(dir.path().join("tiny.item"), item).unwrap();
    dir
}

const INTER: &str = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n\
1\t10\t4\t881250949\n\
1\t11\t3\t881250950\n\
1\t12\t5\t881337600\n\
2\t10\t2\t881337601\n\
2\t12\t1\t881424000\n\
2\t11\t4\t881424001\n";

const ITEM: &str = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n\
10\tToy \"Story\"\t1995\tAnimation Children's Comedy\n\
11\tGoldenEye\t1995\tAction Adventure Thriller\n\
12\tUnknown\t\tunknown\n";

#[test]
fn imports_day_partitions_and_items_then_runs() {
    let src = recbole_dir(INTER, ITEM);
    let lake = TestLake::new();
    let out = ok(recdistill()
        .args(["import", "movielens", "--from"])
        .arg(src.path())
        .arg("--lake")
        .arg(lake.path()));
    assert!(out.contains("imported 6 interactions and 3 items"), "{out}");
    let files = files_under(lake.path());
    assert_eq!(
        files,
        [
            "interactions/dt=1997-12-04/part-00000.parquet",
            "interactions/dt=1997-12-05/part-00000.parquet",
            "interactions/dt=1997-12-06/part-00000.parquet",
            "items/part-00000.parquet",
        ]
    );
    let day = read_all(
        &lake
            .path()
            .join("interactions/dt=1997-12-05/part-00000.parquet"),
    );
    assert_eq!(day.num_rows(), 2);
    assert_eq!(day.schema().field(2).data_type(), &ts_type());
    let items = read_all(&lake.path().join("items/part-00000.parquet"));
    let titles = arrow::compute::cast(items.column(1), &arrow::datatypes::DataType::Utf8).unwrap();
    assert_eq!(
        titles.as_string::<i32>().value(0),
        "Toy \"Story\"",
        "quotes are text"
    );
    let years = items
        .column(2)
        .as_primitive::<arrow::datatypes::Int32Type>();
    assert_eq!((years.value(0), years.is_null(2)), (1995, true));
    let genres = items.column(3).as_list::<i32>();
    assert_eq!(genres.value(0).len(), 3);

    // Importing again needs --replace, and replaces.
    let err = fails(
        recdistill()
            .args(["import", "movielens", "--from"])
            .arg(src.path())
            .arg("--lake")
            .arg(lake.path()),
        2,
    );
    assert!(err.contains("--replace"), "{err}");
    ok(recdistill()
        .args(["import", "movielens", "--replace", "--from"])
        .arg(src.path())
        .arg("--lake")
        .arg(lake.path()));
    assert_eq!(files_under(lake.path()).len(), 4);

    // The imported lake runs (too tiny to train on: popularity only), and
    // the content SQL builds a vector for every item.
    ok(&mut lake.run_job(
        "jobs/movielens-100k.toml",
        &[
            "--set",
            "models.meanpool.enabled=false",
            "--set",
            "models.teacher.enabled=false",
            "--set",
            "distill.enabled=false",
            "--set",
            "features.sql_dir=",
            "--set",
            "publish.model=\"\"",
        ],
    ));
    let content = read_all(
        &lake
            .run_folder("movielens-100k")
            .join("features/item_content.parquet"),
    );
    let items = read_all(
        &lake.path().join(
            files_under(lake.path())
                .into_iter()
                .find(|f| f.starts_with("items/"))
                .unwrap(),
        ),
    );
    assert_eq!(content.num_rows(), items.num_rows());
    assert!(lake.run_folder("movielens-100k").join("_SUCCESS").is_file());
}

#[test]
fn refuses_files_that_are_not_recbole_atomic_files() {
    let lake = TestLake::new();
    let src = recbole_dir("user_id\titem_id\ttimestamp\n1\t2\t3\n", ITEM);
    let err = fails(
        recdistill()
            .args(["import", "movielens", "--from"])
            .arg(src.path())
            .arg("--lake")
            .arg(lake.path()),
        3,
    );
    assert!(
        err.contains("tiny.inter") && err.contains("name:type"),
        "{err}"
    );

    let src = recbole_dir("user_id:token\ttimestamp:float\n1\t3\n", ITEM);
    let err = fails(
        recdistill()
            .args(["import", "movielens", "--from"])
            .arg(src.path())
            .arg("--lake")
            .arg(lake.path()),
        3,
    );
    assert!(err.contains("missing column `item_id`"), "{err}");

    let src = recbole_dir(
        "user_id:token\titem_id:token\ttimestamp:float\n1\t2\tyesterday\n",
        ITEM,
    );
    let err = fails(
        recdistill()
            .args(["import", "movielens", "--from"])
            .arg(src.path())
            .arg("--lake")
            .arg(lake.path()),
        3,
    );
    assert!(err.contains("tiny.inter"), "{err}");
    assert!(
        files_under(lake.path()).is_empty(),
        "nothing written: {:?}",
        files_under(lake.path())
    );

    let empty = tempfile::tempdir().unwrap();
    let err = fails(
        recdistill()
            .args(["import", "movielens", "--from"])
            .arg(empty.path())
            .arg("--lake")
            .arg(lake.path()),
        2,
    );
    assert!(err.contains("no .inter file"), "{err}");
}
