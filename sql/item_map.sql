-- item_map: a dense 0-based index for every item, in ascending order of the
-- original id (so the index, and every tie broken by it, is stable).
--
-- Input:  events
-- Output: item_id, item_index (uint32)        (schemas/item_map.json)
SELECT
    item_id,
    CAST(ROW_NUMBER() OVER (ORDER BY item_id) - 1 AS INT UNSIGNED) AS item_index
FROM (SELECT DISTINCT item_id FROM events)
ORDER BY item_index
