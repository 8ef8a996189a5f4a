//! Registering the relations the feature SQL reads (in-memory tables), and, for the
//! tests, views, relations computed once and the SQL event resolution steps.

use std::sync::Arc;

use streetflow_lake::arrow::array::RecordBatch;
use streetflow_lake::arrow::datatypes::SchemaRef;
use streetflow_lake::datafusion::datasource::MemTable;
use streetflow_lake::datafusion::prelude::SessionContext;

use crate::error::{Error, Result, collect};

/// Registers `batches` as the in-memory table `name`.
pub(crate) fn mem_table(
    ctx: &SessionContext,
    name: &str,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
) -> Result<()> {
    let table = MemTable::try_new(schema, vec![batches])
        .map_err(Error::query(format!("building {name}")))?;
    ctx.register_table(name, Arc::new(table))
        .map_err(Error::query(format!("registering {name}")))?;
    Ok(())
}

/// Registers `query` as the view `name` (its readers inline it).
#[cfg(test)]
pub(crate) async fn register_view(ctx: &SessionContext, name: &str, query: &str) -> Result<()> {
    let frame = ctx
        .sql(query)
        .await
        .map_err(Error::query(format!("planning {name}")))?;
    ctx.register_table(name, frame.into_view())
        .map_err(Error::query(format!("registering {name}")))?;
    Ok(())
}

/// Computes `query` once and registers its rows as the table `name`: DataFusion does not
/// materialize views, so a relation read several times is otherwise computed each time.
#[cfg(test)]
pub(crate) async fn materialize(ctx: &SessionContext, name: &str, query: &str) -> Result<()> {
    explain_if_asked(ctx, name, query).await?;
    let started = std::time::Instant::now();
    let frame = ctx
        .sql(query)
        .await
        .map_err(Error::query(format!("planning {name}")))?;
    let planned = Arc::new(frame.schema().as_arrow().clone());
    let batches = frame
        .collect()
        .await
        .map_err(Error::query(format!("computing {name}")))?;
    // The batches' nullability can be looser than the plan's; use theirs.
    let schema = batches.first().map_or(planned, |b| b.schema());
    log_computed(name, &batches, started);
    mem_table(ctx, name, schema, batches)
}

/// Logs (at debug level) how long computing relation `name` took and its row count.
pub(crate) fn log_computed(name: &str, batches: &[RecordBatch], started: std::time::Instant) {
    tracing::debug!(
        relation = name,
        rows = batches.iter().map(RecordBatch::num_rows).sum::<usize>(),
        seconds = started.elapsed().as_secs_f64(),
        "computed"
    );
}

/// Lets DataFusion build one shared hash table from a join side it knows to be small
/// (up to 4 M rows or 256 MiB, e.g. silver's in-memory `touched` partitions) instead of
/// shuffling both sides by hash. Its defaults (128 K rows, 1 MiB) made it repartition
/// every event, all columns, to join with a small in-memory table.
pub(crate) fn broadcast_small_join_sides(ctx: &SessionContext) {
    let state = ctx.state_ref();
    let mut state = state.write();
    let optimizer = &mut state.config_mut().options_mut().optimizer;
    optimizer.hash_join_single_partition_threshold = 256 << 20;
    optimizer.hash_join_single_partition_threshold_rows = 4_000_000;
}

/// Registers `resolved` (each event once, with its flags) over the relation `events`,
/// running [`sql::RESOLVE_STEPS`] in order: the SQL specification that the tests hold
/// [`crate::DailyBuilder`] to.
#[cfg(test)]
pub(crate) async fn register_resolved(ctx: &SessionContext) -> Result<()> {
    for step in crate::sql::RESOLVE_STEPS {
        if step.materialize {
            materialize(ctx, step.name, step.sql).await?;
        } else {
            register_view(ctx, step.name, step.sql).await?;
        }
    }
    Ok(())
}

/// With `STREETFLOW_EXPLAIN_FEATURES` set, runs `query` once more under EXPLAIN ANALYZE
/// and prints the plan with its measured times and row counts to stderr (for profiling;
/// it doubles the work of that step).
pub(crate) async fn explain_if_asked(ctx: &SessionContext, name: &str, query: &str) -> Result<()> {
    if std::env::var_os("STREETFLOW_EXPLAIN_FEATURES").is_none() {
        return Ok(());
    }
    let plan = collect(ctx, &format!("EXPLAIN ANALYZE {query}"), "explain").await?;
    if let Ok(text) = streetflow_lake::arrow::util::pretty::pretty_format_batches(&plan) {
        eprintln!("-- {name}\n{text}");
    }
    Ok(())
}
