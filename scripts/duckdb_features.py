"""The job's feature SQL on DuckDB, for scripts/bench-scale.sh.

Runs sql/events.sql (a view), then item_map, user_map, split (leave-one-out),
item_popularity and stats, each written to Parquet and read back for the
next query, as the features stage does. The SQL files are the repository's,
with three DataFusion spellings mapped to DuckDB's: arrow_cast to a UTC
timestamp (dropped: DuckDB keeps the type), arrow_cast to Int64 (epoch_us)
and INT UNSIGNED (UINTEGER).

    python duckdb_features.py SQL_DIR LAKE OUT_DIR [THREADS]
"""

import os
import re
import sys
import time

import duckdb

sql_dir, lake, out = sys.argv[1], sys.argv[2], sys.argv[3]
threads = int(sys.argv[4]) if len(sys.argv) > 4 else os.cpu_count()
params = {"min_user_events": "1", "min_item_events": "1"}


def load(name):
    text = open(os.path.join(sql_dir, name)).read()
    text = re.sub(r"arrow_cast\(([^,()]+), 'Timestamp\(Microsecond, Some\(\"UTC\"\)\)'\)", r"\1", text)
    text = re.sub(r"arrow_cast\(([^,()]+), 'Int64'\)", r"epoch_us(\1)", text)
    text = text.replace("INT UNSIGNED", "UINTEGER")
    for key, value in params.items():
        text = text.replace("$" + key, value)
    return text


os.makedirs(out, exist_ok=True)
con = duckdb.connect()
con.execute(f"SET threads = {threads}")
con.execute(
    "CREATE VIEW interactions AS SELECT * FROM read_parquet("
    f"'{lake}/interactions/*/*.parquet', hive_partitioning = true)"
)
total = time.perf_counter()
con.execute("CREATE VIEW events AS " + load("events.sql"))
for table, file in [
    ("item_map", "item_map.sql"),
    ("user_map", "user_map.sql"),
    ("split", "split_leave_one_out.sql"),
    ("item_popularity", "item_popularity.sql"),
    ("stats", "stats.sql"),
]:
    start = time.perf_counter()
    path = os.path.join(out, table + ".parquet")
    con.execute(f"COPY ({load(file)}) TO '{path}' (FORMAT parquet, COMPRESSION snappy)")
    con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{path}')")
    rows = con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    print(f"duckdb {table}: {rows} rows, {time.perf_counter() - start:.2f} s")
print(f"duckdb features: {time.perf_counter() - total:.2f} s")
