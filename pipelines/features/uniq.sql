-- uniq: each event once — the events delivered once as they are, and the first arrival
-- of the others from `repeated` (repeated.sql). A view over `events` and `repeated`.
SELECT
    operator_id, business_date, event_id, merchant_id, terminal_id, kind, amount_fen,
    currency, occurred_at, utc_offset_seconds, local_minute_of_day, channel, ref_event_id,
    payer_ref, knowledge_time,
    CAST(0 AS BIGINT) AS extra_deliveries,
    false AS conflicting
FROM events e
WHERE NOT EXISTS (
    SELECT 1 FROM repeated r WHERE r.operator_id = e.operator_id AND r.event_id = e.event_id
)
UNION ALL
SELECT
    operator_id, business_date, event_id, merchant_id, terminal_id, kind, amount_fen,
    currency, occurred_at, utc_offset_seconds, local_minute_of_day, channel, ref_event_id,
    payer_ref, knowledge_time, extra_deliveries, conflicting
FROM repeated
