-- merchant_daily: one row per (operator, merchant, business date) with anything on it.
--
-- Input: `resolved` (resolve.sql): each event once, with its voided / orphan flags.
--   * sales: sales not voided; a voided sale is counted in void_count on its own date;
--   * refunds: money out on their own business date (orphans included and counted);
--   * orphan voids: counted on the void's own date; they cancel nothing;
--   * night = local wall time 22:00–05:59 in the operator's zone; round = a multiple of
--     10,000 fen (100 yuan).
-- One pass over `resolved` (conditional aggregates), so the resolution runs once. Rows are
-- summed per payer and day first, then per day, so distinct payers are a plain sum: a
-- COUNT(DISTINCT …) keeps a set per group and cost DataFusion ten times the memory.
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
),
per_payer AS (
    SELECT
        operator_id,
        business_date,
        merchant_id,
        max(CASE WHEN live AND payer_ref IS NOT NULL THEN 1 ELSE 0 END) AS live_payer,
        sum(CASE WHEN live THEN 1 ELSE 0 END) AS sales_count,
        sum(CASE WHEN live THEN amount_fen ELSE 0 END) AS sales_fen,
        sum(CASE WHEN refund THEN 1 ELSE 0 END) AS refund_count,
        sum(CASE WHEN refund THEN amount_fen ELSE 0 END) AS refund_fen,
        sum(CASE WHEN voided_sale THEN 1 ELSE 0 END) AS void_count,
        sum(CASE WHEN orphan_refund THEN 1 ELSE 0 END) AS orphan_refund_count,
        sum(CASE WHEN orphan_void THEN 1 ELSE 0 END) AS orphan_void_count,
        max(CASE WHEN live THEN amount_fen END) AS max_ticket_fen,
        min(CASE WHEN live THEN occurred_at END) AS first_sale_at,
        max(CASE WHEN live THEN occurred_at END) AS last_sale_at,
        sum(CASE WHEN live AND channel = 'wechat' THEN amount_fen ELSE 0 END) AS wechat_fen,
        sum(CASE WHEN live AND channel = 'alipay' THEN amount_fen ELSE 0 END) AS alipay_fen,
        sum(CASE WHEN live AND channel = 'unionpay_qr' THEN amount_fen ELSE 0 END)
            AS unionpay_qr_fen,
        sum(CASE WHEN live AND channel = 'bank_card' THEN amount_fen ELSE 0 END)
            AS bank_card_fen,
        sum(CASE WHEN live AND channel = 'cash' THEN amount_fen ELSE 0 END) AS cash_fen,
        sum(CASE WHEN live AND channel = 'other' THEN amount_fen ELSE 0 END) AS other_fen,
        sum(CASE WHEN live AND night THEN 1 ELSE 0 END) AS night_sales_count,
        sum(CASE WHEN live AND night THEN amount_fen ELSE 0 END) AS night_sales_fen,
        sum(CASE WHEN live AND round_amount THEN 1 ELSE 0 END) AS round_sales_count,
        sum(CASE WHEN live AND round_amount THEN amount_fen ELSE 0 END) AS round_sales_fen,
        sum(extra_deliveries) AS duplicate_deliveries,
        sum(CASE WHEN conflicting THEN 1 ELSE 0 END) AS conflicting_events
    FROM flagged
    GROUP BY operator_id, merchant_id, business_date, payer_ref
)
SELECT
    operator_id,
    business_date,
    merchant_id,
    sum(sales_count) AS sales_count,
    sum(sales_fen) AS sales_fen,
    sum(refund_count) AS refund_count,
    sum(refund_fen) AS refund_fen,
    sum(void_count) AS void_count,
    sum(sales_fen) - sum(refund_fen) AS net_fen,
    sum(orphan_refund_count) AS orphan_refund_count,
    sum(orphan_void_count) AS orphan_void_count,
    sum(live_payer) AS distinct_payers,
    coalesce(max(max_ticket_fen), 0) AS max_ticket_fen,
    min(first_sale_at) AS first_sale_at,
    max(last_sale_at) AS last_sale_at,
    sum(wechat_fen) AS wechat_fen,
    sum(alipay_fen) AS alipay_fen,
    sum(unionpay_qr_fen) AS unionpay_qr_fen,
    sum(bank_card_fen) AS bank_card_fen,
    sum(cash_fen) AS cash_fen,
    sum(other_fen) AS other_fen,
    sum(night_sales_count) AS night_sales_count,
    sum(night_sales_fen) AS night_sales_fen,
    sum(round_sales_count) AS round_sales_count,
    sum(round_sales_fen) AS round_sales_fen,
    sum(duplicate_deliveries) AS duplicate_deliveries,
    sum(conflicting_events) AS conflicting_events
FROM per_payer
GROUP BY operator_id, merchant_id, business_date
-- A row per day with a sale, a refund, a voided sale or an orphan void (a void whose sale
-- is on another date leaves no row of its own).
HAVING sum(sales_count) + sum(refund_count) + sum(void_count) + sum(orphan_void_count) > 0
