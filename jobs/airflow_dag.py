"""Airflow DAG running recdistill daily, one task per stage.

Each stage reads what it needs from the run folder in the lake, so the tasks
can run on different workers. Exit code 4 (transient I/O) is worth a retry,
and so is 5 (another run of the same date holds the run folder: a retry after
`retry_delay` finds it free, also when that run was killed, since its lease
expires after `lake.lease_s`); 3 (invalid input data) and 2 (configuration) fail again until the data or the
job file is fixed, so alert on them rather than wait for the retries.

The two expensive model stages, soft-labels and evaluate, fan out over
SHARDS mapped tasks (dynamic task mapping): `--shard I/N` writes part I of N
on its own, possibly on another worker, and the next stage (distill, then
commit) joins the parts into exactly what one unsharded task writes. It
refuses with exit 2 if a part is missing or two shardings overlap; a mapped
task killed mid-write leaves no part and is simply retried.

The last task offers the committed run's `publish.model` to the publish
gate. Exit 6 means the run is committed but the gate refused its model (the
model published before still serves): the task is marked skipped, not
failed, and not retried. A retried publish never publishes twice.
"""

from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator

RECDISTILL = "/opt/recdistill/recdistill"
JOB = "/opt/recdistill/jobs/movielens-100k.toml"
LAKE = "s3://my-bucket/lake"
COMMON = f"--job {JOB} --lake {LAKE} --run-date {{{{ ds }}}} --log-format json"


SHARDS = 4
SHARDED = ("soft-labels", "evaluate")
RETRIES = {"retries": 3, "retry_delay": timedelta(minutes=10)}


def stage(name: str):
    if name in SHARDED:
        # One mapped task instance per part, 0/N … N-1/N.
        return BashOperator.partial(task_id=f"recdistill_{name}", **RETRIES).expand(
            bash_command=[
                f"{RECDISTILL} stage {name} {COMMON} --shard {i}/{SHARDS}"
                for i in range(SHARDS)
            ]
        )
    return BashOperator(
        task_id=f"recdistill_{name}",
        bash_command=f"{RECDISTILL} stage {name} {COMMON}",
        **RETRIES,
    )


with DAG(
    dag_id="recdistill_movielens_100k",
    start_date=datetime(2026, 11, 1),
    schedule="15 3 * * *",
    catchup=False,
    max_active_runs=1,
    default_args={"owner": "recsys"},
) as dag:
    stages = [
        stage(name)
        for name in (
            "features",
            "baselines",
            "teacher",
            "soft-labels",
            "distill",
            "compress",
            "evaluate",
            "commit",
        )
    ]
    publish = BashOperator(
        task_id="recdistill_publish",
        bash_command=f"{RECDISTILL} publish {COMMON}",
        skip_on_exit_code=6,
        **RETRIES,
    )
    stages.append(publish)
    for upstream, downstream in zip(stages, stages[1:]):
        upstream >> downstream

    # The whole job in one task (it publishes after its commit), as an
    # alternative to the chain above:
    # BashOperator(task_id="recdistill_run", bash_command=f"{RECDISTILL} run {COMMON}",
    #              skip_on_exit_code=6)
