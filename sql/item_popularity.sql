-- item_popularity: how often each item occurs in the train split; the
-- `popularity` baseline ranks by it (ties by item_index).
--
-- Input:  item_map, split
-- Output: item_index, item_id, train_events    (schemas/item_popularity.json)
SELECT
    m.item_index,
    m.item_id,
    COALESCE(c.train_events, 0) AS train_events
FROM item_map m
LEFT JOIN (
    SELECT item_index, COUNT(*) AS train_events
    FROM split
    WHERE split = 'train'
    GROUP BY item_index
) c ON m.item_index = c.item_index
ORDER BY m.item_index
