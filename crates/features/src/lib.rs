//! streetflow's features: bronze events → daily cash flow (silver) → point-in-time
//! merchant features (gold).
//!
//! Silver: [`refresh_silver`] brings `merchant_daily` (the latest rows) and
//! `merchant_daily_history` (every version of every row, by knowledge time) up to the
//! newest `pos_events` version. Both come from [`DailyBuilder`], a one-pass
//! implementation of `pipelines/features/daily.sql` (the specification the tests hold
//! it to). Gold: [`compute_features`], training sets and `serve` read bitemporal silver
//! into a [`HistoryStore`] and compute each vector with the one set of feature
//! definitions in `vector.rs`.

mod daily;
mod daily_parallel;
mod error;
mod gold;
mod health;
mod history;
mod readers;
mod reference;
mod relations;
mod serving;
mod silver;
pub mod sql;
mod store;
mod training;
mod vector;

pub use daily::{DAILY_INPUT_COLUMNS, DailyBuilder, HistorySpec, PayerWindow, payer_sales_schema};
pub use daily_parallel::ParallelDaily;
pub use error::{Error, Result};
pub use gold::{
    AsOf, FEATURE_SET, FeatureInputs, FeatureReport, LOOKBACK_DAYS, ReferenceTables, RegistryError,
    compute_features, compute_merchant_features, load_registry, reference_tables, sql_literal,
    write_features,
};
pub use health::check_silver_freshness;
pub use history::{HORIZON_APP_ID, HistoryReport, SilverSettings, refresh_history};
pub use readers::{DailyCashFlow, daily_cash_flow, stored_features};
pub use reference::reference_features;
pub use serving::{MerchantAsOf, merchant_features};
pub use silver::{BRONZE_APP_ID, SilverFromLoad, SilverMode, SilverReport, refresh_silver};
pub use store::{DayRange, HistoryChanges, HistoryStore};
pub use training::{SpineRow, TrainingReport, load_spine, training_schema, write_training_set};
