-- stats: summary statistics of the kept events, one row per statistic.
--
-- Input:  split
-- Output: statistic, value                     (schemas/stats.json)
--
-- One aggregate row per input, unpivoted by a join with the statistics'
-- names in a fixed order: the same plan runs in process and on a Ballista
-- cluster of Ballista's own binaries (ten UNION ALL branches under an ORDER
-- BY do not finish there, and its executors cannot decode array functions
-- such as make_array, which an UNNEST of array literals needs).
WITH per_user AS (
    SELECT user_index, COUNT(*) AS events
    FROM split
    GROUP BY user_index
),
users AS (
    SELECT
        CAST(COUNT(*) AS DOUBLE) AS users,
        CAST(median(events) AS DOUBLE) AS median_events_per_user
    FROM per_user
),
events AS (
    SELECT
        CAST(COUNT(DISTINCT item_index) AS DOUBLE) AS items,
        CAST(COUNT(*) AS DOUBLE) AS events,
        CAST(COUNT(*) FILTER (WHERE split = 'train') AS DOUBLE) AS train_events,
        CAST(COUNT(*) FILTER (WHERE split = 'valid') AS DOUBLE) AS valid_events,
        CAST(COUNT(*) FILTER (WHERE split = 'test') AS DOUBLE) AS test_events,
        CAST(COUNT(*) AS DOUBLE)
            / (CAST(COUNT(DISTINCT user_index) AS DOUBLE) * CAST(COUNT(DISTINCT item_index) AS DOUBLE))
            AS density,
        CAST(MIN(arrow_cast("timestamp", 'Int64')) AS DOUBLE) AS min_timestamp_us,
        CAST(MAX(arrow_cast("timestamp", 'Int64')) AS DOUBLE) AS max_timestamp_us
    FROM split
)
SELECT
    s.statistic,
    CASE s.statistic
        WHEN 'users' THEN u.users
        WHEN 'items' THEN e.items
        WHEN 'events' THEN e.events
        WHEN 'train_events' THEN e.train_events
        WHEN 'valid_events' THEN e.valid_events
        WHEN 'test_events' THEN e.test_events
        WHEN 'density' THEN e.density
        WHEN 'min_timestamp_us' THEN e.min_timestamp_us
        WHEN 'max_timestamp_us' THEN e.max_timestamp_us
        WHEN 'median_events_per_user' THEN u.median_events_per_user
    END AS value
FROM (VALUES
    (1, 'users'), (2, 'items'), (3, 'events'), (4, 'train_events'),
    (5, 'valid_events'), (6, 'test_events'), (7, 'density'),
    (8, 'min_timestamp_us'), (9, 'max_timestamp_us'), (10, 'median_events_per_user')
) AS s(position, statistic)
CROSS JOIN users u
CROSS JOIN events e
ORDER BY s.position
