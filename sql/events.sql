-- events: the interactions the job learns from (a view, not written out).
--
-- Input:      interactions (schemas/interactions.json)
-- Parameters: $min_user_events, $min_item_events   (job: [features])
-- Output:     user_id, item_id, timestamp (microseconds, UTC) - one row per kept event
--
-- Items with fewer than $min_item_events events are dropped first, then users
-- with fewer than $min_user_events of the remaining events (one pass, not an
-- iterated k-core). Edit freely: later files only rely on the output columns.
WITH item_counts AS (
    SELECT item_id
    FROM interactions
    GROUP BY item_id
    HAVING COUNT(*) >= $min_item_events
),
kept AS (
    SELECT i.user_id, i.item_id, i."timestamp"
    FROM interactions i
    JOIN item_counts c ON i.item_id = c.item_id
),
user_counts AS (
    SELECT user_id
    FROM kept
    GROUP BY user_id
    HAVING COUNT(*) >= $min_user_events
)
SELECT
    k.user_id,
    k.item_id,
    arrow_cast(k."timestamp", 'Timestamp(Microsecond, Some("UTC"))') AS "timestamp"
FROM kept k
JOIN user_counts u ON k.user_id = u.user_id
