-- resolved: each event once, with what the other events say about it.
--
-- Input: `events`, rows with the columns of pos_events (all of bronze for the silver
-- table; for point-in-time features, only the rows known at the knowledge time).
-- Output: one row per (operator_id, event_id) with every pos_events column of its first
-- arrival, plus:
--   extra_deliveries  later deliveries of the same event_id (POS retries, replays);
--   conflicting       a later delivery's content differs from the first;
--   voided            a sale that a void cancels (it leaves sales and counts);
--   orphan            a refund or void whose sale is not in `events`.
-- First arrival = earliest ingested_at, then Kafka partition and offset, then file and line.
WITH ranked AS (
    SELECT
        e.*,
        row_number() OVER (
            PARTITION BY operator_id, event_id
            ORDER BY ingested_at, kafka_partition, kafka_offset, source_file, source_line
        ) AS arrival
    FROM events e
),
deliveries AS (
    SELECT
        operator_id,
        event_id,
        count(*) - 1 AS extra_deliveries,
        count(DISTINCT concat_ws('|', merchant_id, kind, CAST(amount_fen AS VARCHAR),
            CAST(occurred_at AS VARCHAR), channel, coalesce(ref_event_id, ''),
            coalesce(payer_ref, ''), coalesce(terminal_id, ''))) > 1 AS conflicting
    FROM events
    GROUP BY operator_id, event_id
),
uniq AS (
    SELECT r.*, d.extra_deliveries, d.conflicting
    FROM ranked r
    JOIN deliveries d ON r.operator_id = d.operator_id AND r.event_id = d.event_id
    WHERE r.arrival = 1
),
sale_ids AS (SELECT operator_id, event_id FROM uniq WHERE kind = 'sale'),
voided_ids AS (SELECT DISTINCT operator_id, ref_event_id FROM uniq WHERE kind = 'void')
SELECT
    u.operator_id, u.business_date, u.event_id, u.merchant_id, u.terminal_id, u.kind,
    u.amount_fen, u.currency, u.occurred_at, u.utc_offset_seconds, u.local_minute_of_day,
    u.channel, u.ref_event_id, u.payer_ref, u.ingested_at,
    u.extra_deliveries,
    u.conflicting,
    u.kind = 'sale' AND v.ref_event_id IS NOT NULL AS voided,
    u.kind <> 'sale' AND s.event_id IS NULL AS orphan
FROM uniq u
LEFT JOIN voided_ids v
    ON u.kind = 'sale' AND v.operator_id = u.operator_id AND v.ref_event_id = u.event_id
LEFT JOIN sale_ids s
    ON u.kind <> 'sale' AND s.operator_id = u.operator_id AND s.event_id = u.ref_event_id
