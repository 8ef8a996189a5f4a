-- feed_days: the business days on which each operator's feed delivered a sale (voided or
-- not) or a refund of any of its merchants, over `daily` (daily.sql).
--
-- A day with only voids does not count: whether a void leaves a daily row depends on
-- where its sale is, which the serving path cannot know without resolving the operator's
-- whole feed. With sales and refunds only, it takes the same days straight from bronze
-- (a sale or refund row of the operator ingested by the knowledge time).
SELECT DISTINCT operator_id, business_date
FROM daily
WHERE sales_count + void_count + refund_count > 0
