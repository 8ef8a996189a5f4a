//! `streetflow serve`: credit decisions over HTTP.
//!
//! * `GET /v1/merchants/{operator}/{merchant}/decision?product=…` — the latest stored
//!   decision (`credit_decisions`) with the feature values behind each reason, from an
//!   in-memory index of the latest decisions ([`DecisionIndex`]) read again when either
//!   table has a new version (checked every `--refresh-seconds`);
//! * `POST /v1/decisions:evaluate` — decides one merchant now: its features are computed
//!   from its bitemporal daily rows as of the lake's latest settled knowledge (the
//!   history's horizon) and its business date then, and the product's policy is
//!   evaluated on them. The rows come from an in-memory copy of recent
//!   `merchant_daily_history` ([`HistoryStore`]) that a background task brings up to the
//!   newest history version every `--refresh-seconds`, reading only the files each
//!   commit added (with `--cache-days 0`, every evaluation reads the lake);
//! * `GET /healthz`, `GET /metrics` (Prometheus).
//!
//! Every `/v1` route needs `Authorization: Bearer <token>`, one of the tokens of
//! `STREETFLOW_SERVE_TOKENS` (comma-separated) or `--tokens-file` (one a line); without
//! any, the server starts only with `--no-auth` on a loopback address. Requests have a
//! time limit, evaluations a bound on how many run at once, bodies a size limit, and an
//! evaluation's lookback must lie in the cached days.
//!
//! Errors are JSON, `{"error": {"code": …, "message": …}}`, with a 4xx status for what
//! the caller can fix (unknown product or merchant, bad parameters, a missing or wrong
//! credential) and 503 for what a limit refused (try again).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{MatchedPath, Path as UrlPath, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, NaiveDate, Utc};
use clap::Args;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use streetflow_core::MerchantRecord;
use streetflow_credit::{Decision, Policy, PreparedPolicy};
use streetflow_features::{
    AsOf, DayRange, FeatureInputs, HistoryStore, LOOKBACK_DAYS, MerchantAsOf,
    compute_merchant_features, load_registry, merchant_features,
};
use streetflow_lake::Lake;
use streetflow_lake::arrow::record_batch::RecordBatch;

use crate::decision_index::{DecisionIndex, table_versions};
use crate::ingest::runtime;
use crate::settings::load_pipeline;

/// Options of `streetflow serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Lake root.
    #[arg(long, default_value = "./lake")]
    lake: String,
    /// Address to listen on (port 0: any free port; the bound address is logged).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Directory of policy files (every *.toml is a product, by its product id).
    #[arg(long, default_value = "pipelines/policies")]
    policies: PathBuf,
    /// Merchant registry (CSV or JSON Lines) for MCC, opening date and rent.
    #[arg(long)]
    registry: Option<PathBuf>,
    /// Pipeline file (operators' calendars, lake storage options).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Check this often (seconds) for new versions of the stored decisions and features
    /// (re-reading the latest decisions when there are) and of the daily history
    /// (bringing the evaluation path's cache up to date).
    #[arg(long, default_value_t = 5)]
    refresh_seconds: u64,
    /// Days of daily history (by business date, before today) kept in memory for
    /// evaluations; 0 reads the lake for every evaluation. The default covers the lookback
    /// window of a decision as of any day of the last three months.
    #[arg(long, default_value_t = LOOKBACK_DAYS + 92)]
    cache_days: u64,
    /// File of bearer tokens the `/v1` routes accept: each line, trimmed, is one token
    /// (lines starting with `#` are comments); added
    /// to those of `STREETFLOW_SERVE_TOKENS` (comma-separated).
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// Serve `/v1` without credentials: only on a loopback address, for a laptop.
    #[arg(long)]
    no_auth: bool,
    /// Answer 503 to a request not answered within this many milliseconds.
    #[arg(long, default_value_t = 10_000)]
    request_timeout_ms: u64,
    /// Evaluations that run at once; more wait (within the request time limit).
    #[arg(long, default_value_t = 64)]
    max_evaluations: usize,
}

/// The earliest as-of date served: its lookback starts after 1970-01-01.
const EARLIEST_AS_OF: NaiveDate = match NaiveDate::from_ymd_opt(1972, 1, 1) {
    Some(date) => date,
    None => NaiveDate::MIN,
};

/// The largest request body accepted (an evaluation request is a few hundred bytes).
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Who may call the `/v1` routes: the SHA-256 digests of the accepted bearer tokens
/// (compared as digests, so a comparison's timing tells nothing about a token), or
/// anyone (`--no-auth`).
#[derive(Clone)]
pub(crate) enum Access {
    /// Any caller.
    Open,
    /// Callers with one of these token digests.
    Tokens(Arc<Vec<[u8; 32]>>),
}

impl Access {
    /// Access for `tokens` (empty ones ignored); `None` when there is none.
    pub(crate) fn tokens<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let digests: Vec<[u8; 32]> = tokens
            .into_iter()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(token_digest)
            .collect();
        (!digests.is_empty()).then(|| Self::Tokens(Arc::new(digests)))
    }

    fn admits(&self, presented: Option<&str>) -> bool {
        match self {
            Self::Open => true,
            Self::Tokens(digests) => presented.is_some_and(|token| {
                let digest = token_digest(token);
                digests
                    .iter()
                    .fold(false, |found, d| found | (*d == digest))
            }),
        }
    }
}

fn token_digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// The access of `args`: tokens from the environment and the tokens file, or `--no-auth`
/// on a loopback address; an error that says what to set otherwise.
fn access_of(args: &ServeArgs) -> anyhow::Result<Access> {
    let from_env = std::env::var("STREETFLOW_SERVE_TOKENS").unwrap_or_default();
    let from_file = match &args.tokens_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the tokens file {}", path.display()))?,
        None => String::new(),
    };
    let tokens = from_env.split(',').chain(
        from_file
            .lines()
            .filter(|line| !line.trim_start().starts_with('#')),
    );
    match (Access::tokens(tokens), args.no_auth) {
        (Some(_), true) => anyhow::bail!("--no-auth with tokens configured: choose one"),
        (Some(access), false) => Ok(access),
        (None, true) => {
            anyhow::ensure!(
                args.addr.ip().is_loopback(),
                "--no-auth serves credit decisions to anyone who can connect: only on a \
                 loopback address, not {}",
                args.addr
            );
            tracing::warn!("serving /v1 without credentials (--no-auth)");
            Ok(Access::Open)
        }
        (None, false) => anyhow::bail!(
            "no credentials configured: set STREETFLOW_SERVE_TOKENS (comma-separated bearer \
             tokens) or --tokens-file, or run with --no-auth on a loopback address"
        ),
    }
}

/// The limits a server applies to each request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Time from a request's arrival to its answer.
    pub(crate) request_timeout: Duration,
    /// Evaluations that run at once.
    pub(crate) max_evaluations: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            max_evaluations: 64,
        }
    }
}

/// An error answered to the caller as JSON.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn internal(error: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{error:#}"),
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        }
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

/// Body of `POST /v1/decisions:evaluate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EvaluateRequest {
    /// District operator.
    pub(crate) operator_id: String,
    /// Merchant of that operator.
    pub(crate) merchant_id: String,
    /// Product id (a policy's `product.id`).
    pub(crate) product: String,
    /// Business date to decide as of (default: the operator's current business date).
    #[serde(default)]
    pub(crate) as_of_date: Option<NaiveDate>,
    /// Use what the lake knew at this time (default: the latest settled knowledge).
    #[serde(default)]
    pub(crate) knowledge_time: Option<DateTime<Utc>>,
}

/// What the server holds: the lake, the policies and the reference data.
pub(crate) struct Service {
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

/// Loads every `*.toml` policy of `dir`, keyed by product id.
pub(crate) async fn load_policies(dir: &Path) -> anyhow::Result<BTreeMap<String, Policy>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the policy directory {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    paths.sort();
    let mut policies = BTreeMap::new();
    for path in paths {
        let policy = Policy::load(&path).await.map_err(anyhow::Error::msg)?;
        if let Some(previous) = policies.insert(policy.product.id.clone(), policy) {
            anyhow::bail!(
                "two policy files define product {} (the second is {})",
                previous.product.id,
                path.display()
            );
        }
    }
    anyhow::ensure!(
        !policies.is_empty(),
        "no policy files (*.toml) in {}",
        dir.display()
    );
    Ok(policies)
}

/// Renders result rows as JSON objects (dates as `YYYY-MM-DD`, nulls kept).
fn rows_json(batches: &[RecordBatch]) -> Result<Vec<Map<String, Value>>, ApiError> {
    crate::output::rows_json(batches).map_err(|e| ApiError::internal(e.to_string()))
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
    pub(crate) async fn open(
        lake: Lake,
        policies: BTreeMap<String, Policy>,
        inputs: FeatureInputs,
        refresh: Duration,
        cache_since: Option<NaiveDate>,
    ) -> anyhow::Result<Self> {
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
                let store = HistoryStore::load(&lake, range, payers, None)
                    .await
                    .context("reading recent daily history into memory")?;
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
            let plan = PreparedPolicy::new(policy)
                .await
                .with_context(|| format!("planning the policy of {product}"))?;
            prepared.insert(product.clone(), plan);
        }
        let decisions = DecisionIndex::load(&lake)
            .await
            .context("reading the latest stored decisions")?;
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
    pub(crate) async fn refresh_cache(&self) -> anyhow::Result<usize> {
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
    async fn latest_settled(&self) -> anyhow::Result<DateTime<Utc>> {
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
    pub(crate) async fn refresh_decisions(&self) -> anyhow::Result<bool> {
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

    /// Refreshes the stored decisions and the bronze cache every refresh period, forever
    /// (errors are logged and the old data kept: requests go on, a little staler).
    async fn keep_fresh(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(self.refresh.max(Duration::from_millis(100)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(e) = self.refresh_decisions().await {
                tracing::warn!(error = %e, "re-reading the stored decisions failed");
            }
            if let Err(e) = self.refresh_cache().await {
                tracing::warn!(error = %e, "refreshing the bronze cache failed");
            }
        }
    }

    fn policy(&self, product: &str) -> Result<&Policy, ApiError> {
        self.policies.get(product).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
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
    pub(crate) async fn latest_decision(
        &self,
        operator_id: &str,
        merchant_id: &str,
        product: &str,
    ) -> Result<Value, ApiError> {
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
                StatusCode::NOT_FOUND,
                "no_decision",
                format!(
                    "no {product} decision for merchant {merchant_id} of operator {operator_id}"
                ),
            ));
        };
        let codes: Vec<String> = decision
            .get("reasons")
            .and_then(Value::as_array)
            .map(|codes| {
                codes
                    .iter()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        decision.insert(
            "reasons".into(),
            reasons_json(policy, &codes, &features).into(),
        );
        Ok(Value::Object(decision))
    }

    /// Decides one merchant now (or as of the request's date and knowledge time).
    pub(crate) async fn evaluate(&self, request: &EvaluateRequest) -> Result<Value, ApiError> {
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
                        StatusCode::UNPROCESSABLE_ENTITY,
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
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "knowledge_time", message)
            }
            other => ApiError::internal(other),
        })?;
        if report.rows == 0 {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
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
        let features = rows_json(&batches)?.pop().unwrap_or_default();
        Ok(decision_json(
            policy,
            &decision,
            &as_of,
            &features,
            started.elapsed(),
        ))
    }
}

/// Each reason code with its meaning and the feature values behind it.
fn reasons_json(policy: &Policy, codes: &[String], features: &Map<String, Value>) -> Vec<Value> {
    let meanings: BTreeMap<&str, &str> = policy.reason_codes().into_iter().collect();
    codes
        .iter()
        .map(|code| {
            let behind: Map<String, Value> = policy
                .features_of(code)
                .iter()
                .map(|name| {
                    (
                        name.clone(),
                        features.get(name).cloned().unwrap_or(Value::Null),
                    )
                })
                .collect();
            json!({
                "code": code,
                "meaning": meanings.get(code.as_str()).copied().unwrap_or(""),
                "features": behind,
            })
        })
        .collect()
}

fn decision_json(
    policy: &Policy,
    decision: &Decision,
    as_of: &AsOf,
    features: &Map<String, Value>,
    took: Duration,
) -> Value {
    json!({
        "operator_id": decision.operator_id,
        "merchant_id": decision.merchant_id,
        "product": policy.product.id,
        "policy_version": policy.product.version,
        "policy_hash": policy.content_hash,
        "as_of_date": as_of.date.to_string(),
        // The knowledge time the features were computed at (the day's default when the
        // request named only a date).
        "knowledge_time": features
            .get("knowledge_time")
            .cloned()
            .or_else(|| as_of.knowledge_time.map(|t| t.to_rfc3339().into()))
            .unwrap_or(Value::Null),
        "decision": decision.decision.as_str(),
        "limit_fen": decision.limit_fen,
        "reasons": reasons_json(policy, &decision.reasons, features),
        "subsidy_sector": decision.subsidy_sector,
        "subsidy_eligible": decision.subsidy_eligible,
        "feature_set": decision.feature_set,
        "bronze_version": decision.bronze_version,
        "features": features,
        "computed_ms": took.as_secs_f64() * 1000.0,
    })
}

#[derive(Clone)]
struct AppState {
    service: Arc<Service>,
    metrics: Option<PrometheusHandle>,
    /// Permits for evaluations running at once.
    evaluations: Arc<tokio::sync::Semaphore>,
}

async fn healthz(State(state): State<AppState>) -> Response {
    let products: Vec<&String> = state.service.policies.keys().collect();
    axum::Json(json!({"status": "ok", "products": products})).into_response()
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => handle.render().into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "no_metrics",
            "metrics are off in this process",
        )
        .into_response(),
    }
}

async fn get_decision(
    State(state): State<AppState>,
    UrlPath((operator, merchant)): UrlPath<(String, String)>,
    Query(params): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    if let Some(unknown) = params.keys().find(|k| k.as_str() != "product") {
        return Err(ApiError::bad_request(format!(
            "unknown parameter {unknown:?}; the only one is product"
        )));
    }
    let Some(product) = params.get("product") else {
        return Err(ApiError::bad_request(
            "the product parameter is required (?product=…)",
        ));
    };
    let body = state
        .service
        .latest_decision(&operator, &merchant, product)
        .await?;
    Ok(axum::Json(body).into_response())
}

async fn post_evaluate(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("a request body holds at most {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let body: Bytes = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|error| {
            // A body without a length that runs past the limit, or one that broke off.
            if error.to_string().contains("length limit") {
                too_large()
            } else {
                ApiError::bad_request(format!("reading the request body: {error}"))
            }
        })?;
    let request: EvaluateRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("request body: {e}")))?;
    // Waiting for a permit counts against the request's time limit (the timeout layer).
    let _permit = state
        .evaluations
        .acquire()
        .await
        .map_err(|_| ApiError::internal("the evaluation permits are closed"))?;
    let answer = state.service.evaluate(&request).await?;
    Ok(axum::Json(answer).into_response())
}

/// Lets a `/v1` request through only with an accepted bearer token.
async fn authenticate(State(access): State<Access>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
        })
        .map(str::trim);
    if access.admits(presented) {
        return next.run(request).await;
    }
    let message = if presented.is_some() {
        "the bearer token is not accepted"
    } else {
        "this route needs Authorization: Bearer <token>"
    };
    let mut response =
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
    response.headers_mut().insert(
        axum::http::header::WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static("Bearer"),
    );
    response
}

/// Answers 503 to a request the server did not answer within the limit (the work
/// behind it is dropped).
async fn time_limit(State(limits): State<Limits>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limits.request_timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("streetflow_http_timeouts_total").increment(1);
            let mut response = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!(
                    "not answered within {} ms; try again",
                    limits.request_timeout.as_millis()
                ),
            )
            .into_response();
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
            response
        }
    }
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {} {}", request.method(), request.uri().path()),
    )
}

/// Counts requests and their latency by route and status.
async fn observe(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("streetflow_http_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("streetflow_http_request_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The HTTP routes over `service`: `/v1` behind `access`, every route under `limits`.
pub(crate) fn router(
    service: Arc<Service>,
    metrics: Option<PrometheusHandle>,
    access: Access,
    limits: Limits,
) -> Router {
    let state = AppState {
        service,
        metrics,
        evaluations: Arc::new(tokio::sync::Semaphore::new(limits.max_evaluations.max(1))),
    };
    let v1 = Router::new()
        .route(
            "/v1/merchants/{operator}/{merchant}/decision",
            get(get_decision),
        )
        .route("/v1/decisions:evaluate", post(post_evaluate))
        .route_layer(middleware::from_fn_with_state(access, authenticate));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .merge(v1)
        .route_layer(middleware::from_fn(observe))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(limits, time_limit))
        .with_state(state)
}

/// Builds the service of `args` (policies, registry, calendars, lake).
async fn service_of(args: &ServeArgs) -> anyhow::Result<Service> {
    let config = load_pipeline(args.config.as_deref(), json!({}))?;
    let inputs = FeatureInputs {
        calendars: config.calendars()?,
        registry: match &args.registry {
            Some(path) => load_registry(path).map_err(anyhow::Error::msg)?,
            None => Vec::new(),
        },
        knowledge: config.knowledge_rules(),
    };
    let lake = Lake::new(&args.lake, &config.lake.storage)?;
    let policies = load_policies(&args.policies).await?;
    // A cache shorter than one lookback would serve no as-of date at all.
    anyhow::ensure!(
        args.cache_days == 0 || args.cache_days >= LOOKBACK_DAYS,
        "--cache-days {} holds no whole lookback of {LOOKBACK_DAYS} days: give at least \
         {LOOKBACK_DAYS}, or 0 to read the lake for every evaluation",
        args.cache_days
    );
    let cache_since = match args.cache_days {
        0 => None,
        days => Some(
            Utc::now()
                .date_naive()
                .checked_sub_days(chrono::Days::new(days))
                .filter(|since| *since >= NaiveDate::default())
                .with_context(|| format!("--cache-days {days} reaches back before 1970"))?,
        ),
    };
    Service::open(
        lake,
        policies,
        inputs,
        Duration::from_secs(args.refresh_seconds),
        cache_since,
    )
    .await
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = interrupt.await;
                return;
            }
        };
    tokio::select! {
        _ = interrupt => {}
        _ = terminate.recv() => {}
    }
}

pub(crate) fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let access = access_of(args)?;
    let limits = Limits {
        request_timeout: Duration::from_millis(args.request_timeout_ms.max(1)),
        max_evaluations: args.max_evaluations.max(1),
    };
    let runtime = runtime()?;
    runtime.block_on(async {
        let service = Arc::new(service_of(args).await?);
        let metrics = PrometheusBuilder::new()
            .install_recorder()
            .context("installing the metrics recorder")?;
        metrics::describe_counter!(
            "streetflow_http_requests_total",
            "HTTP requests answered, by route and status"
        );
        metrics::describe_histogram!(
            "streetflow_http_request_seconds",
            "HTTP request latency by route, seconds"
        );
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("listening on {}", args.addr))?;
        let bound = listener.local_addr().context("the bound address")?;
        tokio::spawn(service.clone().keep_fresh());
        tracing::info!(
            products = ?service.policies.keys().collect::<Vec<_>>(),
            "serving decisions: listening on http://{bound}"
        );
        axum::serve(listener, router(service, Some(metrics), access, limits))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving HTTP")?;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}
