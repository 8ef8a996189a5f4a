-- resolved: each event once, with what the other events say about it. A view.
--
-- Input: `uniq` (uniq.sql) and `links` (links.sql).
-- Output: one row per (operator_id, event_id) with every pos_events column of its first
-- arrival, plus:
--   extra_deliveries  later deliveries of the same event_id (POS retries, replays);
--   conflicting       a later delivery's content differs from the first;
--   voided            a sale that a void cancels (it leaves sales and counts);
--   orphan            a refund or void whose sale is not in `events`.
SELECT
    u.operator_id, u.business_date, u.event_id, u.merchant_id, u.terminal_id, u.kind,
    u.amount_fen, u.currency, u.occurred_at, u.utc_offset_seconds, u.local_minute_of_day,
    u.channel, u.ref_event_id, u.payer_ref, u.knowledge_time, u.extra_deliveries, u.conflicting,
    u.kind = 'sale' AND coalesce(l.voided, false) AS voided,
    u.kind <> 'sale' AND coalesce(l.orphan, false) AS orphan
FROM links l
RIGHT JOIN uniq u ON l.operator_id = u.operator_id AND l.event_id = u.event_id
