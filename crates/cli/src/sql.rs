//! `streetflow sql`: read-only SQL over the lake's tables.

use anyhow::Context;
use clap::Args;
use streetflow_lake::Lake;
use streetflow_lake::arrow::util::pretty::pretty_format_batches;
use streetflow_lake::datafusion::execution::context::SQLOptions;

use crate::ingest::runtime;

/// Options of `streetflow sql`.
#[derive(Debug, Args)]
pub(crate) struct SqlArgs {
    /// The query (SELECT or WITH … SELECT).
    query: String,
    /// Lake root.
    #[arg(long, default_value = "./lake")]
    lake: String,
}

pub(crate) fn run(args: &SqlArgs) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let lake = Lake::new(&args.lake, &Default::default())?;
    let batches = runtime.block_on(async {
        let ctx = lake.session().await?;
        // Queries only: no DDL, DML or SET statements.
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let frame = ctx.sql_with_options(&args.query, options).await?;
        anyhow::Ok(frame.collect().await?)
    })?;
    println!(
        "{}",
        pretty_format_batches(&batches).context("formatting the result")?
    );
    Ok(())
}
