//! streetflow's credit decisions: policies as data (TOML files of SQL expressions over
//! `merchant_features`), compiled to one DataFusion query per run, turned into a
//! decision, a limit in fen and stable reason codes per merchant, and stored in
//! `credit_decisions` with the policy's version and content hash so any decision can be
//! reproduced.

mod decide;
mod error;
mod policy;
mod stored;

pub use decide::{
    Decision, DecisionSummary, Evaluation, Outcome, PreparedPolicy, compile, decide, decision_rows,
    evaluate, outcome, summarize,
};
pub use error::{Error, Result};
pub use policy::{
    Cap, LIMIT_BELOW_MINIMUM, LimitFormula, ParamValue, Policy, PolicyErrors, PolicyProblem,
    Product, Rule, Term,
};
pub use stored::{DecisionRecord, stored_decisions};
