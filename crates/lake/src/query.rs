//! SQL over the lake with DataFusion.

use deltalake::DeltaTableError;
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::datafusion::error::DataFusionError;

use deltalake::datafusion::execution::context::SQLOptions;
use deltalake::datafusion::execution::runtime_env::RuntimeEnvBuilder;
use deltalake::datafusion::prelude::SessionConfig;
use deltalake::datafusion::prelude::{DataFrame, SessionContext};
use deltalake::datafusion::sql::parser::{DFParser, Statement as DfStatement};
use deltalake::datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use streetflow_core::tables::{
    CREDIT_DECISIONS, DEAD_LETTERS, MERCHANT_DAILY, MERCHANT_FEATURES, POS_EVENTS,
};

use crate::error::{Error, Result};
use crate::lake::Lake;

/// Tables a session registers, when they exist.
fn table_names() -> [&'static str; 5] {
    [
        POS_EVENTS.name,
        DEAD_LETTERS.name,
        MERCHANT_DAILY.name,
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
    /// Queries share a memory pool of [`memory_limit`] bytes: sorts and aggregates that
    /// would exceed it spill to temporary files instead of growing without bound.
    pub async fn session(&self) -> Result<SessionContext> {
        let runtime = RuntimeEnvBuilder::new()
            // Greedy, not fair: a fair pool splits the limit among every spillable consumer
            // (each repartition channel, each sort), so queries spilled far below the limit,
            // and DataFusion 55's repartition spill path then panicked ("partition not used
            // yet") on the 10,000-merchant features run.
            .with_memory_limit(memory_limit(), 1.0)
            .build_arc()
            .map_err(datafusion_error("session", "build runtime"))?;
        let ctx = SessionContext::new_with_config_rt(SessionConfig::new(), runtime);
        for name in table_names() {
            let Some(table) = self.open(name).await? else {
                continue;
            };
            table
                .update_datafusion_session(&ctx.state())
                .map_err(Error::delta(name, "register object store"))?;
            let provider = table
                .table_provider()
                .await
                .map_err(datafusion_error(name, "build table provider"))?;
            ctx.register_table(name, provider)
                .map_err(datafusion_error(name, "register table"))?;
        }
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

/// The memory DataFusion may use for one session's queries before spilling: the
/// `STREETFLOW_MEMORY_LIMIT_MB` environment variable, else 60 % of the machine's memory
/// (the rest is left to Arrow buffers outside the pool, the OS and other processes), else
/// 8 GiB where the machine's memory cannot be read.
pub fn memory_limit() -> usize {
    const MIB: usize = 1 << 20;
    if let Some(mb) = std::env::var("STREETFLOW_MEMORY_LIMIT_MB")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return mb.saturating_mul(MIB);
    }
    let total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<usize>()
                        .ok()
                })
        });
    match total_kib {
        Some(kib) => kib / 10 * 6 * 1024,
        None => 8 * 1024 * MIB,
    }
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
