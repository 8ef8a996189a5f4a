//! The SQL definitions, embedded from `pipelines/features/` so the binary is
//! self-contained; the files are the documentation and the single source.

/// One relation of the event resolution: its name, its SQL, and whether it is computed
/// once and kept in memory (a table) or left a view that its readers inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Relation name the later steps read.
    pub name: &'static str,
    /// The query.
    pub sql: &'static str,
    /// Computed once (small relations read several times) rather than a view.
    pub materialize: bool,
}

/// A [`Step`] whose SQL is `pipelines/features/<name>.sql`.
macro_rules! step {
    ($name:literal, materialize) => {
        step!($name, true)
    };
    ($name:literal, view) => {
        step!($name, false)
    };
    ($name:literal, $materialize:expr) => {
        Step {
            name: $name,
            sql: include_str!(concat!("../../../pipelines/features/", $name, ".sql")),
            materialize: $materialize,
        }
    };
}

/// Each event once, with its voided and orphan flags, over a relation `events` of bronze
/// rows: run in order, the last step is `resolved`. DuckDB runs the same steps in the
/// features benchmark.
pub const RESOLVE_STEPS: [Step; 5] = [
    step!("repeated_keys", materialize),
    step!("repeated", materialize),
    step!("uniq", view),
    step!("links", materialize),
    step!("resolved", view),
];

/// Daily cash flow per merchant over `resolved`.
pub const DAILY: &str = include_str!("../../../pipelines/features/daily.sql");

/// `daily` over bitemporal silver: each merchant-day of the lookback as the lake knew it
/// at its operator's knowledge time, with its payer entries.
pub const DAILY_AS_OF: &str = include_str!("../../../pipelines/features/daily_as_of.sql");

/// `payer_sales` over the payer entries of [`DAILY_AS_OF`].
pub const PAYER_SALES_AS_OF: &str =
    include_str!("../../../pipelines/features/payer_sales_as_of.sql");

/// Each payer's live sales per merchant over the 90 days before the as-of date.
pub const PAYER_SALES: &str = include_str!("../../../pipelines/features/payer_sales.sql");

/// The days each operator's feed delivered a sale or refund, over `daily`.
pub const FEED_DAYS: &str = include_str!("../../../pipelines/features/feed_days.sql");

/// Point-in-time merchant features over `daily`, `payer_sales` and the reference tables.
pub const MERCHANT_FEATURES: &str =
    include_str!("../../../pipelines/features/merchant_features.sql");

/// MCC ranges of the interest-subsidy sectors, with their effective dates.
pub const SUBSIDY_SECTORS: &str = include_str!("../../../pipelines/reference/subsidy_sectors.csv");

/// GB/T 4754 industry-code prefixes of the interest-subsidy sectors, with their
/// effective dates; a registered industry code decides before the MCC.
pub const SUBSIDY_INDUSTRIES: &str =
    include_str!("../../../pipelines/reference/subsidy_industries.csv");

/// The (operator, business date) pairs whose silver rows change when the rows of
/// `new_events` join `pos_events` ([`related_days`] of them).
pub(crate) fn touched_partitions() -> String {
    related_days("SELECT * FROM new_events")
}

/// The bronze rows the daily rows of `touched` days depend on ([`EVENTS_OF_DAYS`]).
pub(crate) const EVENTS_FOR_TOUCHED: &str = EVENTS_OF_DAYS;

/// The days whose rows events `events` (a relation of bronze rows) change: the days of
/// every delivery of their event ids, of the sales any delivery names, and of the
/// refunds and voids that name them.
pub(crate) fn related_days(events: &str) -> String {
    format!(
        "WITH changed AS ({events}),
        ids AS (SELECT DISTINCT operator_id, event_id FROM changed),
        refs AS (
            SELECT DISTINCT b.operator_id, b.ref_event_id AS event_id
            FROM ids i JOIN pos_events b ON b.operator_id = i.operator_id AND b.event_id = i.event_id
            WHERE b.ref_event_id IS NOT NULL
        )
        SELECT DISTINCT b.operator_id, b.business_date
        FROM ids i JOIN pos_events b ON b.operator_id = i.operator_id AND b.event_id = i.event_id
        UNION
        SELECT DISTINCT b.operator_id, b.business_date
        FROM refs r JOIN pos_events b ON b.operator_id = r.operator_id AND b.event_id = r.event_id
        UNION
        SELECT DISTINCT b.operator_id, b.business_date
        FROM ids i JOIN pos_events b ON b.operator_id = i.operator_id AND b.ref_event_id = i.event_id"
    )
}

/// The bronze rows the rows of the days in `touched` depend on: every delivery of their
/// events, of the sales those name, and of the refunds and voids that name their events.
pub(crate) const EVENTS_OF_DAYS: &str = "
WITH base AS (
    SELECT b.operator_id, b.event_id FROM touched t
    JOIN pos_events b ON b.operator_id = t.operator_id AND b.business_date = t.business_date
),
ids AS (SELECT DISTINCT operator_id, event_id FROM base),
named AS (
    SELECT DISTINCT b.operator_id, b.ref_event_id AS event_id
    FROM ids i JOIN pos_events b ON b.operator_id = i.operator_id AND b.event_id = i.event_id
    WHERE b.ref_event_id IS NOT NULL
),
naming AS (
    SELECT DISTINCT b.operator_id, b.event_id
    FROM ids i JOIN pos_events b ON b.operator_id = i.operator_id AND b.ref_event_id = i.event_id
),
wanted AS (
    SELECT operator_id, event_id FROM ids
    UNION SELECT operator_id, event_id FROM named
    UNION SELECT operator_id, event_id FROM naming
)
SELECT b.* FROM wanted w JOIN pos_events b ON b.operator_id = w.operator_id AND b.event_id = w.event_id";
