//! Errors of the decision service: [`enum@Error`] for opening and refreshing it, and
//! [`ApiError`] for what a request is answered with instead of a decision.

/// Result with the service's [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why the service could not open or refresh its data.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The lake refused an operation.
    #[error(transparent)]
    Lake(#[from] streetflow_lake::Error),
    /// Reading features or the daily history failed.
    #[error(transparent)]
    Features(#[from] streetflow_features::Error),
    /// Planning or running a policy failed.
    #[error(transparent)]
    Credit(#[from] streetflow_credit::Error),
    /// A stored row did not have the expected shape.
    #[error("{context}: {source}")]
    Arrow {
        /// Which table or step.
        context: String,
        /// Arrow's error.
        #[source]
        source: streetflow_lake::arrow::error::ArrowError,
    },
    /// The configuration cannot be served (says what to change).
    #[error("{0}")]
    Config(String),
}

/// What kind of refusal a request met; the HTTP layer maps each to a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The request is malformed or names values out of range (the caller can fix it).
    BadRequest,
    /// No credential, or one not accepted.
    Unauthorized,
    /// No such product, merchant, decision or route.
    NotFound,
    /// Well-formed, but not servable as asked (outside the cached days, a knowledge time
    /// before the day's end).
    Unprocessable,
    /// The body is larger than the limit.
    TooLarge,
    /// A limit refused it for now: try again.
    Unavailable,
    /// A defect or a failure of the lake behind the service.
    Internal,
}

/// A request's answer when it is not a decision: a kind, a stable code and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// What kind of refusal.
    pub kind: Refusal,
    /// Stable machine-readable code (`unknown_product`, `outside_window`, …).
    pub code: &'static str,
    /// What happened and what to do, for a person.
    pub message: String,
}

impl ApiError {
    /// An error of `kind` with `code` and `message`.
    pub fn new(kind: Refusal, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code,
            message: message.into(),
        }
    }

    /// A malformed request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(Refusal::BadRequest, "bad_request", message)
    }

    /// A failure behind the service.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        Self::new(Refusal::Internal, "internal", format!("{error:#}"))
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}: {}", self.kind, self.code, self.message)
    }
}

impl std::error::Error for ApiError {}
