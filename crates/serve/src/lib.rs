//! streetflow's decision service: the latest stored decision of a merchant, and one
//! merchant decided now from its bitemporal daily history.
//!
//! Entry point: [`Service::open`] reads the policies' plans, the stored decisions
//! ([`DecisionIndex`]) and recent `merchant_daily_history` ([`HistoryStore`]) into memory;
//! [`Service::latest_decision`] and [`Service::evaluate`] answer from them with typed
//! results or an [`ApiError`]. [`router`] puts the service behind HTTP routes with
//! credentials ([`Access`]) and [`Limits`]; [`Service::keep_fresh`] follows new table
//! versions.
//!
//! [`HistoryStore`]: streetflow_features::HistoryStore

mod access;
mod decision_index;
mod error;
mod http;
mod service;

pub use access::Access;
pub use decision_index::{DecisionIndex, table_versions};
pub use error::{ApiError, Error, Refusal, Result};
pub use http::{Limits, MAX_BODY_BYTES, router};
pub use service::{EvaluateRequest, EvaluatedDecision, Reason, Service, StoredDecision};
