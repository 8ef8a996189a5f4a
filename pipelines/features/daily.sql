-- merchant_daily: one row per (operator, merchant, business date) with anything on it.
--
-- Input: `resolved` (resolve.sql): each event once, with its voided / orphan flags.
--   * sales: sales not voided; a voided sale is counted in void_count on its own date;
--   * refunds: money out on their own business date (orphans included and counted);
--   * orphan voids: counted on the void's own date; they cancel nothing;
--   * night = local wall time 22:00–05:59 in the operator's zone; round = a multiple of
--     10,000 fen (100 yuan).
-- One pass over `resolved` (conditional aggregates), so the resolution runs once.
WITH flagged AS (
    SELECT
        operator_id, merchant_id, business_date, payer_ref, amount_fen, occurred_at,
        channel, local_minute_of_day, extra_deliveries, conflicting,
        kind = 'sale' AND NOT voided AS live,
        kind = 'sale' AND voided AS voided_sale,
        kind = 'refund' AS refund,
        kind = 'refund' AND orphan AS orphan_refund,
        kind = 'void' AND orphan AS orphan_void,
        local_minute_of_day >= 1320 OR local_minute_of_day < 360 AS night,
        amount_fen % 10000 = 0 AS round_amount
    FROM resolved
)
SELECT
    operator_id,
    business_date,
    merchant_id,
    sum(CASE WHEN live THEN 1 ELSE 0 END) AS sales_count,
    sum(CASE WHEN live THEN amount_fen ELSE 0 END) AS sales_fen,
    sum(CASE WHEN refund THEN 1 ELSE 0 END) AS refund_count,
    sum(CASE WHEN refund THEN amount_fen ELSE 0 END) AS refund_fen,
    sum(CASE WHEN voided_sale THEN 1 ELSE 0 END) AS void_count,
    sum(CASE WHEN live THEN amount_fen WHEN refund THEN -amount_fen ELSE 0 END) AS net_fen,
    sum(CASE WHEN orphan_refund THEN 1 ELSE 0 END) AS orphan_refund_count,
    sum(CASE WHEN orphan_void THEN 1 ELSE 0 END) AS orphan_void_count,
    count(DISTINCT CASE WHEN live THEN payer_ref END) AS distinct_payers,
    coalesce(max(CASE WHEN live THEN amount_fen END), 0) AS max_ticket_fen,
    min(CASE WHEN live THEN occurred_at END) AS first_sale_at,
    max(CASE WHEN live THEN occurred_at END) AS last_sale_at,
    sum(CASE WHEN live AND channel = 'wechat' THEN amount_fen ELSE 0 END) AS wechat_fen,
    sum(CASE WHEN live AND channel = 'alipay' THEN amount_fen ELSE 0 END) AS alipay_fen,
    sum(CASE WHEN live AND channel = 'unionpay_qr' THEN amount_fen ELSE 0 END) AS unionpay_qr_fen,
    sum(CASE WHEN live AND channel = 'bank_card' THEN amount_fen ELSE 0 END) AS bank_card_fen,
    sum(CASE WHEN live AND channel = 'cash' THEN amount_fen ELSE 0 END) AS cash_fen,
    sum(CASE WHEN live AND channel = 'other' THEN amount_fen ELSE 0 END) AS other_fen,
    sum(CASE WHEN live AND night THEN 1 ELSE 0 END) AS night_sales_count,
    sum(CASE WHEN live AND night THEN amount_fen ELSE 0 END) AS night_sales_fen,
    sum(CASE WHEN live AND round_amount THEN 1 ELSE 0 END) AS round_sales_count,
    sum(CASE WHEN live AND round_amount THEN amount_fen ELSE 0 END) AS round_sales_fen,
    sum(extra_deliveries) AS duplicate_deliveries,
    sum(CASE WHEN conflicting THEN 1 ELSE 0 END) AS conflicting_events
FROM flagged
GROUP BY operator_id, merchant_id, business_date
-- A row per day with a sale, a refund, a voided sale or an orphan void (a void whose sale
-- is on another date leaves no row of its own).
HAVING sum(CASE WHEN live OR refund OR voided_sale OR orphan_void THEN 1 ELSE 0 END) > 0
