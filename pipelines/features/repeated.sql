-- repeated: the first arrival of every event delivered more than once (POS retries,
-- replays), with what its other deliveries say. Computed once and kept (a table).
--
-- Input: `events` and `repeated_keys` (repeated_keys.sql).
-- Output: one row per (operator_id, event_id) delivered twice or more, with every
-- pos_events column of its first arrival, plus:
--   extra_deliveries  later deliveries of the same event_id;
--   conflicting       a later delivery's content differs from the first.
-- First arrival = earliest knowledge_time, then Kafka partition and offset, then file and
-- line.
WITH ranked AS (
    SELECT
        e.operator_id, e.business_date, e.event_id, e.merchant_id, e.terminal_id, e.kind,
        e.amount_fen, e.currency, e.occurred_at, e.utc_offset_seconds,
        e.local_minute_of_day, e.channel, e.ref_event_id, e.payer_ref, e.knowledge_time,
        k.deliveries,
        row_number() OVER (
            PARTITION BY e.operator_id, e.event_id
            ORDER BY e.knowledge_time NULLS LAST, e.kafka_partition NULLS LAST,
                e.kafka_offset NULLS LAST, e.source_file NULLS LAST, e.source_line NULLS LAST
        ) AS arrival,
        min(concat_ws('|', e.merchant_id, e.kind, CAST(e.amount_fen AS VARCHAR),
            CAST(e.occurred_at AS VARCHAR), e.channel, coalesce(e.ref_event_id, ''),
            coalesce(e.payer_ref, ''), coalesce(e.terminal_id, '')))
            OVER (PARTITION BY e.operator_id, e.event_id) AS content_min,
        max(concat_ws('|', e.merchant_id, e.kind, CAST(e.amount_fen AS VARCHAR),
            CAST(e.occurred_at AS VARCHAR), e.channel, coalesce(e.ref_event_id, ''),
            coalesce(e.payer_ref, ''), coalesce(e.terminal_id, '')))
            OVER (PARTITION BY e.operator_id, e.event_id) AS content_max
    FROM repeated_keys k
    JOIN events e ON e.operator_id = k.operator_id AND e.event_id = k.event_id
)
SELECT
    operator_id, business_date, event_id, merchant_id, terminal_id, kind, amount_fen,
    currency, occurred_at, utc_offset_seconds, local_minute_of_day, channel, ref_event_id,
    payer_ref, knowledge_time,
    deliveries - 1 AS extra_deliveries,
    content_min <> content_max AS conflicting
FROM ranked
WHERE arrival = 1
