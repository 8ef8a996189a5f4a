//! The HTTP routes over a [`Service`]: JSON in and out, bearer credentials on `/v1`, a
//! time limit on every request and a bound on evaluations running at once.
//!
//! * `GET /v1/merchants/{operator}/{merchant}/decision?product=…` — the latest stored
//!   decision ([`Service::latest_decision`]);
//! * `POST /v1/decisions:evaluate` — one merchant decided now ([`Service::evaluate`]);
//! * `GET /healthz`, `GET /metrics` (Prometheus).
//!
//! Errors are JSON, `{"error": {"code": …, "message": …}}`, with a 4xx status for what
//! the caller can fix (unknown product or merchant, bad parameters, a missing or wrong
//! credential) and 503 for what a limit refused (try again).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{MatchedPath, Path as UrlPath, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::access::Access;
use crate::error::{ApiError, Refusal};
use crate::service::{EvaluateRequest, Service};

/// The largest request body accepted (an evaluation request is a few hundred bytes).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The limits a server applies to each request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time from a request's arrival to its answer.
    pub request_timeout: Duration,
    /// Evaluations that run at once.
    pub max_evaluations: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(10),
            max_evaluations: 64,
        }
    }
}

/// The HTTP status of each kind of refusal.
fn status_of(kind: Refusal) -> StatusCode {
    match kind {
        Refusal::BadRequest => StatusCode::BAD_REQUEST,
        Refusal::Unauthorized => StatusCode::UNAUTHORIZED,
        Refusal::NotFound => StatusCode::NOT_FOUND,
        Refusal::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
        Refusal::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Refusal::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Refusal::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status_of(self.kind);
        if status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        }
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (status, axum::Json(body)).into_response()
    }
}

#[derive(Clone)]
struct AppState {
    service: Arc<Service>,
    metrics: Option<PrometheusHandle>,
    /// Permits for evaluations running at once.
    evaluations: Arc<tokio::sync::Semaphore>,
}

async fn healthz(State(state): State<AppState>) -> Response {
    let products: Vec<&str> = state.service.products().collect();
    axum::Json(json!({"status": "ok", "products": products})).into_response()
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(handle) => handle.render().into_response(),
        None => ApiError::new(
            Refusal::NotFound,
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
            Refusal::TooLarge,
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
        ApiError::new(Refusal::Unauthorized, "unauthorized", message).into_response();
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
                Refusal::Unavailable,
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
        Refusal::NotFound,
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
pub fn router(
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
