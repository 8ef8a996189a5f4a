//! streetflow's features: bronze events → daily cash flow (silver) → point-in-time
//! merchant features (gold), as DataFusion SQL over the lake.
//!
//! The entry point for silver is [`refresh_silver`]: it brings `merchant_daily` up to the
//! newest `pos_events` version, either by recomputing only the partitions the new bronze
//! rows touch or from scratch. Both give the same rows, because both feed the touched
//! events to [`DailyBuilder`], a one-pass implementation of the definition in
//! `pipelines/features/daily.sql` (the specification, which gold and the DuckDB
//! benchmarks run as SQL; unit tests hold the two equal).

mod daily;
mod daily_parallel;
mod error;
mod gold;
mod one_merchant;
mod relations;
mod serving;
mod silver;
pub mod sql;
mod training;

pub use daily::{DAILY_INPUT_COLUMNS, DailyBuilder, PayerWindow, payer_sales_schema};
pub use daily_parallel::ParallelDaily;
pub use error::{Error, Result};
pub use gold::{
    AsOf, FEATURE_SET, FeatureInputs, FeatureReport, LOOKBACK_DAYS, ReferenceTables,
    compute_features, compute_merchant_features, daily_view, events_view, load_registry,
    reference_tables, sql_literal, write_features,
};
pub use serving::{BronzeCache, BronzeChanges, MerchantAsOf, MerchantHistory, OneMerchantFeatures};
pub use silver::{BRONZE_APP_ID, SilverMode, SilverReport, refresh_silver};
pub use training::{SpineRow, TrainingReport, load_spine, training_schema, write_training_set};
