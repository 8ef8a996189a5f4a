-- links: what refunds and voids say about sales, one row per event it concerns. Computed
-- once and kept (a table; it is small: refunds and voids are a few per cent of events).
--
-- Input: `uniq` (uniq.sql), each event once.
-- Output: (operator_id, event_id, voided, orphan) for
--   * every sale a matching void names: voided (a voided sale leaves sales and counts);
--   * every refund or void that matches no sale: orphan.
-- A refund or void matches the sale it names only if that sale is the same merchant's
-- (one shop cannot cancel or refund another's sale), and a void only if its amount is
-- the sale's (a void cancels a whole sale; part of one is a refund). An orphan cancels
-- nothing; an orphan refund is still money out of its own merchant.
-- Both flags can concern one event only when a void names a refund or another void;
-- they are combined so each event has one row.
WITH claims AS (
    SELECT operator_id, event_id, merchant_id, kind, amount_fen, ref_event_id
    FROM uniq WHERE kind <> 'sale'
),
answered AS (
    SELECT c.operator_id, c.event_id, c.kind, c.ref_event_id
    FROM claims c
    JOIN uniq s ON s.operator_id = c.operator_id AND s.event_id = c.ref_event_id
    WHERE s.kind = 'sale'
      AND s.merchant_id = c.merchant_id
      AND (c.kind <> 'void' OR s.amount_fen = c.amount_fen)
),
flags AS (
    SELECT operator_id, ref_event_id AS event_id, true AS voided, false AS orphan
    FROM answered
    WHERE kind = 'void'
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
