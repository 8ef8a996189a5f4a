//! SQL over the lake with DataFusion.

use deltalake::DeltaTableError;
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::datafusion::error::DataFusionError;
use deltalake::datafusion::prelude::SessionContext;
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
    pub async fn session(&self) -> Result<SessionContext> {
        let ctx = SessionContext::new();
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
