//! Deterministic synthetic shopping districts: POS events with exact ground truth.
//!
//! The entry point is [`generate`]: a [`GenConfig`] (seed, merchants, days, fault rates)
//! goes in; JSON Lines events in arrival order go to a writer, and the merchant registry,
//! each merchant's hidden [`Archetype`] and the exact per-day [`TruthRow`]s come back.
//! The same configuration always yields the same bytes.

mod config;
mod generator;
mod line;
mod output;
mod profile;

pub use config::GenConfig;
pub use generator::{GenError, GenSummary, Generated, generate};
pub use output::{
    DayTruth, MerchantProfile, TruthRow, write_profiles_csv, write_registry_csv, write_truth_csv,
};
pub use profile::Archetype;
