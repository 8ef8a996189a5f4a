//! One merchant's vector from an in-memory [`HistoryStore`]: the evaluation path of
//! `streetflow serve`. The store holds bitemporal silver for the cached dates and follows
//! new history commits ([`HistoryStore::changes`]); a vector reads the merchant's days
//! as known at K, its operator's feed days and its registry version, through the same
//! definitions as the batch job ([`crate::vector`]).

use streetflow_lake::arrow::array::RecordBatch;

use crate::error::Result;
use crate::gold::{AsOf, FeatureInputs, FeatureReport, Population, vectors_as_of};
use crate::store::HistoryStore;
use crate::vector::vector_batch;

/// Whose features to compute, as of when, with which reference data.
#[derive(Debug, Clone, Copy)]
pub struct MerchantAsOf<'a> {
    /// The merchant's operator.
    pub operator_id: &'a str,
    /// The merchant.
    pub merchant_id: &'a str,
    /// The as-of date and knowledge time.
    pub as_of: &'a AsOf,
    /// Calendars, the registry and the knowledge rules.
    pub inputs: &'a FeatureInputs,
}

/// The feature row of one merchant from `store` (which must hold the dates its
/// lookback reads): equal to the batch job's row for it, except `peer_pct_net_90d`, a
/// percentile among peers, which is null. No row when the merchant has neither days nor
/// a registry version by then.
pub fn merchant_features(
    store: &HistoryStore,
    request: MerchantAsOf<'_>,
) -> Result<(Vec<RecordBatch>, FeatureReport)> {
    let population = Population {
        merchants: vec![(
            request.operator_id.to_owned(),
            request.merchant_id.to_owned(),
        )],
    };
    let (vectors, report) =
        vectors_as_of(store, request.as_of, request.inputs, &population, false)?;
    let batches = if vectors.is_empty() {
        Vec::new()
    } else {
        vec![vector_batch(&vectors)?]
    };
    Ok((batches, report))
}
