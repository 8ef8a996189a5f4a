-- merchant_features v1: one row per merchant as of a date, from what was known then.
--
-- Inputs (registered by `streetflow features`):
--   params(as_of_date DATE)                                     one row
--   knowledge(operator_id, knowledge_time)                      per operator: events
--              ingested after it are not in `daily` or `payer_sales`
--   calendar(business_date DATE, days_before BIGINT)            D-1 (1) … D-456 (456)
--   daily      daily.sql over resolved.sql over the events ingested by the knowledge
--              time with business dates from D-456; business dates < D
--   payer_sales payer_sales.sql over the same resolved events
--   (streetflow computes both in one pass over the events, equal to these definitions)
--   feed_days(operator_id, business_date)                       feed_days.sql over `daily`:
--              the days each operator's feed delivered a sale or refund
--   registry(operator_id, merchant_id, mcc, industry_code, opened_on, monthly_rent_fen)
--              the registry versions valid on D-1 (empty without --registry)
--   subsidy_sectors(sector, mcc_from, mcc_to, effective_from, effective_to)
--              pipelines/reference/subsidy_sectors.csv; the narrowest MCC range wins
--   subsidy_industries(sector, industry_prefix, effective_from, effective_to)
--              pipelines/reference/subsidy_industries.csv (GB/T 4754 prefixes); a
--              registered industry code that matches decides before the MCC
--
-- Conventions: windows end the day before the as-of date D; "N days" = D-N … D-1.
-- Days without sales are zeros (dense calendar) from the merchant's history start,
-- which is the later of its opening date (registry; else its first known event) and
-- the first day its operator's feed delivered a sale or refund (feed_days). A window
-- longer than that history covers the days on book only. Ratios are NULL when their denominator is
-- zero or undefined. Money is BIGINT fen.
WITH p AS (SELECT as_of_date FROM params),
feed_start AS (
    SELECT operator_id, min(business_date) AS first_feed_day FROM feed_days GROUP BY operator_id
),
seen AS (
    SELECT operator_id, merchant_id, min(business_date) AS first_seen
    FROM daily
    GROUP BY operator_id, merchant_id
),
merchants AS (
    SELECT
        coalesce(s.operator_id, r.operator_id) AS operator_id,
        coalesce(s.merchant_id, r.merchant_id) AS merchant_id,
        r.mcc, r.industry_code, r.opened_on, r.monthly_rent_fen,
        coalesce(r.opened_on, s.first_seen) AS started_on
    FROM seen s
    FULL OUTER JOIN registry r ON r.operator_id = s.operator_id AND r.merchant_id = s.merchant_id
),
on_book AS (
    SELECT
        m.*,
        greatest(m.started_on, coalesce(f.first_feed_day, m.started_on)) AS history_start
    FROM merchants m
    LEFT JOIN feed_start f ON f.operator_id = m.operator_id
),
dense AS (
    SELECT
        b.operator_id, b.merchant_id, c.business_date, c.days_before,
        coalesce(d.sales_count, 0) AS sales_count,
        coalesce(d.sales_fen, 0) AS sales_fen,
        coalesce(d.refund_fen, 0) AS refund_fen,
        coalesce(d.net_fen, 0) AS net_fen,
        coalesce(d.night_sales_fen, 0) AS night_sales_fen,
        coalesce(d.round_sales_count, 0) AS round_sales_count,
        CASE WHEN f.business_date IS NULL THEN 0 ELSE 1 END AS feed_day,
        CASE WHEN date_part('dow', c.business_date) IN (0, 6) THEN 1 ELSE 0 END AS weekend
    FROM on_book b
    JOIN calendar c ON c.business_date >= b.history_start
    LEFT JOIN daily d
        ON d.operator_id = b.operator_id AND d.merchant_id = b.merchant_id AND d.business_date = c.business_date
    LEFT JOIN feed_days f ON f.operator_id = b.operator_id AND f.business_date = c.business_date
),
windows AS (
    SELECT
        operator_id, merchant_id,
        sum(CASE WHEN days_before <= 7 THEN net_fen ELSE 0 END) AS net_fen_7d,
        sum(CASE WHEN days_before <= 30 THEN net_fen ELSE 0 END) AS net_fen_30d,
        sum(CASE WHEN days_before <= 90 THEN net_fen ELSE 0 END) AS net_fen_90d,
        sum(CASE WHEN days_before <= 180 THEN net_fen ELSE 0 END) AS net_fen_180d,
        sum(CASE WHEN days_before <= 365 THEN net_fen ELSE 0 END) AS net_fen_365d,
        sum(CASE WHEN days_before BETWEEN 31 AND 60 THEN net_fen ELSE 0 END) AS net_fen_prev_30d,
        sum(CASE WHEN days_before BETWEEN 366 AND 455 THEN net_fen ELSE 0 END) AS net_fen_90d_last_year,
        sum(CASE WHEN days_before <= 30 THEN sales_count ELSE 0 END) AS sales_count_30d,
        sum(CASE WHEN days_before <= 90 THEN sales_count ELSE 0 END) AS sales_count_90d,
        sum(CASE WHEN days_before <= 30 THEN sales_fen ELSE 0 END) AS sales_fen_30d,
        sum(CASE WHEN days_before <= 90 THEN sales_fen ELSE 0 END) AS sales_fen_90d,
        sum(CASE WHEN days_before <= 90 THEN refund_fen ELSE 0 END) AS refund_fen_90d,
        sum(CASE WHEN days_before <= 30 AND sales_count > 0 THEN 1 ELSE 0 END) AS active_days_30d,
        sum(CASE WHEN days_before <= 90 AND sales_count > 0 THEN 1 ELSE 0 END) AS active_days_90d,
        sum(CASE WHEN days_before <= 90 THEN weekend * sales_fen ELSE 0 END) AS weekend_fen_90d,
        sum(CASE WHEN days_before <= 90 THEN night_sales_fen ELSE 0 END) AS night_fen_90d,
        sum(CASE WHEN days_before <= 90 THEN round_sales_count ELSE 0 END) AS round_count_90d,
        sum(CASE WHEN days_before <= 90 THEN feed_day ELSE 0 END) AS feed_days_90d,
        sum(CASE WHEN days_before <= 90 THEN 1 ELSE 0 END) AS book_days_90d,
        sum(CASE WHEN days_before <= 30 THEN 1 ELSE 0 END) AS book_days_30d,
        sum(CASE WHEN days_before <= 180 THEN 1 ELSE 0 END) AS book_days_180d,
        sum(CASE WHEN days_before BETWEEN 31 AND 60 THEN 1 ELSE 0 END) AS book_days_prev_30d,
        sum(CASE WHEN days_before BETWEEN 366 AND 455 THEN 1 ELSE 0 END) AS book_days_last_year,
        stddev_pop(CASE WHEN days_before <= 90 THEN CAST(net_fen AS DOUBLE) END) AS net_stddev_90d,
        avg(CASE WHEN days_before <= 90 THEN CAST(net_fen AS DOUBLE) END) AS net_mean_90d,
        min(CASE WHEN sales_count > 0 THEN days_before END) AS days_since_last_sale
    FROM dense
    GROUP BY operator_id, merchant_id
),
-- Longest run of consecutive zero-sales days in the last 90 (gaps and islands).
zero_runs AS (
    SELECT operator_id, merchant_id, days_before - row_number() OVER (
        PARTITION BY operator_id, merchant_id ORDER BY days_before) AS run
    FROM dense
    WHERE days_before <= 90 AND sales_count = 0
),
zero_streaks AS (
    SELECT operator_id, merchant_id, max(n) AS max_zero_streak_90d
    FROM (SELECT operator_id, merchant_id, run, count(*) AS n FROM zero_runs GROUP BY operator_id, merchant_id, run) runs
    GROUP BY operator_id, merchant_id
),
-- Trend: OLS slope of ln(1 + weekly net yuan) over the last 26 full weeks on book.
weeks AS (
    SELECT
        operator_id, merchant_id,
        25 - CAST((days_before - 1) / 7 AS BIGINT) AS week,
        sum(net_fen) AS net_fen,
        count(*) AS days
    FROM dense
    WHERE days_before <= 182
    GROUP BY operator_id, merchant_id, 25 - CAST((days_before - 1) / 7 AS BIGINT)
),
trends AS (
    SELECT
        operator_id, merchant_id,
        CASE WHEN count(*) >= 4 THEN regr_slope(
            ln(1.0 + greatest(CAST(net_fen AS DOUBLE), 0.0) / 100.0), CAST(week AS DOUBLE)) END AS trend_slope_26w
    FROM weeks
    WHERE days = 7
    GROUP BY operator_id, merchant_id
),
-- Payers over the last 90 days (payer_sales.sql).
payers AS (
    SELECT
        operator_id, merchant_id,
        count(*) AS distinct_payers_90d,
        CAST(sum(CASE WHEN visits >= 2 THEN 1 ELSE 0 END) AS DOUBLE) / count(*) AS repeat_payer_ratio_90d
    FROM payer_sales
    GROUP BY operator_id, merchant_id
),
top_payers AS (
    SELECT operator_id, merchant_id, sum(fen) AS top5_fen
    FROM (
        SELECT operator_id, merchant_id, fen, row_number() OVER (
            PARTITION BY operator_id, merchant_id ORDER BY fen DESC, payer_ref) AS rank
        FROM payer_sales
    ) ranked
    WHERE rank <= 5
    GROUP BY operator_id, merchant_id
),
features AS (
    SELECT
        b.operator_id,
        b.merchant_id,
        (SELECT as_of_date FROM p) AS as_of_date,
        k.knowledge_time,
        CAST(greatest(date_part('epoch', (SELECT as_of_date FROM p)) - date_part('epoch', b.history_start), 0) / 86400 AS BIGINT) AS days_on_book,
        coalesce(w.net_fen_7d, 0) AS net_fen_7d,
        coalesce(w.net_fen_30d, 0) AS net_fen_30d,
        coalesce(w.net_fen_90d, 0) AS net_fen_90d,
        coalesce(w.net_fen_180d, 0) AS net_fen_180d,
        coalesce(w.net_fen_365d, 0) AS net_fen_365d,
        coalesce(w.sales_count_30d, 0) AS sales_count_30d,
        coalesce(w.sales_count_90d, 0) AS sales_count_90d,
        coalesce(w.active_days_30d, 0) AS active_days_30d,
        coalesce(w.active_days_90d, 0) AS active_days_90d,
        CAST(w.active_days_30d AS DOUBLE) / nullif(w.book_days_30d, 0) AS active_day_ratio_30d,
        CAST(w.active_days_90d AS DOUBLE) / nullif(w.book_days_90d, 0) AS active_day_ratio_90d,
        w.sales_fen_30d / nullif(w.sales_count_30d, 0) AS avg_ticket_fen_30d,
        w.sales_fen_90d / nullif(w.sales_count_90d, 0) AS avg_ticket_fen_90d,
        CAST(w.refund_fen_90d AS DOUBLE) / nullif(w.sales_fen_90d, 0) AS refund_ratio_90d,
        CASE WHEN w.net_mean_90d > 0 THEN w.net_stddev_90d / w.net_mean_90d END AS daily_net_cv_90d,
        CASE WHEN w.book_days_prev_30d = 30 AND w.net_fen_prev_30d > 0
            THEN CAST(w.net_fen_30d AS DOUBLE) / w.net_fen_prev_30d - 1 END AS growth_mom_30d,
        CASE WHEN w.book_days_last_year = 90 AND w.net_fen_90d_last_year > 0
            THEN CAST(w.net_fen_90d AS DOUBLE) / w.net_fen_90d_last_year - 1 END AS growth_yoy_90d,
        t.trend_slope_26w,
        coalesce(z.max_zero_streak_90d, 0) AS max_zero_streak_90d,
        w.days_since_last_sale,
        CAST(w.weekend_fen_90d AS DOUBLE) / nullif(w.sales_fen_90d, 0) AS weekend_share_90d,
        CAST(w.night_fen_90d AS DOUBLE) / nullif(w.sales_fen_90d, 0) AS night_share_90d,
        CAST(w.round_count_90d AS DOUBLE) / nullif(w.sales_count_90d, 0) AS round_amount_share_90d,
        CASE WHEN w.net_fen_180d > 0 AND w.book_days_30d > 0
            THEN (CAST(w.net_fen_30d AS DOUBLE) / w.book_days_30d) / (CAST(w.net_fen_180d AS DOUBLE) / w.book_days_180d)
        END AS spike_ratio_30d_180d,
        coalesce(py.distinct_payers_90d, 0) AS distinct_payers_90d,
        py.repeat_payer_ratio_90d,
        CAST(tp.top5_fen AS DOUBLE) / nullif(w.sales_fen_90d, 0) AS top5_payer_share_90d,
        CAST(
            (date_part('year', (SELECT as_of_date FROM p)) * 12 + date_part('month', (SELECT as_of_date FROM p)))
            - (date_part('year', b.started_on) * 12 + date_part('month', b.started_on))
            - CASE WHEN date_part('day', (SELECT as_of_date FROM p)) < date_part('day', b.started_on) THEN 1 ELSE 0 END
        AS BIGINT) AS months_on_book,
        CAST(w.feed_days_90d AS DOUBLE) / nullif(w.book_days_90d, 0) AS coverage_ratio_90d,
        CASE WHEN w.net_fen_90d > 0 THEN CAST(b.monthly_rent_fen * 3 AS DOUBLE) / w.net_fen_90d END AS rent_to_turnover_90d,
        b.mcc,
        b.industry_code
    FROM on_book b
    LEFT JOIN windows w ON w.operator_id = b.operator_id AND w.merchant_id = b.merchant_id
    LEFT JOIN zero_streaks z ON z.operator_id = b.operator_id AND z.merchant_id = b.merchant_id
    LEFT JOIN trends t ON t.operator_id = b.operator_id AND t.merchant_id = b.merchant_id
    LEFT JOIN payers py ON py.operator_id = b.operator_id AND py.merchant_id = b.merchant_id
    LEFT JOIN top_payers tp ON tp.operator_id = b.operator_id AND tp.merchant_id = b.merchant_id
    LEFT JOIN knowledge k ON k.operator_id = b.operator_id
    WHERE b.history_start < (SELECT as_of_date FROM p)
),
-- Subsidy sector: the registered industry code decides when it matches (longest prefix),
-- else the MCC (narrowest range); only entries in effect on the as-of date count. Read
-- from on_book, not features: DataFusion would compute every feature again per reference.
sector_matches AS (
    SELECT f.operator_id, f.merchant_id, s.sector, 0 AS source, -length(s.industry_prefix) AS width
    FROM on_book f
    CROSS JOIN p
    JOIN subsidy_industries s
        ON starts_with(f.industry_code, s.industry_prefix)
        AND s.effective_from <= p.as_of_date
        AND (s.effective_to IS NULL OR p.as_of_date <= s.effective_to)
    UNION ALL
    SELECT f.operator_id, f.merchant_id, s.sector, 1 AS source, s.mcc_to - s.mcc_from AS width
    FROM on_book f
    CROSS JOIN p
    JOIN subsidy_sectors s
        ON CAST(f.mcc AS BIGINT) BETWEEN s.mcc_from AND s.mcc_to
        AND s.effective_from <= p.as_of_date
        AND (s.effective_to IS NULL OR p.as_of_date <= s.effective_to)
),
sectors AS (
    SELECT operator_id, merchant_id, sector
    FROM (
        SELECT operator_id, merchant_id, sector, row_number() OVER (
            PARTITION BY operator_id, merchant_id ORDER BY source, width, sector) AS rank
        FROM sector_matches
    ) matches
    WHERE rank = 1
)
SELECT
    f.*,
    CASE WHEN f.mcc IS NULL THEN NULL ELSE
        percent_rank() OVER (PARTITION BY f.operator_id, f.mcc ORDER BY f.net_fen_90d) END AS peer_pct_net_90d,
    s.sector AS subsidy_sector
FROM features f
LEFT JOIN sectors s ON s.operator_id = f.operator_id AND s.merchant_id = f.merchant_id
