//! The service behind the routes: policies, stored decisions and the history cache, and
//! the two questions it answers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use streetflow_core::MerchantRecord;
use streetflow_credit::{Decision, Policy, PreparedPolicy};
use streetflow_features::{
    AsOf, DayRange, FeatureInputs, HistoryStore, LOOKBACK_DAYS, MerchantAsOf,
    compute_merchant_features, merchant_features,
};
use streetflow_lake::Lake;

use crate::decision_index::{DecisionIndex, table_versions};
use crate::error::{ApiError, Refusal, Result};

/// The earliest as-of date served: its lookback starts after 1970-01-01.
const EARLIEST_AS_OF: NaiveDate = match NaiveDate::from_ymd_opt(1972, 1, 1) {
    Some(date) => date,
    None => NaiveDate::MIN,
};

/// Body of `POST /v1/decisions:evaluate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluateRequest {
    /// District operator.
    pub operator_id: String,
    /// Merchant of that operator.
    pub merchant_id: String,
    /// Product id (a policy's `product.id`).
    pub product: String,
    /// Business date to decide as of (default: the operator's current business date).
    #[serde(default)]
    pub as_of_date: Option<NaiveDate>,
    /// Use what the lake knew at this time (default: the latest settled knowledge).
    #[serde(default)]
    pub knowledge_time: Option<DateTime<Utc>>,
}

/// One reason code of a decision, with its meaning and the feature values behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reason {
    /// The policy's stable reason code.
    pub code: String,
    /// What it means, from the policy file.
    pub meaning: String,
    /// The features the rule reads, with the merchant's values (null when unknown).
    pub features: Map<String, Value>,
}

/// The latest stored decision of a merchant: the columns of its `credit_decisions` row,
/// with each reason code expanded into a [`Reason`] from the feature row it was decided
/// on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredDecision {
    /// The row's columns but `reasons` (dates as `YYYY-MM-DD`).
    #[serde(flatten)]
    pub columns: Map<String, Value>,
    /// Its reasons, in policy order.
    pub reasons: Vec<Reason>,
}

/// One merchant decided now by [`Service::evaluate`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvaluatedDecision {
    /// District operator.
    pub operator_id: String,
    /// Merchant.
    pub merchant_id: String,
    /// Product id.
    pub product: String,
    /// The policy's version.
    pub policy_version: String,
    /// SHA-256 of the policy file.
    pub policy_hash: String,
    /// Business date decided as of.
    pub as_of_date: NaiveDate,
    /// The knowledge time the features were computed at (RFC 3339).
    pub knowledge_time: Option<String>,
    /// `approve`, `refer` or `decline`.
    pub decision: String,
    /// Credit limit in fen.
    pub limit_fen: i64,
    /// Its reasons, in policy order.
    pub reasons: Vec<Reason>,
    /// Interest-subsidy sector on the as-of date.
    pub subsidy_sector: Option<String>,
    /// Whether the loan qualifies for the interest subsidy.
    pub subsidy_eligible: bool,
    /// Feature set read.
    pub feature_set: String,
    /// Bronze version the features were computed from.
    pub bronze_version: i64,
    /// Every feature value of the vector.
    pub features: Map<String, Value>,
    /// Time the evaluation took, milliseconds.
    pub computed_ms: f64,
}

/// What the server holds: the lake, the policies and the reference data.
pub struct Service {
    lake: Lake,
    policies: BTreeMap<String, Policy>,
    /// Each policy's query, planned once for evaluations.
    prepared: BTreeMap<String, PreparedPolicy>,
    inputs: FeatureInputs,
    /// `inputs.registry` by (operator, merchant): an evaluation reads one merchant's
    /// versions, not the registry's (resolving 100,000 merchants' versions took 40 ms).
    registry_of: HashMap<(String, String), Vec<MerchantRecord>>,
    refresh: Duration,
    /// The latest stored decisions, for `GET …/decision`.
    decisions: tokio::sync::RwLock<DecisionIndex>,
    /// Recent daily history by merchant, for evaluations (`None`: read the lake).
    cache: Option<tokio::sync::RwLock<HistoryStore>>,
}

/// The event contract's operator id: `[a-z0-9][a-z0-9_-]{0,63}`.
fn check_operator(value: &str) -> Result<(), ApiError> {
    let mut chars = value.chars();
    let ok = value.len() <= 64
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "operator_id {value:?} is not an operator id ([a-z0-9][a-z0-9_-]{{0,63}})"
        )))
    }
}

/// The event contract's merchant id: 1–64 characters of any script. (It reaches SQL
/// only as a quoted literal.)
fn check_merchant(value: &str) -> Result<(), ApiError> {
    if (1..=64).contains(&value.chars().count()) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "merchant_id {value:?} is not a merchant id (1–64 characters)"
        )))
    }
}

impl Service {
    /// Opens the lake and loads policies and reference data; with `cache_since`, reads
    /// the daily history of business dates from then into memory for evaluations.
    pub async fn open(
        lake: Lake,
        policies: BTreeMap<String, Policy>,
        inputs: FeatureInputs,
        refresh: Duration,
        cache_since: Option<NaiveDate>,
    ) -> Result<Self> {
        let cache = match cache_since {
            Some(since) => {
                let today = Utc::now().date_naive();
                let day = |date: NaiveDate| {
                    date.signed_duration_since(NaiveDate::default()).num_days() as i32
                };
                // Open-ended towards the future: the days the history gains while the
                // server runs join the cache as they close.
                let range = DayRange {
                    first: day(since),
                    last: day(today + chrono::Days::new(3_650)),
                };
                // Payers are read by the last 90 days of a lookback: of the as-of dates
                // whose whole lookback the cache holds.
                let payers = DayRange {
                    first: range.first + LOOKBACK_DAYS as i32 - 90,
                    last: range.last,
                };
                let store = HistoryStore::load(&lake, range, payers, None).await?;
                tracing::info!(
                    versions = store.version_count(),
                    payer_entries = store.payer_entry_count(),
                    merchants = store.merchant_count(),
                    horizon = ?store.horizon(),
                    "daily history cached"
                );
                Some(tokio::sync::RwLock::new(store))
            }
            None => None,
        };
        let mut prepared = BTreeMap::new();
        for (product, policy) in &policies {
            let plan = PreparedPolicy::new(policy).await?;
            prepared.insert(product.clone(), plan);
        }
        let decisions = DecisionIndex::load(&lake).await?;
        tracing::info!(decisions = decisions.len(), "stored decisions indexed");
        let mut registry_of: HashMap<(String, String), Vec<MerchantRecord>> = HashMap::new();
        for record in &inputs.registry {
            registry_of
                .entry((record.operator_id.clone(), record.merchant_id.clone()))
                .or_default()
                .push(record.clone());
        }
        Ok(Self {
            lake,
            policies,
            prepared,
            inputs,
            registry_of,
            refresh,
            decisions: tokio::sync::RwLock::new(decisions),
            cache,
        })
    }

    /// Brings the history cache up to the newest history version; returns the versions
    /// added. The new files are read without holding the lock, so evaluations go on
    /// meanwhile.
    pub async fn refresh_cache(&self) -> Result<usize> {
        let Some(cache) = &self.cache else {
            return Ok(0);
        };
        let changes = cache.read().await.changes(&self.lake).await?;
        let Some(changes) = changes else {
            return Ok(0);
        };
        let mut cache = cache.write().await;
        let added = cache.apply(changes)?;
        tracing::debug!(
            history_version = cache.table_version(),
            versions_added = added,
            "history cache refreshed"
        );
        Ok(added)
    }

    /// The latest knowledge time an evaluation can read: now less the settle time, or
    /// the history's horizon when that is behind (a refresh has not caught up yet).
    async fn latest_settled(&self) -> Result<DateTime<Utc>> {
        let settled = Utc::now() - self.inputs.knowledge.settle();
        let horizon = match &self.cache {
            Some(cache) => cache.read().await.horizon(),
            None => self
                .lake
                .app_version(
                    streetflow_core::tables::MERCHANT_DAILY_HISTORY.name,
                    streetflow_features::HORIZON_APP_ID,
                )
                .await?
                .and_then(DateTime::from_timestamp_micros),
        };
        Ok(horizon.map_or(settled, |horizon| horizon.min(settled)))
    }

    /// Reads the latest stored decisions again when `credit_decisions` or
    /// `merchant_features` has a new version; returns whether it did.
    pub async fn refresh_decisions(&self) -> Result<bool> {
        let versions = table_versions(&self.lake).await?;
        if versions == self.decisions.read().await.versions() {
            return Ok(false);
        }
        // Read without the lock: lookups go on from the old index meanwhile.
        let index = DecisionIndex::load(&self.lake).await?;
        tracing::debug!(
            decisions = index.len(),
            ?versions,
            "stored decisions re-indexed"
        );
        *self.decisions.write().await = index;
        Ok(true)
    }

    /// Refreshes the stored decisions and the history cache every refresh period, forever
    /// (errors are logged and the old data kept: requests go on, a little staler).
    pub async fn keep_fresh(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(self.refresh.max(Duration::from_millis(100)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(e) = self.refresh_decisions().await {
                tracing::warn!(error = %e, "re-reading the stored decisions failed");
            }
            if let Err(e) = self.refresh_cache().await {
                tracing::warn!(error = %e, "refreshing the history cache failed");
            }
        }
    }

    /// The products served (the policies' product ids).
    pub fn products(&self) -> impl Iterator<Item = &str> {
        self.policies.keys().map(String::as_str)
    }

    fn policy(&self, product: &str) -> Result<&Policy, ApiError> {
        self.policies.get(product).ok_or_else(|| {
            ApiError::new(
                Refusal::NotFound,
                "unknown_product",
                format!(
                    "no product {product:?}; known: {}",
                    self.policies.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    }

    /// The latest stored decision of a merchant for a product, with the features behind
    /// its reasons (read from the feature row it was decided on).
    pub async fn latest_decision(
        &self,
        operator_id: &str,
        merchant_id: &str,
        product: &str,
    ) -> Result<StoredDecision, ApiError> {
        check_operator(operator_id)?;
        check_merchant(merchant_id)?;
        let policy = self.policy(product)?;
        let found = self
            .decisions
            .read()
            .await
            .lookup(product, operator_id, merchant_id)
            .map_err(ApiError::internal)?;
        let Some((mut decision, features)) = found else {
            return Err(ApiError::new(
                Refusal::NotFound,
                "no_decision",
                format!(
                    "no {product} decision for merchant {merchant_id} of operator {operator_id}"
                ),
            ));
        };
        let codes: Vec<String> = decision
            .remove("reasons")
            .as_ref()
            .and_then(Value::as_array)
            .map(|codes| {
                codes
                    .iter()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok(StoredDecision {
            reasons: reasons(policy, &codes, &features),
            columns: decision,
        })
    }

    /// Decides one merchant now (or as of the request's date and knowledge time).
    pub async fn evaluate(&self, request: &EvaluateRequest) -> Result<EvaluatedDecision, ApiError> {
        check_operator(&request.operator_id)?;
        check_merchant(&request.merchant_id)?;
        let policy = self.policy(&request.product)?;
        let started = Instant::now();
        // As of a date: what the lake knew at its default knowledge time (the end of the
        // day before), as the batch job computes it; as of now: the latest settled
        // knowledge and the business date it falls on.
        let calendar = self.inputs.calendars.for_operator(&request.operator_id);
        // Instants far out would overflow the calendar's arithmetic.
        if let Some(k) = request.knowledge_time {
            let (earliest, latest) = (
                EARLIEST_AS_OF.and_time(chrono::NaiveTime::MIN).and_utc(),
                Utc::now() + chrono::Duration::days(1),
            );
            if !(earliest..=latest).contains(&k) {
                return Err(ApiError::bad_request(format!(
                    "knowledge_time {k} is out of range: {earliest} … {latest}"
                )));
            }
        }
        let (date, knowledge_time) = match (request.as_of_date, request.knowledge_time) {
            (Some(date), k) => (date, k),
            (None, Some(k)) => (calendar.business_date(&k), Some(k)),
            (None, None) => {
                let k = self.latest_settled().await.map_err(ApiError::internal)?;
                (calendar.business_date(&k), Some(k))
            }
        };
        // Dates far out would overflow date arithmetic and ask for history no lake has.
        let latest = Utc::now().date_naive() + chrono::Days::new(366);
        if !(EARLIEST_AS_OF..=latest).contains(&date) {
            return Err(ApiError::bad_request(format!(
                "as_of_date {date} is out of range: {EARLIEST_AS_OF} … {latest}"
            )));
        }
        let as_of = AsOf {
            date,
            knowledge_time,
        };
        let day =
            |date: NaiveDate| date.signed_duration_since(NaiveDate::default()).num_days() as i32;
        let window = DayRange {
            first: day(date - chrono::Days::new(LOOKBACK_DAYS)),
            last: day(date) - 1,
        };
        let inputs = FeatureInputs {
            calendars: self.inputs.calendars.clone(),
            registry: self
                .registry_of
                .get(&(request.operator_id.clone(), request.merchant_id.clone()))
                .cloned()
                .unwrap_or_default(),
            knowledge: self.inputs.knowledge,
        };
        let request_features = MerchantAsOf {
            operator_id: &request.operator_id,
            merchant_id: &request.merchant_id,
            as_of: &as_of,
            inputs: &inputs,
        };
        // With a cache, only its days are served: a lookback before them would read the
        // lake for every such request, at a cost no limit here bounds.
        let cached = match &self.cache {
            Some(cache) => {
                let cache = cache.read().await;
                let covered = cache
                    .range()
                    .is_some_and(|r| r.first <= window.first && window.last <= r.last);
                if !covered {
                    let first = cache
                        .range()
                        .and_then(|r| {
                            NaiveDate::default().checked_add_signed(chrono::Duration::days(
                                i64::from(r.first) + LOOKBACK_DAYS as i64,
                            ))
                        })
                        .map_or_else(String::new, |d| d.to_string());
                    return Err(ApiError::new(
                        Refusal::Unprocessable,
                        "outside_window",
                        format!(
                            "as_of_date {date} needs daily history from {} on, before the days \
                             this server holds; it serves as-of dates from {first} (raise \
                             --cache-days, or use the batch job)",
                            date - chrono::Days::new(LOOKBACK_DAYS)
                        ),
                    ));
                }
                Some(merchant_features(&cache, request_features))
            }
            None => None,
        };
        let computed = match cached {
            Some(computed) => computed,
            None => {
                compute_merchant_features(
                    &self.lake,
                    &as_of,
                    &inputs,
                    &request.operator_id,
                    &request.merchant_id,
                )
                .await
            }
        };
        let (batches, report) = computed.map_err(|error| match error {
            streetflow_features::Error::KnowledgeTime(message) => {
                ApiError::new(Refusal::Unprocessable, "knowledge_time", message)
            }
            other => ApiError::internal(other),
        })?;
        if report.rows == 0 {
            return Err(ApiError::new(
                Refusal::NotFound,
                "unknown_merchant",
                format!(
                    "merchant {} of operator {} has no events known by {} and no registry entry",
                    request.merchant_id,
                    request.operator_id,
                    report
                        .knowledge_times
                        .get(&request.operator_id)
                        .map_or_else(String::new, |k| k.to_rfc3339())
                ),
            ));
        }
        let prepared = self
            .prepared
            .get(&request.product)
            .ok_or_else(|| ApiError::internal("a policy without its prepared query"))?;
        let decisions = prepared
            .evaluate(policy, batches.clone())
            .await
            .map_err(ApiError::internal)?;
        let Some(decision) = decisions.into_iter().next() else {
            return Err(ApiError::internal("the policy query returned no row"));
        };
        let features = streetflow_lake::rows_json(&batches)
            .map_err(ApiError::internal)?
            .pop()
            .unwrap_or_default();
        Ok(EvaluatedDecision::new(
            policy,
            decision,
            &as_of,
            features,
            started.elapsed(),
        ))
    }
}

/// Each reason code with its meaning and the feature values behind it.
fn reasons(policy: &Policy, codes: &[String], features: &Map<String, Value>) -> Vec<Reason> {
    let meanings: BTreeMap<&str, &str> = policy.reason_codes().into_iter().collect();
    codes
        .iter()
        .map(|code| Reason {
            code: code.clone(),
            meaning: meanings
                .get(code.as_str())
                .copied()
                .unwrap_or("")
                .to_owned(),
            features: policy
                .features_of(code)
                .iter()
                .map(|name| {
                    (
                        name.clone(),
                        features.get(name).cloned().unwrap_or(Value::Null),
                    )
                })
                .collect(),
        })
        .collect()
}

impl EvaluatedDecision {
    fn new(
        policy: &Policy,
        decision: Decision,
        as_of: &AsOf,
        features: Map<String, Value>,
        took: Duration,
    ) -> Self {
        // The knowledge time the features were computed at (the day's default when the
        // request named only a date).
        let knowledge_time = features
            .get("knowledge_time")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| as_of.knowledge_time.map(|t| t.to_rfc3339()));
        Self {
            reasons: reasons(policy, &decision.reasons, &features),
            operator_id: decision.operator_id,
            merchant_id: decision.merchant_id,
            product: policy.product.id.clone(),
            policy_version: policy.product.version.clone(),
            policy_hash: policy.content_hash.clone(),
            as_of_date: as_of.date,
            knowledge_time,
            decision: decision.decision.as_str().to_owned(),
            limit_fen: decision.limit_fen,
            subsidy_sector: decision.subsidy_sector,
            subsidy_eligible: decision.subsidy_eligible,
            feature_set: decision.feature_set,
            bronze_version: decision.bronze_version,
            features,
            computed_ms: took.as_secs_f64() * 1000.0,
        }
    }
}
