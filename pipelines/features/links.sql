-- links: what refunds and voids say about sales, one row per event it concerns. Computed
-- once and kept (a table; it is small: refunds and voids are a few per cent of events).
--
-- Input: `uniq` (uniq.sql), each event once.
-- Output: (operator_id, event_id, voided, orphan) for
--   * every sale a void names: voided (a voided sale leaves sales and counts);
--   * every refund or void whose sale is not in `uniq`: orphan.
-- Both can name one event only when a void names a refund or another void; the flags
-- are combined so each event has one row.
WITH claims AS (
    SELECT operator_id, event_id, kind, ref_event_id FROM uniq WHERE kind <> 'sale'
),
answered AS (
    SELECT c.operator_id, c.event_id
    FROM claims c
    JOIN uniq s ON s.operator_id = c.operator_id AND s.event_id = c.ref_event_id
    WHERE s.kind = 'sale'
),
flags AS (
    SELECT operator_id, ref_event_id AS event_id, true AS voided, false AS orphan
    FROM claims
    WHERE kind = 'void' AND ref_event_id IS NOT NULL
    UNION ALL
    SELECT c.operator_id, c.event_id, false AS voided, true AS orphan
    FROM claims c
    WHERE NOT EXISTS (
        SELECT 1 FROM answered a WHERE a.operator_id = c.operator_id AND a.event_id = c.event_id
    )
)
SELECT operator_id, event_id, bool_or(voided) AS voided, bool_or(orphan) AS orphan
FROM flags
GROUP BY operator_id, event_id
