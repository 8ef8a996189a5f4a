-- payer_sales over bitemporal silver: each payer's live sales per merchant over the 90
-- days before the as-of date, from the payer entries of `daily` (daily_as_of.sql).
-- Payers are told apart by their payer key; `payer_ref` is that key here.
SELECT
    u.operator_id, u.merchant_id, u.payer.payer_key AS payer_ref,
    sum(u.payer.visits) AS visits, sum(u.payer.fen) AS fen
FROM (
    SELECT d.operator_id, d.merchant_id, unnest(d.payers) AS payer
    FROM daily d
    CROSS JOIN params p
    WHERE d.business_date >= p.as_of_date - INTERVAL '90 days'
) u
GROUP BY u.operator_id, u.merchant_id, u.payer.payer_key
