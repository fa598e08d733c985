-- events: the interactions the job learns from (a view, not written out).
--
-- Input:      interactions (schemas/interactions.json)
-- Parameters: $min_user_events, $min_item_events   (job: [features])
-- Output:     user_id, item_id, timestamp (microseconds, UTC) - one row per kept event
--
-- Items with fewer than $min_item_events events are dropped first, then users
-- with fewer than $min_user_events of the remaining events (one pass, not an
-- iterated k-core). A threshold of 1 keeps everything, and its counting pass
-- is skipped (`1 <= 1 OR ...` folds to true before the plan runs). Edit
-- freely: later files only rely on the output columns.
WITH kept AS (
    SELECT user_id, item_id, "timestamp"
    FROM interactions
    WHERE $min_item_events <= 1
       OR item_id IN (
           SELECT item_id
           FROM interactions
           GROUP BY item_id
           HAVING COUNT(*) >= $min_item_events
       )
)
SELECT
    user_id,
    item_id,
    arrow_cast("timestamp", 'Timestamp(Microsecond, Some("UTC"))') AS "timestamp"
FROM kept
WHERE $min_user_events <= 1
   OR user_id IN (
       SELECT user_id
       FROM kept
       GROUP BY user_id
       HAVING COUNT(*) >= $min_user_events
   )
