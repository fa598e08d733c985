-- split (protocol leave_one_out): per user, events ordered by
-- (timestamp, item_id); the last one is `test`, the second-to-last `valid`,
-- the rest `train`. Users with fewer than 3 events are `train` only.
--
-- Each user's event count comes from a GROUP BY joined in, not from
-- COUNT(*) OVER (PARTITION BY user): a window over whole partitions holds
-- every row of its partition before it emits one, twice the memory of the
-- sort at 11 M events. The one window left (ROW_NUMBER) streams after the
-- sort, and the final ORDER BY only merges the partitions it sorted.
--
-- Input:  events, user_map, item_map
-- Output: user_id, item_id, timestamp, split, user_index, item_index
--         (schemas/split.json), ordered by user_index, timestamp, item_index
WITH user_events AS (
    SELECT user_id, COUNT(*) AS user_events
    FROM events
    GROUP BY user_id
),
ranked AS (
    SELECT
        e.user_id,
        e.item_id,
        e."timestamp",
        u.user_index,
        i.item_index,
        c.user_events,
        ROW_NUMBER() OVER (
            PARTITION BY u.user_index
            ORDER BY e."timestamp", i.item_index
        ) AS position
    FROM events e
    JOIN user_map u ON e.user_id = u.user_id
    JOIN user_events c ON e.user_id = c.user_id
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
