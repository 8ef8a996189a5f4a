//! The lake's side of `streetflow doctor`: each table's schema, version and files, and
//! damage at rest named file by file.

use streetflow_core::health::{Checks, Status};
use streetflow_core::money::thousands;
use streetflow_core::tables::{
    CREDIT_DECISIONS, DEAD_LETTERS, MERCHANT_DAILY, MERCHANT_DAILY_HISTORY, MERCHANT_FEATURES,
    POS_EVENTS, TableDef,
};

use crate::lake::Lake;

/// The lake's tables, each with what creates it.
fn tables() -> [(&'static TableDef, &'static str); 6] {
    [
        (
            &POS_EVENTS,
            "run `streetflow ingest` or `streetflow backfill`",
        ),
        (&DEAD_LETTERS, "created with pos_events"),
        (&MERCHANT_DAILY, "run `streetflow aggregate`"),
        (&MERCHANT_DAILY_HISTORY, "run `streetflow aggregate`"),
        (&MERCHANT_FEATURES, "run `streetflow features --as-of DATE`"),
        (&CREDIT_DECISIONS, "run `streetflow decide`"),
    ]
}

impl Lake {
    /// Checks every table of the lake; returns the version of `pos_events` when it
    /// exists.
    pub async fn check_tables(&self, checks: &mut Checks) -> Option<i64> {
        let lake = self;
        let mut bronze_version = None;
        for (def, hint) in tables() {
            let name = format!("table {}", def.name);
            match lake.inspect(def).await {
                Ok(None) => checks.add(name, Status::Warn, format!("not created yet ({hint})")),
                Ok(Some(state)) => {
                    if def.name == POS_EVENTS.name {
                        bronze_version = Some(state.version);
                    }
                    match state.schema_problem {
                        Some(problem) => checks.add(
                            name,
                            Status::Fail,
                            format!(
                                "{problem}: this table does not match the columns this streetflow writes \
                                 (written by another version, or another tool)"
                            ),
                        ),
                        None => checks.add(
                            name,
                            Status::Ok,
                            format!("version {}, {} data files", state.version, thousands(state.files as u64)),
                        ),
                    }
                }
                Err(error) => checks.add(name, Status::Fail, format!("cannot be read: {error}")),
            }
            // Damage at rest (a truncated file, a torn commit) named file by file.
            let files = format!("files of {}", def.name);
            match lake.find_damage(def.name).await {
                Ok(damage) if damage.is_empty() => {}
                Ok(damage) => {
                    const SHOWN: usize = 5;
                    let mut detail = damage
                        .iter()
                        .take(SHOWN)
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ");
                    if damage.len() > SHOWN {
                        detail.push_str(&format!("; and {} more", damage.len() - SHOWN));
                    }
                    checks.add(
                        files,
                        Status::Fail,
                        format!(
                            "{} damaged: {detail} (restore them from a backup, or remove them from the table with a Delta tool, then rebuild what reads them)",
                            damage.len()
                        ),
                    );
                }
                Err(error) => {
                    checks.add(files, Status::Fail, format!("cannot be checked: {error}"))
                }
            }
        }
        bronze_version
    }
}
