#!/usr/bin/env python3
"""How much of the next item an item's text vector alone predicts.

    scripts/text-knn.py RUN_FOLDER [RUN_FOLDER ...]

For each run folder (its features stage run with [text] enabled), ranks
every item by the cosine of its text vector to the user's last train/valid
item (full ranking, the user's earlier items excluded, as the evaluate
stage does) and prints the test split's HR@10 and NDCG@10. A probe of the
vectors, not a model the job serves: it compares encoders and pooled
layers before a teacher is trained on them. Needs numpy and pyarrow.
"""
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq


def probe(folder):
    features = f"{folder}/features"
    item_map = pq.read_table(f"{features}/item_map.parquet", columns=["item_id", "item_index"])
    text = pq.read_table(f"{features}/item_text_embeddings.parquet")
    encoder = text.column("encoder")[0].as_py()
    by_id = {k: i for i, k in enumerate(pc.cast(text.column("item_id"), "string").to_pylist())}
    ids = pc.cast(item_map.column("item_id"), "string").to_pylist()
    index = item_map.column("item_index").to_numpy()
    vectors = np.stack(text.column("embedding").to_numpy(zero_copy_only=False))
    dim = vectors.shape[1]
    table = np.zeros((len(ids), dim), dtype=np.float32)
    for item_id, i in zip(ids, index):
        row = by_id.get(item_id)
        if row is not None:
            table[i] = vectors[row]
    split = pq.read_table(
        f"{features}/split.parquet", columns=["user_index", "item_index", "split"]
    )
    users = split.column("user_index").to_numpy()
    items = split.column("item_index").to_numpy()
    kinds = split.column("split").to_pylist()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    hits, ndcg, n = 0.0, 0.0, 0
    for s, e in zip(starts, ends):
        if kinds[e - 1] != "test" or e - s < 2:
            continue
        seen = items[s : e - 1]
        target = items[e - 1]
        scores = table @ table[seen[-1]]
        scores[seen] = -np.inf
        # Rank of the target: items scored higher, ties by index.
        t = scores[target]
        rank = int(np.sum(scores > t) + np.sum((scores == t)[:target]))
        n += 1
        if rank < 10:
            hits += 1
            ndcg += 1.0 / np.log2(rank + 2)
    print(f"{folder}\t{encoder}\tusers {n}\tHR@10 {hits / n:.4f}\tNDCG@10 {ndcg / n:.4f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for folder in sys.argv[1:]:
        probe(folder)
