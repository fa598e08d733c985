-- transitions: first-order item-to-item counts of the train split - how
-- often each item came right after another in a user's train events - with
-- the $transitions_neighbors most frequent successors of each item kept. The
-- `transitions` baseline (models.transitions) ranks the items after a
-- user's last item by these counts, then by popularity.
--
-- The split is sorted by (user_index, timestamp, item_index) and registered
-- so, so LEAD streams over it without sorting it again. An item followed by
-- itself is dropped: the evaluation excludes a user's earlier items.
--
-- Input:      split, item_map
-- Parameters: $transitions_neighbors   (job: models.transitions.neighbors)
-- Output:     item_index, item_id, rank, neighbor_index, neighbor_id, score
--             (schemas/transitions.json), ordered by item_index, rank
WITH steps AS (
    SELECT
        item_index,
        LEAD(item_index) OVER (
            PARTITION BY user_index
            ORDER BY "timestamp", item_index
        ) AS next_index
    FROM split
    WHERE split = 'train'
),
counts AS (
    SELECT item_index, next_index AS neighbor_index, COUNT(*) AS transitions
    FROM steps
    WHERE next_index IS NOT NULL AND next_index <> item_index
    GROUP BY item_index, next_index
),
ranked AS (
    SELECT
        item_index,
        neighbor_index,
        transitions,
        ROW_NUMBER() OVER (
            PARTITION BY item_index
            ORDER BY transitions DESC, neighbor_index
        ) AS neighbor_rank
    FROM counts
)
SELECT
    r.item_index,
    a.item_id,
    CAST(r.neighbor_rank AS INT) AS rank,
    r.neighbor_index,
    b.item_id AS neighbor_id,
    CAST(r.transitions AS DOUBLE) AS score
FROM ranked r
JOIN item_map a ON a.item_index = r.item_index
JOIN item_map b ON b.item_index = r.neighbor_index
WHERE r.neighbor_rank <= $transitions_neighbors
ORDER BY r.item_index, r.neighbor_rank
