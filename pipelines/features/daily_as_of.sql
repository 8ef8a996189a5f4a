-- daily as the lake knew it: each (operator, merchant, business date) of the 456 days
-- before the as-of date, in the version of bitemporal silver (`merchant_daily_history`)
-- in force at its operator's knowledge time, retractions dropped. The `daily` relation
-- of merchant_features.sql over bitemporal silver, with each row's payer entries.
--
-- Inputs: merchant_daily_history, params(as_of_date), knowledge(operator_id,
-- knowledge_time). `streetflow bench features` runs it in DuckDB beside streetflow.
SELECT
    operator_id, business_date, merchant_id, sales_count, sales_fen, refund_count,
    refund_fen, void_count, net_fen, orphan_refund_count, orphan_void_count,
    distinct_payers, max_ticket_fen, first_sale_at, last_sale_at, wechat_fen, alipay_fen,
    unionpay_qr_fen, bank_card_fen, cash_fen, other_fen, night_sales_count,
    night_sales_fen, round_sales_count, round_sales_fen, duplicate_deliveries,
    conflicting_events, payers
FROM (
    SELECT
        h.*,
        row_number() OVER (
            PARTITION BY h.operator_id, h.merchant_id, h.business_date
            ORDER BY h.known_from DESC
        ) AS newest
    FROM merchant_daily_history h
    JOIN knowledge k ON k.operator_id = h.operator_id
    CROSS JOIN params p
    WHERE h.known_from <= k.knowledge_time
        AND h.business_date >= p.as_of_date - INTERVAL '456 days'
        AND h.business_date < p.as_of_date
) versions
WHERE newest = 1 AND NOT retracted
