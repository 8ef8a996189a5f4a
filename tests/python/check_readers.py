"""Risk modellers' view: open streetflow's silver and gold tables with the `deltalake`
Python package and polars, check the documented columns and types, and recompute a few
values from the other tables.

Usage: python3 check_readers.py LAKE TRUTH_CSV AS_OF_DATE
Exits non-zero with a message on the first mismatch.
"""

import datetime as dt
import sys

import polars as pl
from deltalake import DeltaTable

lake, truth_csv, as_of = sys.argv[1], sys.argv[2], dt.date.fromisoformat(sys.argv[3])


def fail(message: str) -> None:
    print(f"python readers: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def check_types(frame: pl.DataFrame, expected: dict, table: str) -> None:
    for column, dtype in expected.items():
        if column not in frame.columns:
            fail(f"{table} has no column {column} (has {frame.columns})")
        if frame.schema[column] != dtype:
            fail(f"{table}.{column} is {frame.schema[column]}, documented as {dtype}")


# Silver through the deltalake package (PyArrow), as a data engineer would.
daily_table = DeltaTable(f"{lake}/merchant_daily")
daily = pl.from_arrow(daily_table.to_pyarrow_table())
check_types(
    daily,
    {
        "operator_id": pl.String,
        "business_date": pl.Date,
        "merchant_id": pl.String,
        "sales_count": pl.Int64,
        "sales_fen": pl.Int64,
        "refund_fen": pl.Int64,
        "net_fen": pl.Int64,
        "night_sales_fen": pl.Int64,
        "round_sales_count": pl.Int64,
        "first_sale_at": pl.Datetime("us", "UTC"),
    },
    "merchant_daily",
)
truth = pl.read_csv(truth_csv, try_parse_dates=True)
keys = ["operator_id", "merchant_id", "business_date"]
joined = truth.join(daily, on=keys, how="full", suffix="_silver", coalesce=True)
for column in ["sales_count", "sales_fen", "refund_fen", "void_count", "net_fen"]:
    differ = joined.filter(pl.col(column).ne_missing(pl.col(f"{column}_silver")))
    if differ.height:
        fail(f"merchant_daily.{column} differs from the generator's truth:\n{differ.head()}")
print(f"merchant_daily: {daily.height} rows equal the truth file; net {daily['net_fen'].sum():,} fen")

# Bitemporal silver: the rows as known at the latest knowledge time are merchant_daily.
history = pl.read_delta(f"{lake}/merchant_daily_history")
check_types(
    history,
    {
        "operator_id": pl.String,
        "business_month": pl.Date,
        "business_date": pl.Date,
        "merchant_id": pl.String,
        "known_from": pl.Datetime("us", "UTC"),
        "retracted": pl.Boolean,
        "net_fen": pl.Int64,
        "payers": pl.List(pl.Struct({"payer_key": pl.Int64, "visits": pl.Int64, "fen": pl.Int64})),
    },
    "merchant_daily_history",
)
latest = (
    history.sort("known_from")
    .group_by(keys)
    .last()
    .filter(~pl.col("retracted"))
)
together = daily.join(latest, on=keys, how="full", suffix="_history", coalesce=True)
for column in ["sales_count", "net_fen", "void_count", "distinct_payers"]:
    differ = together.filter(pl.col(column).ne_missing(pl.col(f"{column}_history")))
    if differ.height:
        fail(f"merchant_daily_history's latest {column} differs from merchant_daily:\n{differ.head()}")
payers = latest.select(pl.col("payers").list.len().alias("n"), "distinct_payers")
if payers.filter(pl.col("n") != pl.col("distinct_payers")).height:
    fail("a history row's payer entries do not match its distinct_payers")
print(f"merchant_daily_history: {history.height} versions; the latest of each key equal merchant_daily")

# Gold through polars' own reader, as a risk modeller would.
features = pl.read_delta(f"{lake}/merchant_features").filter(pl.col("as_of_date") == as_of)
check_types(
    features,
    {
        "as_of_date": pl.Date,
        "operator_id": pl.String,
        "merchant_id": pl.String,
        "knowledge_time": pl.Datetime("us", "UTC"),
        "net_fen_30d": pl.Int64,
        "net_fen_365d": pl.Int64,
        "active_days_90d": pl.Int64,
        "daily_net_cv_90d": pl.Float64,
        "trend_slope_26w": pl.Float64,
        "months_on_book": pl.Int64,
        "mcc": pl.String,
        "subsidy_sector": pl.String,
    },
    "merchant_features",
)
merchants = daily.select("operator_id", "merchant_id").unique()
if features.height != merchants.height:
    fail(f"merchant_features has {features.height} rows as of {as_of}, silver has {merchants.height} merchants")

# Every event was known by the features' knowledge time, so the 30-day net equals silver
# summed over the 30 days before the as-of date.
window = daily.filter(
    (pl.col("business_date") < as_of) & (pl.col("business_date") >= as_of - dt.timedelta(days=30))
)
expected = window.group_by("operator_id", "merchant_id").agg(pl.col("net_fen").sum().alias("expected"))
check = features.join(expected, on=["operator_id", "merchant_id"], how="left").with_columns(
    pl.col("expected").fill_null(0)
)
wrong = check.filter(pl.col("net_fen_30d") != pl.col("expected"))
if wrong.height:
    fail(f"net_fen_30d differs from silver summed in Python:\n{wrong.select('merchant_id', 'net_fen_30d', 'expected')}")
print(f"merchant_features: {features.height} rows as of {as_of}; net_fen_30d matches silver for each")

# Decisions: the shipped term loan needs 180 days on book; this lake has 60.
decisions = pl.read_delta(f"{lake}/credit_decisions").filter(pl.col("as_of_date") == as_of)
check_types(
    decisions,
    {
        "as_of_date": pl.Date,
        "product": pl.String,
        "merchant_id": pl.String,
        "decision": pl.String,
        "limit_fen": pl.Int64,
        "reasons": pl.List(pl.String),
        "subsidy_eligible": pl.Boolean,
        "policy_hash": pl.String,
        "feature_table_version": pl.Int64,
    },
    "credit_decisions",
)
if decisions.height != features.height:
    fail(f"credit_decisions has {decisions.height} rows, merchant_features {features.height}")
young = decisions.filter(
    (pl.col("decision") == "decline") & pl.col("reasons").list.contains("HISTORY_TOO_SHORT") & (pl.col("limit_fen") == 0)
)
if young.height != decisions.height:
    fail(f"every merchant should be declined for HISTORY_TOO_SHORT:\n{decisions.select('merchant_id', 'decision', 'reasons')}")
print(f"credit_decisions: {decisions.height} rows, all declined for HISTORY_TOO_SHORT (60 days on book)")
print("python readers: ok")
