-- split (protocol leave_one_out): per user, events ordered by
-- (timestamp, item_id); the last one is `test`, the second-to-last `valid`,
-- the rest `train`. Users with fewer than 3 events are `train` only.
--
-- The window sorts each user's events in the output's own order, so the
-- final ORDER BY only merges the already sorted partitions.
--
-- Input:  events, user_map, item_map
-- Output: user_id, item_id, timestamp, split, user_index, item_index
--         (schemas/split.json), ordered by user_index, timestamp, item_index
WITH ranked AS (
    SELECT
        e.user_id,
        e.item_id,
        e."timestamp",
        u.user_index,
        i.item_index,
        CAST(ROW_NUMBER() OVER (
            PARTITION BY u.user_index
            ORDER BY e."timestamp", i.item_index
        ) AS BIGINT) AS position,
        COUNT(*) OVER (PARTITION BY u.user_index) AS user_events
    FROM events e
    JOIN user_map u ON e.user_id = u.user_id
    JOIN item_map i ON e.item_id = i.item_id
)
SELECT
    user_id,
    item_id,
    "timestamp",
    CASE
        WHEN user_events < 3 THEN 'train'
        WHEN position = user_events THEN 'test'
        WHEN position = user_events - 1 THEN 'valid'
        ELSE 'train'
    END AS split,
    user_index,
    item_index
FROM ranked
ORDER BY user_index, "timestamp", item_index
