//! The silver side of `streetflow doctor`.

use streetflow_core::health::{Checks, Status};
use streetflow_core::tables::MERCHANT_DAILY;
use streetflow_lake::Lake;

use crate::error::Result;
use crate::silver::BRONZE_APP_ID;

/// Whether `merchant_daily` reflects `pos_events` version `version`, the newest.
pub async fn check_silver_freshness(lake: &Lake, version: i64, checks: &mut Checks) -> Result<()> {
    let reflected = lake.app_version(MERCHANT_DAILY.name, BRONZE_APP_ID).await?;
    match reflected {
        Some(v) if v == version => checks.add(
            "silver freshness",
            Status::Ok,
            format!("merchant_daily reflects the newest pos_events version ({version})"),
        ),
        Some(v) => checks.add(
            "silver freshness",
            Status::Warn,
            format!("merchant_daily reflects pos_events version {v} of {version}: workers catch up after their next flush, or run `streetflow aggregate`"),
        ),
        None => checks.add(
            "silver freshness",
            Status::Warn,
            "merchant_daily has not been built: run `streetflow aggregate`",
        ),
    }
    Ok(())
}
