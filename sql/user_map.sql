-- user_map: a dense 0-based index for every user, in ascending order of the
-- original id.
--
-- Input:  events
-- Output: user_id, user_index (uint32)        (schemas/user_map.json)
SELECT
    user_id,
    CAST(ROW_NUMBER() OVER (ORDER BY user_id) - 1 AS INT UNSIGNED) AS user_index
FROM (SELECT DISTINCT user_id FROM events)
ORDER BY user_index
