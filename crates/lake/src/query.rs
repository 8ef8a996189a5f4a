//! SQL over the lake with DataFusion.

use deltalake::DeltaTableError;
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::datafusion::error::DataFusionError;

use deltalake::DeltaTable;
use deltalake::datafusion::execution::context::SQLOptions;
use deltalake::datafusion::execution::memory_pool::FairSpillPool;
use deltalake::datafusion::execution::runtime_env::RuntimeEnvBuilder;
use deltalake::datafusion::prelude::SessionConfig;
use deltalake::datafusion::prelude::{DataFrame, SessionContext};
use deltalake::datafusion::sql::parser::{DFParser, Statement as DfStatement};
use deltalake::datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use streetflow_core::tables::{
    CREDIT_DECISIONS, DEAD_LETTERS, MERCHANT_DAILY, MERCHANT_DAILY_HISTORY, MERCHANT_FEATURES,
    POS_EVENTS,
};

use crate::error::{Error, Result};
use crate::lake::Lake;

/// Tables a session registers, when they exist.
pub(crate) fn table_names() -> [&'static str; 6] {
    [
        POS_EVENTS.name,
        DEAD_LETTERS.name,
        MERCHANT_DAILY.name,
        MERCHANT_DAILY_HISTORY.name,
        MERCHANT_FEATURES.name,
        CREDIT_DECISIONS.name,
    ]
}

fn datafusion_error<'a>(
    table: &'a str,
    operation: &'static str,
) -> impl FnOnce(DataFusionError) -> Error + 'a {
    move |e| Error::delta(table, operation)(DeltaTableError::Generic(e.to_string()))
}

impl Lake {
    /// A DataFusion session with every existing lake table registered under its name.
    ///
    /// With `STREETFLOW_MEMORY_LIMIT_MB` set, queries share a fair spilling memory pool of
    /// that size: sorts and aggregates spill to temporary files instead of growing. Unset,
    /// memory is unbounded (DataFusion's default). Neither pool kind is safe as a default
    /// on DataFusion 55: a greedy pool fails external sorts once window and aggregate state
    /// fill it, and a fair pool once panicked in repartition's spill path ("partition not
    /// used yet") on the 10,000-merchant features run, though it passed at 12,000 MB.
    pub async fn session(&self) -> Result<SessionContext> {
        let ctx = empty_session()?;
        for name in table_names() {
            let Some(table) = self.open(name).await? else {
                continue;
            };
            register(&ctx, name, &table).await?;
        }
        Ok(ctx)
    }

    /// A session (as [`Lake::session`]) with only `table`, at the version it holds,
    /// registered as `name`: what a reader that records which version it read needs.
    pub async fn pinned_session(&self, name: &str, table: &DeltaTable) -> Result<SessionContext> {
        let ctx = empty_session()?;
        register(&ctx, name, table).await?;
        Ok(ctx)
    }

    /// Plans `sql` over the lake's tables if, and only if, it is one read-only query:
    /// a `SELECT` / `WITH … SELECT` / `VALUES`, or an `EXPLAIN` of one. DDL (`CREATE`,
    /// `DROP`, external tables), DML (`INSERT`, `UPDATE`, `DELETE`, `COPY … TO`), `SET`
    /// and every other statement are refused with [`Error::NotAQuery`]. Tables resolve
    /// to the lake's tables only: the session reads no file or URL named in a query.
    pub async fn read_only_query(&self, sql: &str) -> Result<DataFrame> {
        let statements =
            DFParser::parse_sql(sql).map_err(|e| Error::Query(format!("parse: {e}")))?;
        if statements.len() != 1 {
            return Err(Error::NotAQuery(format!(
                "expected one statement, found {}",
                statements.len()
            )));
        }
        for statement in &statements {
            refuse_unless_query(statement)?;
        }
        let ctx = self.session().await?;
        // Belt and braces: DataFusion checks the plan itself as well.
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        ctx.sql_with_options(sql, options)
            .await
            .map_err(|e| Error::Query(e.to_string()))
    }

    /// Runs one SQL query over the lake and collects the result.
    pub async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        let ctx = self.session().await?;
        let frame = ctx
            .sql(sql)
            .await
            .map_err(datafusion_error("sql", "plan"))?;
        frame
            .collect()
            .await
            .map_err(datafusion_error("sql", "execute"))
    }
}

/// A session without tables, with the memory pool of [`Lake::session`].
fn empty_session() -> Result<SessionContext> {
    let mut builder = RuntimeEnvBuilder::new();
    if let Some(limit) = memory_limit() {
        builder = builder.with_memory_pool(std::sync::Arc::new(FairSpillPool::new(limit)));
    }
    let runtime = builder
        .build_arc()
        .map_err(datafusion_error("session", "build runtime"))?;
    // DataFusion's own settings can be tuned with `DATAFUSION_*` environment variables
    // (e.g. `DATAFUSION_EXECUTION_TARGET_PARTITIONS`).
    let config =
        SessionConfig::from_env().map_err(datafusion_error("session", "read DATAFUSION_*"))?;
    Ok(SessionContext::new_with_config_rt(config, runtime))
}

/// Registers `table` in `ctx` as `name`.
async fn register(ctx: &SessionContext, name: &str, table: &DeltaTable) -> Result<()> {
    table
        .update_datafusion_session(&ctx.state())
        .map_err(Error::delta(name, "register object store"))?;
    let provider = table
        .table_provider()
        .await
        .map_err(datafusion_error(name, "build table provider"))?;
    ctx.register_table(name, provider)
        .map_err(datafusion_error(name, "register table"))?;
    Ok(())
}

/// The memory pool DataFusion may use for one session's queries before spilling, from
/// `STREETFLOW_MEMORY_LIMIT_MB`; `None` (unbounded) when unset or not a number.
pub fn memory_limit() -> Option<usize> {
    std::env::var("STREETFLOW_MEMORY_LIMIT_MB")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map(|mb| mb.saturating_mul(1 << 20))
}

/// Accepts a query or an `EXPLAIN` of one; names anything else in the error.
fn refuse_unless_query(statement: &DfStatement) -> Result<()> {
    let refused = |what: &str| {
        Err(Error::NotAQuery(format!(
            "only queries (SELECT, WITH, VALUES, EXPLAIN) run here; refused {what}"
        )))
    };
    match statement {
        DfStatement::Statement(inner) => match inner.as_ref() {
            SqlStatement::Query(_) => Ok(()),
            SqlStatement::Explain { statement, .. } => match statement.as_ref() {
                SqlStatement::Query(_) => Ok(()),
                _ => refused("an EXPLAIN of a statement that is not a query"),
            },
            other => {
                let text = other.to_string();
                let keyword = text.split_whitespace().next().unwrap_or("statement");
                refused(&format!("a {} statement", keyword.to_uppercase()))
            }
        },
        DfStatement::Explain(explain) => refuse_unless_query(&explain.statement),
        DfStatement::CreateExternalTable(_) => refused("CREATE EXTERNAL TABLE"),
        DfStatement::CopyTo(_) => refused("COPY"),
        _ => refused("a statement that is not a query"),
    }
}
