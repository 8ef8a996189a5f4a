//! `streetflow sql`: read-only SQL over the lake's tables.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use streetflow_lake::arrow::record_batch::RecordBatch;
use streetflow_lake::arrow::util::pretty::pretty_format_batches;
use streetflow_lake::datafusion::error::DataFusionError;
use streetflow_lake::deltalake::parquet::arrow::ArrowWriter;
use streetflow_lake::deltalake::parquet::basic::{Compression, ZstdLevel};
use streetflow_lake::deltalake::parquet::file::properties::WriterProperties;

use crate::output;
use crate::runtime::runtime;
use crate::settings::open_lake;

/// Options of `streetflow sql`.
#[derive(Debug, Args)]
pub(crate) struct SqlArgs {
    /// The query: SELECT, WITH … SELECT, VALUES or EXPLAIN of one. Anything else (DDL,
    /// DML, COPY, SET, …) is refused.
    query: String,
    /// Lake root.
    #[arg(long, default_value = "./lake")]
    lake: String,
    /// Pipeline file whose `[lake.storage]` options (endpoint, region, …) open an
    /// object-store lake.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
    /// Write the result here instead of standard output (required for parquet).
    #[arg(long)]
    out: Option<PathBuf>,
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
    /// A Parquet file (zstd), with the query's Arrow schema.
    Parquet,
}

pub(crate) fn run(args: &SqlArgs) -> anyhow::Result<()> {
    let runtime = runtime()?;
    let lake = open_lake(&args.lake, args.config.as_deref())?;
    let (schema, batches) = runtime.block_on(async {
        let frame = lake.read_only_query(&args.query).await?;
        let schema = frame.schema().as_arrow().clone();
        match frame.collect().await {
            Ok(batches) => anyhow::Ok((schema, batches)),
            Err(error) if may_be_damage(&error) => {
                Err(name_damaged_files(&lake, error.into()).await)
            }
            Err(error) => Err(error.into()),
        }
    })?;
    match args.format {
        Format::Parquet => write_parquet(args.out.as_deref(), schema, &batches),
        text => write_text(text, args.out.as_deref(), &batches),
    }
}

/// Whether a failed query may have tripped on a damaged file: not for errors of the
/// query itself (planning, types, memory), which would only pay for checking every file.
fn may_be_damage(error: &DataFusionError) -> bool {
    !matches!(
        error.find_root(),
        DataFusionError::SQL(..)
            | DataFusionError::Plan(_)
            | DataFusionError::SchemaError(..)
            | DataFusionError::NotImplemented(_)
            | DataFusionError::Configuration(_)
            | DataFusionError::ResourcesExhausted(_)
    )
}

/// A failed read with the lake's damaged files named, if it has any (DataFusion's own
/// error says what broke, not in which file).
pub(crate) async fn name_damaged_files(
    lake: &streetflow_lake::Lake,
    error: anyhow::Error,
) -> anyhow::Error {
    let damaged = lake.damaged_tables().await;
    if damaged.is_empty() {
        return error;
    }
    let named: Vec<String> = damaged
        .iter()
        .flat_map(|(table, damage)| damage.iter().map(move |d| format!("{table}/{d}")))
        .collect();
    error.context(format!(
        "the lake has damaged files ({}); `streetflow doctor` lists them",
        named.join("; ")
    ))
}

/// Writes the result as one zstd Parquet file at `out`.
fn write_parquet(
    out: Option<&std::path::Path>,
    schema: streetflow_lake::arrow::datatypes::Schema,
    batches: &[RecordBatch],
) -> anyhow::Result<()> {
    let Some(path) = out else {
        bail!("--format parquet needs --out FILE (Parquet is not written to a terminal)");
    };
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    // The batches' nullability can be looser than the plan's; use theirs.
    let schema = batches
        .first()
        .map_or_else(|| std::sync::Arc::new(schema), RecordBatch::schema);
    let mut writer = ArrowWriter::try_new(file, schema, Some(properties))
        .context("starting the Parquet file")?;
    for batch in batches {
        writer.write(batch).context("writing Parquet")?;
    }
    writer.close().context("finishing the Parquet file")?;
    Ok(())
}

/// Writes the result as a text table, CSV or JSON lines to `out` (standard output if none).
fn write_text(
    format: Format,
    out: Option<&std::path::Path>,
    batches: &[RecordBatch],
) -> anyhow::Result<()> {
    let mut out = output::create(out.unwrap_or_else(|| std::path::Path::new("-")))?;
    match format {
        Format::Table => writeln!(
            out,
            "{}",
            pretty_format_batches(batches).context("formatting the result")?
        )?,
        Format::Csv => {
            let mut writer = arrow_csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            for batch in batches {
                writer.write(batch).context("writing CSV")?;
            }
        }
        Format::Json => {
            let mut writer = arrow_json::LineDelimitedWriter::new(&mut out);
            for batch in batches {
                writer.write(batch).context("writing JSON")?;
            }
            writer.finish().context("writing JSON")?;
        }
        Format::Parquet => bail!("Parquet is not a text format"),
    }
    out.flush().context("writing the result")?;
    Ok(())
}
