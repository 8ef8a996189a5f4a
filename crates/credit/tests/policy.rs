//! Policies on small hand-made feature tables: each rule, reason, the limit formula with
//! its rounding and caps, and the checks a policy file gets before it runs.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

use std::collections::BTreeMap;
use std::sync::Arc;

use streetflow_core::tables::MERCHANT_FEATURES;
use streetflow_credit::{Decision, Outcome, Policy, PreparedPolicy, evaluate};
use streetflow_lake::arrow::array::{
    ArrayRef, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use streetflow_lake::arrow::datatypes::DataType;
use streetflow_lake::datafusion::datasource::MemTable;
use streetflow_lake::datafusion::prelude::SessionContext;

/// A feature value in a hand-made row.
#[derive(Clone, Copy)]
enum V {
    I(i64),
    F(f64),
    S(&'static str),
    Null,
}

/// A healthy merchant's features; each test row overrides some.
fn defaults() -> BTreeMap<&'static str, V> {
    BTreeMap::from([
        ("days_on_book", V::I(400)),
        ("net_fen_90d", V::I(9_000_000)),
        ("net_fen_365d", V::I(40_000_000)),
        ("daily_net_cv_90d", V::F(0.37)),
        ("round_amount_share_90d", V::F(0.02)),
        ("mcc", V::S("5812")),
        ("subsidy_sector", V::S("catering_accommodation")),
    ])
}

/// A `merchant_features` table with one row per (merchant, overrides).
fn features(rows: &[(&str, Vec<(&'static str, V)>)]) -> RecordBatch {
    let schema = MERCHANT_FEATURES.schema.clone();
    let rows: Vec<(String, BTreeMap<&str, V>)> = rows
        .iter()
        .map(|(merchant, overrides)| {
            let mut values = defaults();
            values.extend(overrides.iter().copied());
            ((*merchant).to_owned(), values)
        })
        .collect();
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|field| -> ArrayRef {
            let name = field.name().as_str();
            let value = |values: &BTreeMap<&str, V>| values.get(name).copied();
            match (name, field.data_type()) {
                ("merchant_id", _) => Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|(m, _)| m.as_str()),
                )),
                ("operator_id", _) => Arc::new(StringArray::from(vec!["lane"; rows.len()])),
                ("feature_set", _) => Arc::new(StringArray::from(vec!["v1"; rows.len()])),
                ("as_of_date", _) => Arc::new(Date32Array::from(vec![20_454; rows.len()])),
                ("knowledge_time", _) => Arc::new(
                    TimestampMicrosecondArray::from(vec![0; rows.len()]).with_timezone("UTC"),
                ),
                (_, DataType::Int64) => Arc::new(Int64Array::from(
                    rows.iter()
                        .map(|(_, v)| match value(v) {
                            Some(V::I(n)) => Some(n),
                            Some(V::Null) => None,
                            _ => Some(0),
                        })
                        .collect::<Vec<_>>(),
                )),
                (_, DataType::Float64) => Arc::new(Float64Array::from(
                    rows.iter()
                        .map(|(_, v)| match value(v) {
                            Some(V::F(x)) => Some(x),
                            Some(V::Null) => None,
                            _ => Some(0.0),
                        })
                        .collect::<Vec<_>>(),
                )),
                _ => Arc::new(StringArray::from(
                    rows.iter()
                        .map(|(_, v)| match value(v) {
                            Some(V::S(s)) => Some(s),
                            _ => None,
                        })
                        .collect::<Vec<_>>(),
                )),
            }
        })
        .collect();
    RecordBatch::try_new(schema, columns).unwrap()
}

/// The decisions of `policy` over `batch`, by merchant. Runs both the batch path (the
/// policy query planned over a table) and the serving path (planned once, rows given per
/// call, twice to show a second run sees only its own rows) and holds them equal.
async fn decide(policy: &Policy, batch: RecordBatch) -> BTreeMap<String, Decision> {
    let ctx = SessionContext::new();
    let table = MemTable::try_new(batch.schema(), vec![vec![batch.clone()]]).unwrap();
    ctx.register_table("merchant_features", Arc::new(table))
        .unwrap();
    let planned = evaluate(&ctx, policy, None).await.unwrap();
    let prepared = PreparedPolicy::new(policy).await.unwrap();
    for _ in 0..2 {
        let served = prepared
            .evaluate(policy, vec![batch.clone()])
            .await
            .unwrap();
        assert_eq!(served, planned);
    }
    planned
        .into_iter()
        .map(|d| (d.merchant_id.clone(), d))
        .collect()
}

const TEST_POLICY: &str = r#"
[product]
id = "test-loan"
name = "Test loan"
version = "1"

[params]
k = 0.5
holdback = 0.1
horizon_days = 100
factor = 1
product_max_fen = 5000000

[[eligibility]]
code = "HISTORY_TOO_SHORT"
require = "days_on_book >= 180"

[[eligibility]]
code = "TURNOVER_TOO_LOW"
require = "net_fen_90d >= 900000"

[[refer]]
code = "ROUND_AMOUNTS"
when = "round_amount_share_90d > 0.15"

[limit]
terms = [
    { name = "mean_daily_net_fen", sql = "net_fen_90d / 90.0" },
    { name = "conservative", sql = "mean_daily_net_fen * (1 - k * coalesce(daily_net_cv_90d, 2))" },
]
base = "holdback * conservative * horizon_days / factor"
caps = [
    { code = "CAP_TURNOVER_SHARE", sql = "0.25 * net_fen_365d" },
    { code = "CAP_PRODUCT_MAX", sql = "product_max_fen" },
]
round_down_fen = 100000
minimum_fen = 200000
"#;

fn check(d: &Decision, outcome: Outcome, limit_fen: i64, reasons: &[&str]) {
    assert_eq!(
        (d.decision, d.limit_fen, d.reasons.clone()),
        (
            outcome,
            limit_fen,
            reasons.iter().map(|r| (*r).to_owned()).collect::<Vec<_>>()
        ),
        "{}",
        d.merchant_id
    );
}

#[tokio::test]
async fn each_rule_reason_and_the_limit_formula_give_the_expected_rows() {
    let policy = Policy::parse(TEST_POLICY, "test").await.unwrap();
    let batch = features(&[
        // Mean daily net 100,000 fen; Ŝ = 100,000 × (1 − 0.5 × 0.37) = 81,500;
        // base = 0.1 × 81,500 × 100 = 815,000 → rounded down to 800,000. Caps: 10,000,000
        // (a quarter of 40,000,000) and 5,000,000 do not bind.
        ("ok", vec![]),
        // Mean 1,000,000 a day, CV 0: base 10,000,000; turnover cap 7,500,000; product
        // cap 5,000,000 binds.
        (
            "product_capped",
            vec![
                ("net_fen_90d", V::I(90_000_000)),
                ("net_fen_365d", V::I(30_000_000)),
                ("daily_net_cv_90d", V::F(0.0)),
            ],
        ),
        // Same base; a quarter of 12,345,678 = 3,086,419.5 binds → 3,000,000.
        (
            "turnover_capped",
            vec![
                ("net_fen_90d", V::I(90_000_000)),
                ("net_fen_365d", V::I(12_345_678)),
                ("daily_net_cv_90d", V::F(0.0)),
            ],
        ),
        // Both eligibility rules fail: both reasons, in policy order, limit 0.
        (
            "young",
            vec![("days_on_book", V::I(100)), ("net_fen_90d", V::I(500_000))],
        ),
        // Eligible, but 40 % round amounts: referred with the limit it would get.
        ("pumper", vec![("round_amount_share_90d", V::F(0.4))]),
        // Unknown round share: a person looks (NULL refers).
        ("unknown_round", vec![("round_amount_share_90d", V::Null)]),
        // Mean 10,000 a day, CV 0: base 100,000 < minimum 200,000.
        (
            "small",
            vec![
                ("net_fen_90d", V::I(900_000)),
                ("daily_net_cv_90d", V::F(0.0)),
            ],
        ),
        // Unknown CV counts as 2: Ŝ = 0, nothing to lend.
        ("unknown_cv", vec![("daily_net_cv_90d", V::Null)]),
        // Exactly on the eligibility bounds (>= holds).
        (
            "boundary",
            vec![
                ("days_on_book", V::I(180)),
                ("net_fen_90d", V::I(9_000_000)),
            ],
        ),
    ]);
    let d = decide(&policy, batch).await;
    check(&d["ok"], Outcome::Approve, 800_000, &[]);
    check(
        &d["product_capped"],
        Outcome::Approve,
        5_000_000,
        &["CAP_PRODUCT_MAX"],
    );
    check(
        &d["turnover_capped"],
        Outcome::Approve,
        3_000_000,
        &["CAP_TURNOVER_SHARE"],
    );
    check(
        &d["young"],
        Outcome::Decline,
        0,
        &["HISTORY_TOO_SHORT", "TURNOVER_TOO_LOW"],
    );
    check(&d["pumper"], Outcome::Refer, 800_000, &["ROUND_AMOUNTS"]);
    check(
        &d["unknown_round"],
        Outcome::Refer,
        800_000,
        &["ROUND_AMOUNTS"],
    );
    check(&d["small"], Outcome::Decline, 0, &["LIMIT_BELOW_MINIMUM"]);
    check(
        &d["unknown_cv"],
        Outcome::Decline,
        0,
        &["LIMIT_BELOW_MINIMUM"],
    );
    check(&d["boundary"], Outcome::Approve, 800_000, &[]);
    // Subsidy: catering is a subsidy sector; a declined merchant gets no subsidised loan.
    assert!(d["ok"].subsidy_eligible);
    assert!(!d["young"].subsidy_eligible);
    assert_eq!(
        d["ok"].subsidy_sector.as_deref(),
        Some("catering_accommodation")
    );
}

#[tokio::test]
async fn a_policy_reports_every_problem_at_once() {
    let broken = r#"
[product]
id = "broken"
version = "1"

[params]
k = "half"
net_fen_90d = 3

[[eligibility]]
code = "HISTORY_TOO_SHORT"
require = "days_on_books >= 180"

[[eligibility]]
require = "net_fen_90d >= 1"

[[eligibility]]
code = "HISTORY_TOO_SHORT"
require = "net_fen_90d >"

[[eligibility]]
code = "not_upper"
require = "net_fen_90d"

[[refer]]
code = "SMUGGLED"
when = "true) AS x FROM merchant_features; DROP TABLE merchant_features; SELECT (true"

[[refer]]
code = "WRONG_KEY"
require = "true"

[limit]
terms = [{ name = "Bad Name", sql = "1" }]
caps = [{ code = "CAP", sql = "'a lot'" }]
round_down_fen = 0
"#;
    let errors = Policy::parse(broken, "broken.toml").await.unwrap_err();
    let locations: Vec<&str> = errors
        .problems
        .iter()
        .map(|p| p.location.as_str())
        .collect();
    let text = errors.to_string();
    for expected in [
        "product.name",
        "params.k",
        "params.net_fen_90d",
        "eligibility[0].require",
        "eligibility[1]",
        "eligibility[2]",
        "eligibility[2].require",
        "eligibility[3]",
        "eligibility[3].require",
        "refer[0].when",
        "refer[1]",
        "limit.terms[0]",
        "limit.base",
        "limit.caps[0].sql",
        "limit.round_down_fen",
    ] {
        assert!(
            locations.contains(&expected),
            "{expected} missing in\n{text}"
        );
    }
    // Plain messages: the unknown column is named, the duplicate and missing codes said.
    assert!(text.contains("days_on_books"), "{text}");
    assert!(text.contains("is used twice"), "{text}");
    assert!(text.contains("has no reason code"), "{text}");
    assert!(text.contains("must be true or false"), "{text}");
    assert!(text.contains("more than one SQL expression"), "{text}");
    assert!(text.contains("must be a number"), "{text}");
}

#[tokio::test]
async fn the_shipped_policies_check_and_name_their_features() {
    for file in ["district-turnover-loan.toml", "daily-takings-line.toml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../pipelines/policies")
            .join(file);
        let policy = Policy::load(&path).await.unwrap_or_else(|e| panic!("{e}"));
        assert!(policy.eligibility.len() >= 4, "{file}");
        assert!(!policy.refer.is_empty(), "{file}");
        assert_eq!(policy.content_hash.len(), 64);
        // Every rule reads at least one feature column, which the service shows.
        for rule in policy.eligibility.iter().chain(&policy.refer) {
            assert!(!rule.features.is_empty(), "{file}: {}", rule.code);
        }
    }
    let policy = Policy::load(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../pipelines/policies/district-turnover-loan.toml"),
    )
    .await
    .unwrap();
    assert_eq!(
        policy.features_of("TURNOVER_DECLINING"),
        ["growth_mom_30d", "trend_slope_26w"]
    );
}

/// Issue 20, fuzzing: the policy parser under structured mutation of the shipped and
/// broken policies (fuzz/corpus/policy). Every `cargo test` runs a short run.
#[test]
fn mutated_policies_are_parsed_or_refused_with_every_problem_located() {
    let runtime = streetflow_fuzz::policy_runtime();
    let corpus = streetflow_fuzz::corpus("policy");
    assert!(corpus.len() >= 3, "the policy corpus is missing");
    let accepted: usize = corpus
        .iter()
        .map(|(_, bytes)| usize::from(streetflow_fuzz::check_policy(&runtime, bytes)))
        .sum();
    assert_eq!(
        accepted, 2,
        "the shipped policies parse, the broken one does not"
    );
    streetflow_fuzz::run_mutation("policy", 20_261_203, 300, |data| {
        streetflow_fuzz::check_policy(&runtime, data)
    });
}

/// The long run (fuzz/README.md): `STREETFLOW_FUZZ_EXECUTIONS` mutated policies.
#[test]
#[ignore = "long; see fuzz/README.md"]
fn long_policy_mutation_run_finds_nothing() {
    let runtime = streetflow_fuzz::policy_runtime();
    let (executions, seed) = streetflow_fuzz::long_run_settings();
    let rate = streetflow_fuzz::run_mutation("policy", seed, executions, |data| {
        streetflow_fuzz::check_policy(&runtime, data)
    });
    eprintln!("policy: {executions} executions, seed {seed}, {rate:.0}/s");
}
