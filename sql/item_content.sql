-- item_content: a content vector for every item, built from the items table:
-- a multi-hot of its genres (every genre that at least 5 items carry, in
-- alphabetical order) followed by its release year scaled as
-- (year - 1900) / 100 and a flag for an unknown year. Used by the
-- teacher-content model when the job sets
-- features.item_content_sql = "item_content.sql".
--
-- Input:  items (schemas/items.json)
-- Output: item_id, embedding (list<float32>, the same length for every item)
--         (schemas/item_content.json)
WITH item AS (
    -- One row per item id, whatever the items table holds.
    SELECT item_id, MAX(release_year) AS release_year, array_distinct(flatten(array_agg(genres))) AS genres
    FROM items
    GROUP BY item_id
),
vocabulary AS (
    SELECT genre
    FROM (SELECT unnest(genres) AS genre FROM item)
    WHERE genre IS NOT NULL
    GROUP BY genre
    HAVING COUNT(*) >= 5
),
genre_flags AS (
    SELECT
        i.item_id,
        array_agg(CAST(COALESCE(array_has(i.genres, v.genre), false) AS FLOAT) ORDER BY v.genre) AS flags
    FROM item i
    CROSS JOIN vocabulary v
    GROUP BY i.item_id
),
year AS (
    SELECT
        item_id,
        make_array(
            CAST(COALESCE((release_year - 1900) / 100.0, 0.0) AS FLOAT),
            CAST(CASE WHEN release_year IS NULL THEN 1.0 ELSE 0.0 END AS FLOAT)
        ) AS features
    FROM item
)
SELECT
    y.item_id,
    -- Without any genre in the vocabulary, the year features alone.
    CASE WHEN g.flags IS NULL THEN y.features ELSE array_concat(g.flags, y.features) END AS embedding
FROM year y
LEFT JOIN genre_flags g ON g.item_id = y.item_id
ORDER BY y.item_id
