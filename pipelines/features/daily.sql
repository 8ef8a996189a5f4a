-- merchant_daily: one row per (operator, merchant, business date) with anything on it.
--
-- Input: `resolved` (resolve.sql): each event once, with its voided / orphan flags.
--   * sales: sales not voided; a voided sale is counted in void_count on its own date;
--   * refunds: money out on their own business date (orphans included and counted);
--   * orphan voids: counted on the void's own date; they cancel nothing;
--   * night = local wall time 22:00–05:59 in the operator's zone; round = a multiple of
--     10,000 fen (100 yuan).
WITH live_sales AS (
    SELECT * FROM resolved WHERE kind = 'sale' AND NOT voided
),
sale_days AS (
    SELECT
        operator_id, merchant_id, business_date,
        count(*) AS sales_count,
        sum(amount_fen) AS sales_fen,
        count(DISTINCT payer_ref) AS distinct_payers,
        max(amount_fen) AS max_ticket_fen,
        min(occurred_at) AS first_sale_at,
        max(occurred_at) AS last_sale_at,
        sum(CASE WHEN channel = 'wechat' THEN amount_fen ELSE 0 END) AS wechat_fen,
        sum(CASE WHEN channel = 'alipay' THEN amount_fen ELSE 0 END) AS alipay_fen,
        sum(CASE WHEN channel = 'unionpay_qr' THEN amount_fen ELSE 0 END) AS unionpay_qr_fen,
        sum(CASE WHEN channel = 'bank_card' THEN amount_fen ELSE 0 END) AS bank_card_fen,
        sum(CASE WHEN channel = 'cash' THEN amount_fen ELSE 0 END) AS cash_fen,
        sum(CASE WHEN channel = 'other' THEN amount_fen ELSE 0 END) AS other_fen,
        sum(CASE WHEN local_minute_of_day >= 1320 OR local_minute_of_day < 360 THEN 1 ELSE 0 END) AS night_sales_count,
        sum(CASE WHEN local_minute_of_day >= 1320 OR local_minute_of_day < 360 THEN amount_fen ELSE 0 END) AS night_sales_fen,
        sum(CASE WHEN amount_fen % 10000 = 0 THEN 1 ELSE 0 END) AS round_sales_count,
        sum(CASE WHEN amount_fen % 10000 = 0 THEN amount_fen ELSE 0 END) AS round_sales_fen
    FROM live_sales
    GROUP BY operator_id, merchant_id, business_date
),
refund_days AS (
    SELECT
        operator_id, merchant_id, business_date,
        count(*) AS refund_count,
        sum(amount_fen) AS refund_fen,
        sum(CASE WHEN orphan THEN 1 ELSE 0 END) AS orphan_refund_count
    FROM resolved
    WHERE kind = 'refund'
    GROUP BY operator_id, merchant_id, business_date
),
void_days AS (
    SELECT operator_id, merchant_id, business_date, count(*) AS void_count
    FROM resolved
    WHERE kind = 'sale' AND voided
    GROUP BY operator_id, merchant_id, business_date
),
orphan_void_days AS (
    SELECT operator_id, merchant_id, business_date, count(*) AS orphan_void_count
    FROM resolved
    WHERE kind = 'void' AND orphan
    GROUP BY operator_id, merchant_id, business_date
),
delivery_days AS (
    SELECT
        operator_id, merchant_id, business_date,
        sum(extra_deliveries) AS duplicate_deliveries,
        sum(CASE WHEN conflicting THEN 1 ELSE 0 END) AS conflicting_events
    FROM resolved
    GROUP BY operator_id, merchant_id, business_date
),
day_keys AS (
    SELECT operator_id, merchant_id, business_date FROM sale_days
    UNION
    SELECT operator_id, merchant_id, business_date FROM refund_days
    UNION
    SELECT operator_id, merchant_id, business_date FROM void_days
    UNION
    SELECT operator_id, merchant_id, business_date FROM orphan_void_days
)
SELECT
    k.operator_id,
    k.business_date,
    k.merchant_id,
    coalesce(s.sales_count, 0) AS sales_count,
    coalesce(s.sales_fen, 0) AS sales_fen,
    coalesce(r.refund_count, 0) AS refund_count,
    coalesce(r.refund_fen, 0) AS refund_fen,
    coalesce(v.void_count, 0) AS void_count,
    coalesce(s.sales_fen, 0) - coalesce(r.refund_fen, 0) AS net_fen,
    coalesce(r.orphan_refund_count, 0) AS orphan_refund_count,
    coalesce(o.orphan_void_count, 0) AS orphan_void_count,
    coalesce(s.distinct_payers, 0) AS distinct_payers,
    coalesce(s.max_ticket_fen, 0) AS max_ticket_fen,
    s.first_sale_at,
    s.last_sale_at,
    coalesce(s.wechat_fen, 0) AS wechat_fen,
    coalesce(s.alipay_fen, 0) AS alipay_fen,
    coalesce(s.unionpay_qr_fen, 0) AS unionpay_qr_fen,
    coalesce(s.bank_card_fen, 0) AS bank_card_fen,
    coalesce(s.cash_fen, 0) AS cash_fen,
    coalesce(s.other_fen, 0) AS other_fen,
    coalesce(s.night_sales_count, 0) AS night_sales_count,
    coalesce(s.night_sales_fen, 0) AS night_sales_fen,
    coalesce(s.round_sales_count, 0) AS round_sales_count,
    coalesce(s.round_sales_fen, 0) AS round_sales_fen,
    coalesce(d.duplicate_deliveries, 0) AS duplicate_deliveries,
    coalesce(d.conflicting_events, 0) AS conflicting_events
FROM day_keys k
LEFT JOIN sale_days s
    ON s.operator_id = k.operator_id AND s.merchant_id = k.merchant_id AND s.business_date = k.business_date
LEFT JOIN refund_days r
    ON r.operator_id = k.operator_id AND r.merchant_id = k.merchant_id AND r.business_date = k.business_date
LEFT JOIN void_days v
    ON v.operator_id = k.operator_id AND v.merchant_id = k.merchant_id AND v.business_date = k.business_date
LEFT JOIN orphan_void_days o
    ON o.operator_id = k.operator_id AND o.merchant_id = k.merchant_id AND o.business_date = k.business_date
LEFT JOIN delivery_days d
    ON d.operator_id = k.operator_id AND d.merchant_id = k.merchant_id AND d.business_date = k.business_date
