//! Queries planned once and executed many times over rows each execution supplies.
//!
//! Planning a long SQL query (parsing, analysis, some forty optimizer passes, physical
//! planning) costs tens of milliseconds; running it over one merchant's few hundred rows
//! costs a few. A request-serving path that plans per request spends most of its time
//! planning the same text. A [`PreparedQuery`] plans its SQL once over *request tables*,
//! tables known by name and schema only; each [`PreparedQuery::execute`] hands it the
//! rows of those tables for that execution ([`RequestTables`]) and runs a fresh copy of
//! the physical plan, so concurrent executions share nothing but the plan's shape.

use std::collections::HashMap;
use std::sync::Arc;

use deltalake::datafusion::arrow::array::RecordBatch;
use deltalake::datafusion::arrow::datatypes::SchemaRef;
use deltalake::datafusion::catalog::streaming::StreamingTable;
use deltalake::datafusion::common::tree_node::{Transformed, TreeNode};
use deltalake::datafusion::error::DataFusionError;
use deltalake::datafusion::execution::TaskContext;
use deltalake::datafusion::execution::context::SessionContext;
use deltalake::datafusion::physical_plan::memory::MemoryStream;
use deltalake::datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use deltalake::datafusion::physical_plan::streaming::PartitionStream;
use deltalake::datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream, collect};
use deltalake::datafusion::prelude::SessionConfig;

use crate::error::{Error, Result};

fn query_error(context: impl std::fmt::Display) -> impl FnOnce(DataFusionError) -> Error {
    move |e| Error::Query(format!("{context}: {e}"))
}

/// The rows of each request table for one execution of a [`PreparedQuery`].
#[derive(Debug, Default, Clone)]
pub struct RequestTables {
    tables: HashMap<String, Vec<RecordBatch>>,
}

impl RequestTables {
    /// No tables yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the rows of table `name` (replacing any given before).
    pub fn insert(&mut self, name: impl Into<String>, batches: Vec<RecordBatch>) {
        self.tables.insert(name.into(), batches);
    }

    /// [`Self::insert`], by value.
    pub fn with(mut self, name: impl Into<String>, batches: Vec<RecordBatch>) -> Self {
        self.insert(name, batches);
        self
    }
}

/// The scan of one request table: reads its rows from the [`RequestTables`] of the
/// execution's task context.
#[derive(Debug)]
struct RequestTableStream {
    name: String,
    schema: SchemaRef,
}

impl RequestTableStream {
    fn rows(&self, context: &TaskContext) -> Result<Vec<RecordBatch>, DataFusionError> {
        let tables = context
            .session_config()
            .get_extension::<RequestTables>()
            .ok_or_else(|| {
                DataFusionError::Execution("a prepared query ran without its request tables".into())
            })?;
        let batches = tables.tables.get(&self.name).ok_or_else(|| {
            DataFusionError::Execution(format!("no rows given for request table {}", self.name))
        })?;
        batches
            .iter()
            .map(|batch| {
                if batch.schema() == self.schema {
                    return Ok(batch.clone());
                }
                // Field order and types must match; looser nullability is adopted.
                batch.clone().with_schema(self.schema.clone()).map_err(|e| {
                    DataFusionError::Execution(format!(
                        "rows of request table {} do not have its planned schema: {e}",
                        self.name
                    ))
                })
            })
            .collect()
    }
}

impl PartitionStream for RequestTableStream {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, context: Arc<TaskContext>) -> SendableRecordBatchStream {
        let stream = self
            .rows(&context)
            .and_then(|rows| MemoryStream::try_new(rows, self.schema.clone(), None));
        match stream {
            Ok(stream) => Box::pin(stream),
            Err(error) => Box::pin(RecordBatchStreamAdapter::new(
                self.schema.clone(),
                futures::stream::iter([Err(error)]),
            )),
        }
    }
}

/// A SQL query planned once over named request tables; see the module documentation.
pub struct PreparedQuery {
    context: SessionContext,
    plan: Arc<dyn ExecutionPlan>,
    tables: Vec<String>,
}

impl std::fmt::Debug for PreparedQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedQuery")
            .field("tables", &self.tables)
            .field("schema", &self.plan.schema())
            .finish_non_exhaustive()
    }
}

impl PreparedQuery {
    /// Plans `sql` over request tables of the given names and schemas (one partition:
    /// the rows of one request are too few to be worth splitting).
    pub async fn new(sql: &str, tables: &[(&str, SchemaRef)]) -> Result<Self> {
        let context =
            SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
        for (name, schema) in tables {
            let stream = RequestTableStream {
                name: (*name).to_owned(),
                schema: schema.clone(),
            };
            let table = StreamingTable::try_new(schema.clone(), vec![Arc::new(stream)])
                .map_err(query_error(format!("request table {name}")))?;
            context
                .register_table(*name, Arc::new(table))
                .map_err(query_error(format!("request table {name}")))?;
        }
        let plan = context
            .sql(sql)
            .await
            .map_err(query_error("planning a prepared query"))?
            .create_physical_plan()
            .await
            .map_err(query_error("planning a prepared query"))?;
        Ok(Self {
            context,
            plan,
            tables: tables.iter().map(|(name, _)| (*name).to_owned()).collect(),
        })
    }

    /// The schema of the query's result.
    pub fn schema(&self) -> SchemaRef {
        self.plan.schema()
    }

    /// Runs the query over `tables` (every request table must be given).
    pub async fn execute(&self, tables: RequestTables) -> Result<Vec<RecordBatch>> {
        if let Some(missing) = self
            .tables
            .iter()
            .find(|name| !tables.tables.contains_key(*name))
        {
            return Err(Error::Query(format!(
                "no rows given for request table {missing}"
            )));
        }
        // Joins keep their build side in the plan node: each execution gets fresh nodes.
        let plan = self
            .plan
            .clone()
            .transform_up(|node| node.reset_state().map(Transformed::yes))
            .map(|t| t.data)
            .map_err(query_error("copying a prepared plan"))?;
        let config = self
            .context
            .copied_config()
            .with_extension(Arc::new(tables));
        // Not `TaskContext::from(&state)`: that copies the whole session state and its
        // function registries per execution. The planned nodes hold their functions;
        // the task context's registries only serve re-planning, which never happens here.
        let task = TaskContext::new(
            None,
            self.context.session_id(),
            config,
            HashMap::new(),
            HashMap::new(),
            HashMap::new(),
            HashMap::new(),
            self.context.runtime_env(),
        );
        collect(plan, Arc::new(task))
            .await
            .map_err(query_error("running a prepared query"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deltalake::datafusion::arrow::array::{AsArray, Int64Array, StringArray};
    use deltalake::datafusion::arrow::datatypes::{DataType, Field, Int64Type, Schema};

    fn people(names: &[&str], ages: &[i64]) -> (SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("name", DataType::Utf8, false),
            Field::new("age", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(names.to_vec())),
                Arc::new(Int64Array::from(ages.to_vec())),
            ],
        )
        .unwrap();
        (schema, batch)
    }

    fn limits() -> (SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "min_age",
            DataType::Int64,
            false,
        )]));
        let batch =
            RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![18]))])
                .unwrap();
        (schema, batch)
    }

    const SQL: &str = "SELECT p.name, SUM(p.age) OVER () AS total FROM people p \
                       JOIN limits l ON p.age >= l.min_age ORDER BY p.name";

    fn names_and_totals(batches: &[RecordBatch]) -> Vec<(String, i64)> {
        batches
            .iter()
            .flat_map(|b| {
                let names = b.column(0).as_string::<i32>().clone();
                let totals = b.column(1).as_primitive::<Int64Type>().clone();
                (0..b.num_rows())
                    .map(move |i| (names.value(i).to_owned(), totals.value(i)))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[tokio::test]
    async fn each_execution_sees_only_its_own_rows() {
        let (people_schema, first) = people(&["ada", "bo", "cy"], &[36, 12, 40]);
        let (_, second) = people(&["dee"], &[20]);
        let (limits_schema, limit) = limits();
        let query =
            PreparedQuery::new(SQL, &[("people", people_schema), ("limits", limits_schema)])
                .await
                .unwrap();
        let run = |batch: RecordBatch| {
            RequestTables::new()
                .with("people", vec![batch])
                .with("limits", vec![limit.clone()])
        };
        // The same plan twice and then concurrently: a join's build side (the limits)
        // or a first execution's rows must not leak into another.
        let one = query.execute(run(first.clone())).await.unwrap();
        assert_eq!(
            names_and_totals(&one),
            [("ada".into(), 76), ("cy".into(), 76)]
        );
        let two = query.execute(run(second.clone())).await.unwrap();
        assert_eq!(names_and_totals(&two), [("dee".into(), 20)]);
        let (a, b) = tokio::join!(query.execute(run(second)), query.execute(run(first)));
        assert_eq!(names_and_totals(&a.unwrap()), [("dee".into(), 20)]);
        assert_eq!(names_and_totals(&b.unwrap()).len(), 2);
        assert_eq!(query.schema().field(0).name(), "name");
    }

    #[tokio::test]
    async fn missing_tables_and_wrong_rows_are_errors() {
        let (people_schema, first) = people(&["ada"], &[36]);
        let (limits_schema, _) = limits();
        let query =
            PreparedQuery::new(SQL, &[("people", people_schema), ("limits", limits_schema)])
                .await
                .unwrap();
        let missing = query
            .execute(RequestTables::new().with("people", vec![first.clone()]))
            .await
            .unwrap_err();
        assert!(missing.to_string().contains("limits"), "{missing}");
        // People's rows given as the limits table: the wrong columns.
        let wrong = query
            .execute(
                RequestTables::new()
                    .with("people", vec![first.clone()])
                    .with("limits", vec![first]),
            )
            .await
            .unwrap_err();
        assert!(wrong.to_string().contains("planned schema"), "{wrong}");
        assert!(
            PreparedQuery::new("SELECT nope FROM people", &[])
                .await
                .is_err()
        );
    }
}
