-- split (protocol temporal): one global cut for everybody. Timestamps are
-- ranked over all events; events at or after the $test_quantile cut are
-- `test`, at or after the $valid_quantile cut `valid`, the rest `train`.
-- Evaluation then predicts each user's first valid/test event from
-- everything the user did before it.
--
-- Input:      events, user_map, item_map
-- Parameters: $valid_quantile, $test_quantile   (job: [split])
-- Output:     as split_leave_one_out.sql (schemas/split.json)
--
-- The total comes from its own COUNT(*), not COUNT(*) OVER (): a window
-- over the whole table holds every event before it emits one, where
-- ROW_NUMBER streams after the (spillable) sort.
WITH total AS (
    SELECT COUNT(*) AS total FROM events
),
ranked AS (
    SELECT
        e."timestamp",
        ROW_NUMBER() OVER (ORDER BY e."timestamp") AS position,
        t.total
    FROM events e
    CROSS JOIN total t
),
cuts AS (
    SELECT
        MIN(CASE WHEN position > total * $valid_quantile THEN "timestamp" END) AS valid_from,
        MIN(CASE WHEN position > total * $test_quantile THEN "timestamp" END) AS test_from
    FROM ranked
)
SELECT
    e.user_id,
    e.item_id,
    e."timestamp",
    CASE
        WHEN e."timestamp" >= c.test_from THEN 'test'
        WHEN e."timestamp" >= c.valid_from THEN 'valid'
        ELSE 'train'
    END AS split,
    u.user_index,
    i.item_index
FROM events e
CROSS JOIN cuts c
JOIN user_map u ON e.user_id = u.user_id
JOIN item_map i ON e.item_id = i.item_id
ORDER BY u.user_index, e."timestamp", i.item_index
