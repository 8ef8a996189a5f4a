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
--
-- Two sorted passes and no joins (DataFusion streams both with bounded window operators):
--   1. per (operator_id, event_id), latest delivery first: the last row is the first
--      arrival; its row number is the number of deliveries, and the running min / max
--      of the content tell whether any two deliveries differ;
--   2. per family — a sale with the refunds and voids that name it (refunds and voids
--      group under their ref_event_id) — sale first, then voids, then refunds: a sale is
--      voided when the row after it is a void; a refund or void is an orphan when no
--      sale came before it.

WITH latest_first AS (
    SELECT
        e.*,
        row_number() OVER (
            PARTITION BY operator_id, event_id
            ORDER BY ingested_at DESC NULLS FIRST, kafka_partition DESC NULLS FIRST,
                kafka_offset DESC NULLS FIRST, source_file DESC NULLS FIRST, source_line DESC NULLS FIRST
        ) AS deliveries,
        lead(event_id) OVER (
            PARTITION BY operator_id, event_id
            ORDER BY ingested_at DESC NULLS FIRST, kafka_partition DESC NULLS FIRST,
                kafka_offset DESC NULLS FIRST, source_file DESC NULLS FIRST, source_line DESC NULLS FIRST
        ) IS NULL AS first_arrival,
        min(concat_ws('|', merchant_id, kind, CAST(amount_fen AS VARCHAR),
            CAST(occurred_at AS VARCHAR), channel, coalesce(ref_event_id, ''),
            coalesce(payer_ref, ''), coalesce(terminal_id, ''))) OVER (
            PARTITION BY operator_id, event_id
            ORDER BY ingested_at DESC NULLS FIRST, kafka_partition DESC NULLS FIRST,
                kafka_offset DESC NULLS FIRST, source_file DESC NULLS FIRST, source_line DESC NULLS FIRST
            ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
        ) AS content_min,
        max(concat_ws('|', merchant_id, kind, CAST(amount_fen AS VARCHAR),
            CAST(occurred_at AS VARCHAR), channel, coalesce(ref_event_id, ''),
            coalesce(payer_ref, ''), coalesce(terminal_id, ''))) OVER (
            PARTITION BY operator_id, event_id
            ORDER BY ingested_at DESC NULLS FIRST, kafka_partition DESC NULLS FIRST,
                kafka_offset DESC NULLS FIRST, source_file DESC NULLS FIRST, source_line DESC NULLS FIRST
            ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
        ) AS content_max
    FROM events e
),
uniq AS (
    SELECT
        operator_id, business_date, event_id, merchant_id, terminal_id, kind, amount_fen,
        currency, occurred_at, utc_offset_seconds, local_minute_of_day, channel,
        ref_event_id, payer_ref, ingested_at,
        deliveries - 1 AS extra_deliveries,
        content_min <> content_max AS conflicting,
        CASE WHEN kind = 'sale' THEN event_id ELSE ref_event_id END AS family,
        CASE WHEN kind = 'sale' THEN 0 WHEN kind = 'void' THEN 1 ELSE 2 END AS family_order
    FROM latest_first
    WHERE first_arrival
),
families AS (
    SELECT
        u.*,
        lead(kind) OVER (
            PARTITION BY operator_id, family ORDER BY family_order, event_id
        ) AS next_kind,
        max(CASE WHEN kind = 'sale' THEN 1 ELSE 0 END) OVER (
            PARTITION BY operator_id, family ORDER BY family_order, event_id
            ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW
        ) AS sale_before
    FROM uniq u
)
SELECT
    operator_id, business_date, event_id, merchant_id, terminal_id, kind, amount_fen,
    currency, occurred_at, utc_offset_seconds, local_minute_of_day, channel, ref_event_id,
    payer_ref, ingested_at, extra_deliveries, conflicting,
    kind = 'sale' AND coalesce(next_kind = 'void', false) AS voided,
    kind <> 'sale' AND sale_before = 0 AS orphan
FROM families
