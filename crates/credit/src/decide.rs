//! Running a policy over feature rows: one decision per merchant.
//!
//! The policy compiles to one DataFusion query over `merchant_features` that evaluates
//! every rule, the limit base and every cap per merchant; [`outcome`] then turns those
//! values into the decision, the limit and the reasons. Unknown values are treated
//! conservatively: an eligibility rule that is NULL fails, a refer rule that is NULL
//! refers, and a NULL (or non-finite) base or cap counts as zero.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use chrono::NaiveDate;
use streetflow_core::tables::{CREDIT_DECISIONS, MERCHANT_FEATURES};
use streetflow_lake::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, BooleanBuilder, Date32Array, Float64Array, Int64Array,
    Int64Builder, ListBuilder, RecordBatch, StringArray, StringBuilder,
};
use streetflow_lake::arrow::compute::cast;
use streetflow_lake::arrow::datatypes::{DataType, Field, Float64Type};
use streetflow_lake::datafusion::prelude::SessionContext;
use streetflow_lake::{
    AppProgress, CommitOutcome, Lake, OffsetWriter, PreparedQuery, RequestTables,
};

use crate::error::{Error, Result};
use crate::policy::{LIMIT_BELOW_MINIMUM, Policy, compile_base_relation};

/// What a policy decided for a merchant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Lend up to the limit.
    Approve,
    /// A person decides; the limit is what the policy would offer.
    Refer,
    /// Do not lend.
    Decline,
}

impl Outcome {
    /// The stored spelling: `approve`, `refer` or `decline`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Approve => "approve",
            Outcome::Refer => "refer",
            Outcome::Decline => "decline",
        }
    }

    /// The outcome of its stored spelling.
    pub fn parse(text: &str) -> Option<Outcome> {
        [Outcome::Approve, Outcome::Refer, Outcome::Decline]
            .into_iter()
            .find(|outcome| outcome.as_str() == text)
    }
}

/// One merchant's decision.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decision {
    /// District operator.
    pub operator_id: String,
    /// Merchant.
    pub merchant_id: String,
    /// Approve, refer or decline.
    pub decision: Outcome,
    /// Credit limit in fen (0 when declined).
    pub limit_fen: i64,
    /// Stable reason codes, in policy order.
    pub reasons: Vec<String>,
    /// Interest-subsidy sector of the merchant on the as-of date.
    pub subsidy_sector: Option<String>,
    /// The loan would qualify for the interest subsidy: a subsidy sector on the decision
    /// date and not declined.
    pub subsidy_eligible: bool,
    /// Feature set the decision read.
    pub feature_set: String,
    /// Bronze version the features were computed from.
    pub bronze_version: i64,
}

/// The rule values of one merchant, as the query computed them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Evaluation {
    /// Each eligibility rule (NULL: unknown).
    pub eligible: Vec<Option<bool>>,
    /// Each refer rule.
    pub refer: Vec<Option<bool>>,
    /// The limit base in fen.
    pub base: Option<f64>,
    /// Each cap in fen.
    pub caps: Vec<Option<f64>>,
}

/// Turns rule values into (decision, limit, reasons).
pub fn outcome(policy: &Policy, evaluation: &Evaluation) -> (Outcome, i64, Vec<String>) {
    let failed: Vec<String> = policy
        .eligibility
        .iter()
        .zip(&evaluation.eligible)
        .filter(|(_, value)| **value != Some(true))
        .map(|(rule, _)| rule.code.clone())
        .collect();
    if !failed.is_empty() {
        return (Outcome::Decline, 0, failed);
    }
    let amount = |value: Option<f64>| value.filter(|v| v.is_finite()).unwrap_or(0.0);
    let mut raw = amount(evaluation.base);
    let mut binding = None;
    for (cap, value) in policy.limit.caps.iter().zip(&evaluation.caps) {
        let value = amount(*value);
        if value < raw {
            raw = value;
            binding = Some(cap.code.clone());
        }
    }
    // Whole fen, rounded down to the product's step (the float only carries the formula's
    // ratios; the limit itself is exact integer fen).
    let whole = raw.max(0.0).floor().min(i64::MAX as f64) as i64;
    let limit = whole - whole % policy.limit.round_down_fen;
    if limit == 0 || limit < policy.limit.minimum_fen {
        let mut reasons = vec![LIMIT_BELOW_MINIMUM.to_owned()];
        reasons.extend(binding);
        return (Outcome::Decline, 0, reasons);
    }
    let refers: Vec<String> = policy
        .refer
        .iter()
        .zip(&evaluation.refer)
        .filter(|(_, value)| **value != Some(false))
        .map(|(rule, _)| rule.code.clone())
        .collect();
    if refers.is_empty() {
        (Outcome::Approve, limit, binding.into_iter().collect())
    } else {
        let mut reasons = refers;
        reasons.extend(binding);
        (Outcome::Refer, limit, reasons)
    }
}

/// The query evaluating `policy` over the rows of `table` that pass `filter`.
pub fn compile(policy: &Policy, table: &str, filter: Option<&str>) -> String {
    let mut relation = compile_base_relation(&policy.params, table, filter);
    for term in &policy.limit.terms {
        relation = format!(
            "SELECT t.*, ({}) AS {} FROM ({relation}) t",
            term.sql, term.name
        );
    }
    let mut columns: Vec<String> = [
        "operator_id",
        "merchant_id",
        "subsidy_sector",
        "feature_set",
        "bronze_version",
    ]
    .iter()
    .map(|c| (*c).to_owned())
    .collect();
    for (i, rule) in policy.eligibility.iter().enumerate() {
        columns.push(format!("({}) AS eligible_{i}", rule.sql));
    }
    for (i, rule) in policy.refer.iter().enumerate() {
        columns.push(format!("({}) AS refer_{i}", rule.sql));
    }
    columns.push(format!(
        "CAST(({}) AS DOUBLE) AS limit_base",
        policy.limit.base
    ));
    for (i, cap) in policy.limit.caps.iter().enumerate() {
        columns.push(format!("CAST(({}) AS DOUBLE) AS cap_{i}", cap.sql));
    }
    format!(
        "SELECT {} FROM ({relation}) f ORDER BY operator_id, merchant_id",
        columns.join(", ")
    )
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef> {
    batch
        .column_by_name(name)
        .ok_or_else(|| Error::Internal(format!("the policy query has no column {name}")))
}

fn strings(batch: &RecordBatch, name: &str) -> Result<StringArray> {
    let array = cast(column(batch, name)?, &DataType::Utf8)
        .map_err(|e| Error::Internal(format!("{name}: {e}")))?;
    Ok(array.as_string::<i32>().clone())
}

fn booleans(batch: &RecordBatch, name: &str) -> Result<BooleanArray> {
    let array = cast(column(batch, name)?, &DataType::Boolean)
        .map_err(|e| Error::Internal(format!("{name}: {e}")))?;
    Ok(array.as_boolean().clone())
}

fn floats(batch: &RecordBatch, name: &str) -> Result<Float64Array> {
    let array = cast(column(batch, name)?, &DataType::Float64)
        .map_err(|e| Error::Internal(format!("{name}: {e}")))?;
    Ok(array.as_primitive::<Float64Type>().clone())
}

fn option<T>(array: &impl Array, row: usize, value: impl FnOnce() -> T) -> Option<T> {
    (!array.is_null(row)).then(value)
}

/// Evaluates `policy` for the rows of `merchant_features` (as registered in `ctx`) that
/// pass `filter`, e.g. `as_of_date = DATE '2026-01-01'`.
pub async fn evaluate(
    ctx: &SessionContext,
    policy: &Policy,
    filter: Option<&str>,
) -> Result<Vec<Decision>> {
    let query = compile(policy, MERCHANT_FEATURES.name, filter);
    let batches = ctx
        .sql(&query)
        .await
        .map_err(Error::query("planning the policy"))?
        .collect()
        .await
        .map_err(Error::query("evaluating the policy"))?;
    decisions_from(policy, &batches)
}

/// A policy's query planned once over feature rows each evaluation supplies: the
/// one-merchant path of `streetflow serve`, where planning would cost more than running.
#[derive(Debug)]
pub struct PreparedPolicy {
    query: PreparedQuery,
}

impl PreparedPolicy {
    /// Plans `policy`'s query over rows of the `merchant_features` schema.
    pub async fn new(policy: &Policy) -> Result<Self> {
        let sql = compile(policy, MERCHANT_FEATURES.name, None);
        let query = PreparedQuery::new(
            &sql,
            &[(MERCHANT_FEATURES.name, MERCHANT_FEATURES.schema.clone())],
        )
        .await?;
        Ok(Self { query })
    }

    /// Decides each of `features` (rows of the `merchant_features` schema) by `policy`,
    /// the policy this was prepared from; the same decisions as [`evaluate`] over a table
    /// of those rows.
    pub async fn evaluate(
        &self,
        policy: &Policy,
        features: Vec<RecordBatch>,
    ) -> Result<Vec<Decision>> {
        let batches = self
            .query
            .execute(RequestTables::new().with(MERCHANT_FEATURES.name, features))
            .await?;
        decisions_from(policy, &batches)
    }
}

/// Decisions from the rows of a policy query ([`compile`]).
fn decisions_from(policy: &Policy, batches: &[RecordBatch]) -> Result<Vec<Decision>> {
    let mut decisions = Vec::new();
    for batch in batches {
        let operators = strings(batch, "operator_id")?;
        let merchants = strings(batch, "merchant_id")?;
        let sectors = strings(batch, "subsidy_sector")?;
        let feature_sets = strings(batch, "feature_set")?;
        let bronze = cast(column(batch, "bronze_version")?, &DataType::Int64)
            .map_err(|e| Error::Internal(format!("bronze_version: {e}")))?;
        let bronze: &Int64Array = bronze.as_primitive();
        let eligible: Vec<BooleanArray> = (0..policy.eligibility.len())
            .map(|i| booleans(batch, &format!("eligible_{i}")))
            .collect::<Result<_>>()?;
        let refer: Vec<BooleanArray> = (0..policy.refer.len())
            .map(|i| booleans(batch, &format!("refer_{i}")))
            .collect::<Result<_>>()?;
        let base = floats(batch, "limit_base")?;
        let caps: Vec<Float64Array> = (0..policy.limit.caps.len())
            .map(|i| floats(batch, &format!("cap_{i}")))
            .collect::<Result<_>>()?;
        for row in 0..batch.num_rows() {
            let evaluation = Evaluation {
                eligible: eligible
                    .iter()
                    .map(|a| option(a, row, || a.value(row)))
                    .collect(),
                refer: refer
                    .iter()
                    .map(|a| option(a, row, || a.value(row)))
                    .collect(),
                base: option(&base, row, || base.value(row)),
                caps: caps
                    .iter()
                    .map(|a| option(a, row, || a.value(row)))
                    .collect(),
            };
            let (decision, limit_fen, reasons) = outcome(policy, &evaluation);
            let subsidy_sector = option(&sectors, row, || sectors.value(row).to_owned());
            decisions.push(Decision {
                operator_id: operators.value(row).to_owned(),
                merchant_id: merchants.value(row).to_owned(),
                decision,
                limit_fen,
                reasons,
                subsidy_eligible: subsidy_sector.is_some() && decision != Outcome::Decline,
                subsidy_sector,
                feature_set: feature_sets.value(row).to_owned(),
                bronze_version: if bronze.is_null(row) {
                    -1
                } else {
                    bronze.value(row)
                },
            });
        }
    }
    Ok(decisions)
}

/// What a `decide` run did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DecisionSummary {
    /// Product id.
    pub product: String,
    /// Policy version and content hash.
    pub policy_version: String,
    /// SHA-256 of the policy file.
    pub policy_hash: String,
    /// As-of date of the features.
    pub as_of_date: NaiveDate,
    /// Version of `merchant_features` read.
    pub feature_table_version: i64,
    /// Merchants decided.
    pub merchants: usize,
    /// Count per decision.
    pub by_decision: BTreeMap<Outcome, usize>,
    /// Total limit in fen per decision.
    pub limit_fen_by_decision: BTreeMap<Outcome, i64>,
    /// Reason codes by how often they occur, most frequent first.
    pub top_reasons: Vec<(String, usize)>,
    /// Approved and referred merchants whose loan would get the interest subsidy.
    pub subsidy_eligible: usize,
}

/// Counts decisions by outcome and reason.
pub fn summarize(
    policy: &Policy,
    as_of_date: NaiveDate,
    feature_table_version: i64,
    decisions: &[Decision],
) -> DecisionSummary {
    let mut by_decision = BTreeMap::new();
    let mut limits = BTreeMap::new();
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for d in decisions {
        *by_decision.entry(d.decision).or_insert(0) += 1;
        *limits.entry(d.decision).or_insert(0i64) += d.limit_fen;
        for reason in &d.reasons {
            *reasons.entry(reason).or_insert(0) += 1;
        }
    }
    let mut top_reasons: Vec<(String, usize)> = reasons
        .into_iter()
        .map(|(code, n)| (code.to_owned(), n))
        .collect();
    top_reasons.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    DecisionSummary {
        product: policy.product.id.clone(),
        policy_version: policy.product.version.clone(),
        policy_hash: policy.content_hash.clone(),
        as_of_date,
        feature_table_version,
        merchants: decisions.len(),
        by_decision,
        limit_fen_by_decision: limits,
        top_reasons,
        subsidy_eligible: decisions.iter().filter(|d| d.subsidy_eligible).count(),
    }
}

fn days(date: NaiveDate) -> i32 {
    date.signed_duration_since(NaiveDate::default()).num_days() as i32
}

/// Decisions as rows of `credit_decisions`.
pub fn decision_rows(
    policy: &Policy,
    as_of_date: NaiveDate,
    feature_table_version: i64,
    decisions: &[Decision],
) -> Result<RecordBatch> {
    let n = decisions.len();
    let text = |value: &str| -> ArrayRef { Arc::new(StringArray::from(vec![value; n])) };
    // Delta names list items `element`.
    let mut reasons = ListBuilder::new(StringBuilder::new()).with_field(Arc::new(Field::new(
        "element",
        DataType::Utf8,
        true,
    )));
    let mut limit = Int64Builder::new();
    let mut eligible = BooleanBuilder::new();
    for d in decisions {
        for reason in &d.reasons {
            reasons.values().append_value(reason);
        }
        reasons.append(true);
        limit.append_value(d.limit_fen);
        eligible.append_value(d.subsidy_eligible);
    }
    let schema = CREDIT_DECISIONS.schema.clone();
    let mut columns = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let column: ArrayRef = match field.name().as_str() {
            "as_of_date" => Arc::new(Date32Array::from(vec![days(as_of_date); n])),
            "product" => text(&policy.product.id),
            "operator_id" => Arc::new(StringArray::from_iter_values(
                decisions.iter().map(|d| d.operator_id.as_str()),
            )),
            "merchant_id" => Arc::new(StringArray::from_iter_values(
                decisions.iter().map(|d| d.merchant_id.as_str()),
            )),
            "policy_version" => text(&policy.product.version),
            "policy_hash" => text(&policy.content_hash),
            "decision" => Arc::new(StringArray::from_iter_values(
                decisions.iter().map(|d| d.decision.as_str()),
            )),
            "limit_fen" => Arc::new(limit.finish()),
            "reasons" => Arc::new(reasons.finish()),
            "subsidy_sector" => Arc::new(StringArray::from(
                decisions
                    .iter()
                    .map(|d| d.subsidy_sector.as_deref())
                    .collect::<Vec<_>>(),
            )),
            "subsidy_eligible" => Arc::new(eligible.finish()),
            "feature_set" => Arc::new(StringArray::from_iter_values(
                decisions.iter().map(|d| d.feature_set.as_str()),
            )),
            "feature_table_version" => Arc::new(Int64Array::from(vec![feature_table_version; n])),
            "bronze_version" => Arc::new(Int64Array::from_iter_values(
                decisions.iter().map(|d| d.bronze_version),
            )),
            other => {
                return Err(Error::Internal(format!(
                    "credit_decisions column {other} has no value"
                )));
            }
        };
        columns.push(column);
    }
    RecordBatch::try_new(schema, columns)
        .map_err(|e| Error::Internal(format!("credit_decisions rows: {e}")))
}

/// Decides every merchant of `merchant_features` as of `as_of_date` and replaces that
/// date's decisions for the policy's product in `credit_decisions`.
pub async fn decide(
    lake: &Lake,
    as_of_date: NaiveDate,
    policy: &Policy,
) -> Result<(Vec<Decision>, DecisionSummary)> {
    let Some(features) = lake.open(MERCHANT_FEATURES.name).await? else {
        return Err(Error::NoFeatures(as_of_date));
    };
    let feature_table_version = features.version().map_or(-1, |v| v as i64);
    // The decisions record the version they read: read that one, whatever a features
    // run commits meanwhile.
    let ctx = lake
        .pinned_session(MERCHANT_FEATURES.name, &features)
        .await?;
    let decisions = evaluate(
        &ctx,
        policy,
        Some(&format!("m.as_of_date = DATE '{as_of_date}'")),
    )
    .await?;
    if decisions.is_empty() {
        return Err(Error::NoFeatures(as_of_date));
    }
    let rows = decision_rows(policy, as_of_date, feature_table_version, &decisions)?;
    let mut table = OffsetWriter::new(lake, &CREDIT_DECISIONS, "credit_decisions").await?;
    // The decisions of a (date, product) record the feature version they were made on,
    // and a run on older features never replaces those of newer ones (two runs racing,
    // or a slow one overtaken).
    let decided_on = format!("decided-{as_of_date}-{}", policy.product.id);
    let stored = table.app_version(&decided_on).await?;
    if stored.is_some_and(|newer| newer > feature_table_version) {
        return Err(Error::NewerDecisions {
            as_of_date,
            product: policy.product.id.clone(),
            stored: stored.unwrap_or_default(),
            read: feature_table_version,
        });
    }
    table.write(rows).await?;
    let staged = table.stage().await?;
    let partition = HashSet::from([vec![
        as_of_date.format("%Y-%m-%d").to_string(),
        policy.product.id.clone(),
    ]]);
    let progress = [AppProgress {
        app_id: decided_on,
        expected: stored,
        version: feature_table_version,
    }];
    match table
        .replace_partitions(&staged, Some(&partition), &progress)
        .await?
    {
        CommitOutcome::Committed { .. } => {}
        // Another run committed first: fine if it decided on the same features.
        CommitOutcome::Fenced { found, .. } => {
            table.discard();
            if found != Some(feature_table_version) {
                return Err(Error::NewerDecisions {
                    as_of_date,
                    product: policy.product.id.clone(),
                    stored: found.unwrap_or_default(),
                    read: feature_table_version,
                });
            }
        }
    }
    let summary = summarize(policy, as_of_date, feature_table_version, &decisions);
    Ok((decisions, summary))
}
