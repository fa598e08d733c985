-- stats: summary statistics of the kept events, one row per statistic.
--
-- Input:  split
-- Output: statistic, value                     (schemas/stats.json)
WITH per_user AS (
    SELECT user_index, COUNT(*) AS events
    FROM split
    GROUP BY user_index
),
rows AS (
    SELECT 1 AS ord, 'users' AS statistic, CAST(COUNT(*) AS DOUBLE) AS value FROM per_user
    UNION ALL
    SELECT 2, 'items', CAST(COUNT(DISTINCT item_index) AS DOUBLE) FROM split
    UNION ALL
    SELECT 3, 'events', CAST(COUNT(*) AS DOUBLE) FROM split
    UNION ALL
    SELECT 4, 'train_events', CAST(COUNT(*) AS DOUBLE) FROM split WHERE split = 'train'
    UNION ALL
    SELECT 5, 'valid_events', CAST(COUNT(*) AS DOUBLE) FROM split WHERE split = 'valid'
    UNION ALL
    SELECT 6, 'test_events', CAST(COUNT(*) AS DOUBLE) FROM split WHERE split = 'test'
    UNION ALL
    SELECT 7, 'density',
        CAST(COUNT(*) AS DOUBLE)
        / (CAST(COUNT(DISTINCT user_index) AS DOUBLE) * CAST(COUNT(DISTINCT item_index) AS DOUBLE))
    FROM split
    UNION ALL
    SELECT 8, 'min_timestamp_us', CAST(MIN(arrow_cast("timestamp", 'Int64')) AS DOUBLE) FROM split
    UNION ALL
    SELECT 9, 'max_timestamp_us', CAST(MAX(arrow_cast("timestamp", 'Int64')) AS DOUBLE) FROM split
    UNION ALL
    SELECT 10, 'median_events_per_user', CAST(median(events) AS DOUBLE) FROM per_user
)
SELECT statistic, value
FROM rows
ORDER BY ord
