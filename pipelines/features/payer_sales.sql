-- payer_sales: each payer's live (not voided) sales per merchant over the 90 days before
-- the as-of date — the input of the payer features (distinct, repeat, top-5 share).
--
-- Input: `resolved` (resolve.sql) and params(as_of_date). Sales without a payer
-- reference (cash, anonymous cards) are left out.
SELECT r.operator_id, r.merchant_id, r.payer_ref, count(*) AS visits, sum(r.amount_fen) AS fen
FROM params p, resolved r
WHERE r.kind = 'sale' AND NOT r.voided AND r.payer_ref IS NOT NULL
    AND r.business_date < p.as_of_date
    AND r.business_date >= p.as_of_date - INTERVAL '90 days'
GROUP BY r.operator_id, r.merchant_id, r.payer_ref
