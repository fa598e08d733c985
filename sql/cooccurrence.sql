-- cooccurrence: item-to-item similarity from co-occurrence in the train
-- split - two items are seen together when a user had them within
-- $cooccurrence_window events of each other (1 to 5) - normalised by
-- cosine, count / sqrt(n_a * n_b) with n an item's train events, and the
-- $cooccurrence_neighbors most similar items of each item kept. The
-- `cooccurrence` baseline (an item-KNN, models.cooccurrence) sums the rows
-- of a user's last few items.
--
-- Pairs are counted once in time order (the earlier item first) and then
-- both ways, so the table is symmetric before the top-N cut. LEAD streams
-- over the sorted split; widening past 5 means adding LEAD columns here.
--
-- Input:      split, item_map, item_popularity
-- Parameters: $cooccurrence_neighbors, $cooccurrence_window   (job: models.cooccurrence)
-- Output:     item_index, item_id, rank, neighbor_index, neighbor_id, score
--             (schemas/cooccurrence.json), ordered by item_index, rank
WITH steps AS (
    SELECT
        item_index,
        LEAD(item_index, 1) OVER w AS next_1,
        LEAD(item_index, 2) OVER w AS next_2,
        LEAD(item_index, 3) OVER w AS next_3,
        LEAD(item_index, 4) OVER w AS next_4,
        LEAD(item_index, 5) OVER w AS next_5
    FROM split
    WHERE split = 'train'
    WINDOW w AS (PARTITION BY user_index ORDER BY "timestamp", item_index)
),
pairs AS (
    SELECT item_index AS a, next_1 AS b FROM steps WHERE next_1 IS NOT NULL
    UNION ALL
    SELECT item_index, next_2 FROM steps WHERE next_2 IS NOT NULL AND $cooccurrence_window >= 2
    UNION ALL
    SELECT item_index, next_3 FROM steps WHERE next_3 IS NOT NULL AND $cooccurrence_window >= 3
    UNION ALL
    SELECT item_index, next_4 FROM steps WHERE next_4 IS NOT NULL AND $cooccurrence_window >= 4
    UNION ALL
    SELECT item_index, next_5 FROM steps WHERE next_5 IS NOT NULL AND $cooccurrence_window >= 5
),
counts AS (
    SELECT LEAST(a, b) AS a, GREATEST(a, b) AS b, COUNT(*) AS together
    FROM pairs
    WHERE a <> b
    GROUP BY LEAST(a, b), GREATEST(a, b)
),
both_ways AS (
    SELECT a, b, together FROM counts
    UNION ALL
    SELECT b, a, together FROM counts
),
ranked AS (
    SELECT
        w.a,
        w.b,
        CAST(w.together AS DOUBLE) / SQRT(CAST(pa.train_events AS DOUBLE) * CAST(pb.train_events AS DOUBLE)) AS similarity
    FROM both_ways w
    JOIN item_popularity pa ON pa.item_index = w.a
    JOIN item_popularity pb ON pb.item_index = w.b
),
kept AS (
    SELECT
        a,
        b,
        similarity,
        ROW_NUMBER() OVER (PARTITION BY a ORDER BY similarity DESC, b) AS neighbor_rank
    FROM ranked
)
SELECT
    k.a AS item_index,
    x.item_id,
    CAST(k.neighbor_rank AS INT) AS rank,
    k.b AS neighbor_index,
    y.item_id AS neighbor_id,
    k.similarity AS score
FROM kept k
JOIN item_map x ON x.item_index = k.a
JOIN item_map y ON y.item_index = k.b
WHERE k.neighbor_rank <= $cooccurrence_neighbors
ORDER BY k.a, k.neighbor_rank
