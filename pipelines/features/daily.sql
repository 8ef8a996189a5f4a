-- merchant_daily: one row per (operator, merchant, business date) with anything on it.
--
-- Input: `resolved` (resolve.sql): each event once, with its voided / orphan flags.
--   * sales: sales not voided; a voided sale is counted in void_count on its own date;
--   * refunds: money out on their own business date (orphans included and counted);
--   * orphan voids: counted on the void's own date; they cancel nothing;
--   * night = local wall time 22:00–05:59 in the operator's zone; round = a multiple of
--     10,000 fen (100 yuan).
-- Two aggregates over `resolved`: the sums per merchant-day (conditional aggregates, few
-- groups), and the distinct payers per merchant-day from the distinct (day, payer) pairs
-- of live sales — one key per sale, so that aggregate carries no sums. (Summing all
-- columns per payer first cost DataFusion most of the job; COUNT(DISTINCT …) keeps a set
-- per group and cost it ten times the memory.)
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
days AS (
    SELECT
        operator_id,
        business_date,
        merchant_id,
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
    GROUP BY operator_id, merchant_id, business_date
    -- A row per day with a sale, a refund, a voided sale or an orphan void (a void whose
    -- sale is on another date leaves no row of its own).
    HAVING sum(CASE WHEN live OR refund OR voided_sale OR orphan_void THEN 1 ELSE 0 END) > 0
),
payers AS (
    SELECT operator_id, merchant_id, business_date, count(*) AS distinct_payers
    FROM (
        SELECT DISTINCT operator_id, merchant_id, business_date, payer_ref
        FROM flagged
        WHERE live AND payer_ref IS NOT NULL
    ) day_payers
    GROUP BY operator_id, merchant_id, business_date
)
SELECT
    d.operator_id,
    d.business_date,
    d.merchant_id,
    d.sales_count,
    d.sales_fen,
    d.refund_count,
    d.refund_fen,
    d.void_count,
    d.sales_fen - d.refund_fen AS net_fen,
    d.orphan_refund_count,
    d.orphan_void_count,
    coalesce(p.distinct_payers, 0) AS distinct_payers,
    coalesce(d.max_ticket_fen, 0) AS max_ticket_fen,
    d.first_sale_at,
    d.last_sale_at,
    d.wechat_fen,
    d.alipay_fen,
    d.unionpay_qr_fen,
    d.bank_card_fen,
    d.cash_fen,
    d.other_fen,
    d.night_sales_count,
    d.night_sales_fen,
    d.round_sales_count,
    d.round_sales_fen,
    d.duplicate_deliveries,
    d.conflicting_events,
    -- The partition column: the first day of the business date's month.
    CAST(date_trunc('month', d.business_date) AS DATE) AS business_month
FROM payers p
RIGHT JOIN days d
    ON p.operator_id = d.operator_id AND p.merchant_id = d.merchant_id
    AND p.business_date = d.business_date
