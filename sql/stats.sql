-- stats: summary statistics of the kept events, one row per statistic.
--
-- Input:  split
-- Output: statistic, value                     (schemas/stats.json)
--
-- One aggregate row per input, unpivoted by UNNEST in a fixed order: the
-- same plan runs in process and on Ballista (where ten UNION ALL branches
-- under an ORDER BY do not finish).
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
    unnest([
        'users', 'items', 'events', 'train_events', 'valid_events', 'test_events',
        'density', 'min_timestamp_us', 'max_timestamp_us', 'median_events_per_user'
    ]) AS statistic,
    unnest([
        u.users, e.items, e.events, e.train_events, e.valid_events, e.test_events,
        e.density, e.min_timestamp_us, e.max_timestamp_us, u.median_events_per_user
    ]) AS value
FROM users u
CROSS JOIN events e
