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
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

/// How `streetflow sql` prints results.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Format {
    /// A text table.
    Table,
    /// CSV with a header.
    Csv,
    /// One JSON object per line.
    Json,
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
    let stdout = std::io::stdout();
    match args.format {
        Format::Table => println!(
            "{}",
            pretty_format_batches(&batches).context("formatting the result")?
        ),
        Format::Csv => {
            let mut writer = arrow_csv::WriterBuilder::new()
                .with_header(true)
                .build(stdout.lock());
            for batch in &batches {
                writer.write(batch).context("writing CSV")?;
            }
        }
        Format::Json => {
            let mut writer = arrow_json::LineDelimitedWriter::new(stdout.lock());
            for batch in &batches {
                writer.write(batch).context("writing JSON")?;
            }
            writer.finish().context("writing JSON")?;
        }
    }
    Ok(())
}
