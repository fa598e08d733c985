-- item_text: each item's text for the [text] encoder, built from the items
-- table: "Title (year). Genres: A, B, C". A missing title, year or genre
-- list is left out; an item with none of them gets the empty text (and
-- the zero vector). Used when the job sets [text] enabled = true.
--
-- Input:  items (schemas/items.json)
-- Output: item_id, text (utf8), one row per item of the items table
WITH item AS (
    -- One row per item id, whatever the items table holds.
    SELECT
        item_id,
        MAX(title) AS title,
        MAX(release_year) AS release_year,
        array_distinct(flatten(array_agg(genres))) AS genres
    FROM items
    GROUP BY item_id
)
SELECT
    item_id,
    concat_ws(
        '. ',
        CASE
            WHEN title IS NOT NULL AND release_year IS NOT NULL
                THEN trim(title) || ' (' || CAST(release_year AS VARCHAR) || ')'
            WHEN title IS NOT NULL THEN trim(title)
            WHEN release_year IS NOT NULL THEN CAST(release_year AS VARCHAR)
        END,
        CASE
            WHEN cardinality(genres) > 0
                THEN 'Genres: ' || array_to_string(genres, ', ')
        END
    ) AS text
FROM item
ORDER BY item_id
