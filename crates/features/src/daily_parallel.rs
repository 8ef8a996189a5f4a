//! [`DailyBuilder`]s on several threads, one share of the operators each.
//!
//! Event keys, and the sales that refunds and voids name, never cross operators, so each
//! operator's rows can be numbered and resolved by a builder of its own. A scanned batch
//! of one operator goes to its builder whole; a batch of several is split. One builder numbering every key
//! was the single busy thread of a silver or features run (cache misses on millions of
//! keys), while the scan used the other core only in part.

use std::collections::HashMap;
use std::thread::JoinHandle;

use streetflow_lake::arrow::array::{Array, BooleanArray, RecordBatch};
use streetflow_lake::arrow::compute::filter_record_batch;
use streetflow_lake::arrow::error::ArrowError;
use tokio::sync::mpsc;

use futures::StreamExt;
use streetflow_lake::datafusion::prelude::SessionContext;

use crate::daily::{DAILY_INPUT_COLUMNS, DailyBuilder, HistorySpec, Strs, strings};
use crate::error::{Error, Result};

/// Batches waiting per builder: enough to keep it busy, few enough that a slow builder
/// holds the scan back instead of buffering it.
const QUEUED_BATCHES: usize = 4;

/// One builder thread and the queue that feeds it.
struct Shard {
    queue: mpsc::Sender<RecordBatch>,
    worker: JoinHandle<Result<DailyBuilder>>,
}

/// Feeds bronze batches to one [`DailyBuilder`] per thread, by operator, and joins their
/// rows in the order a single builder gives.
pub struct ParallelDaily {
    shards: Vec<Shard>,
    /// The shard of each operator seen, dealt in turn in the order first seen.
    shard_of: HashMap<String, usize>,
    rows: u64,
}

/// The error of a builder thread that stopped without saying why (it panicked).
fn stopped() -> Error {
    Error::Arrow {
        context: "computing merchant_daily".to_owned(),
        source: ArrowError::ComputeError("a daily builder thread stopped".to_owned()),
    }
}

impl ParallelDaily {
    /// `threads` builders (at least one), each made by `make`.
    pub fn new(threads: usize, make: impl Fn() -> DailyBuilder) -> Self {
        let shards = (0..threads.max(1))
            .map(|_| {
                let (queue, mut incoming) = mpsc::channel::<RecordBatch>(QUEUED_BATCHES);
                let mut builder = make();
                let worker = std::thread::spawn(move || {
                    while let Some(batch) = incoming.blocking_recv() {
                        builder.push(&batch)?;
                    }
                    Ok(builder)
                });
                Shard { queue, worker }
            })
            .collect();
        ParallelDaily {
            shards,
            shard_of: HashMap::new(),
            rows: 0,
        }
    }

    /// One builder per available core.
    pub fn per_core(make: impl Fn() -> DailyBuilder) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self::new(cores, make)
    }

    /// Bronze rows pushed so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    fn shard(&mut self, operator: &str) -> usize {
        if let Some(&shard) = self.shard_of.get(operator) {
            return shard;
        }
        let shard = self.shard_of.len() % self.shards.len();
        self.shard_of.insert(operator.to_owned(), shard);
        shard
    }

    /// Hands `batch` to the builders of its operators.
    pub async fn push(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let operators = strings(&batch, "operator_id")?;
        if operators.null_count() > 0 {
            // The builder reports it.
            return self.send(0, batch).await;
        }
        let names = Strs::of(&operators);
        let first = names.value(0);
        let rows = batch.num_rows();
        if (1..rows).all(|row| names.value(row) == first) {
            let shard = self.shard(first);
            return self.send(shard, batch).await;
        }
        let shard_of_row: Vec<usize> = (0..rows).map(|row| self.shard(names.value(row))).collect();
        for shard in 0..self.shards.len() {
            let mask: BooleanArray = shard_of_row.iter().map(|&s| Some(s == shard)).collect();
            if mask.true_count() == 0 {
                continue;
            }
            let part = filter_record_batch(&batch, &mask).map_err(|source| Error::Arrow {
                context: "splitting bronze rows by operator".to_owned(),
                source,
            })?;
            self.send(shard, part).await?;
        }
        Ok(())
    }

    /// Pushes the rows of `relation` (a table or a parenthesized query over `ctx`'s
    /// tables), streamed: only the columns the daily rows depend on.
    pub async fn push_scan(&mut self, ctx: &SessionContext, relation: &str) -> Result<()> {
        let query = format!(
            "SELECT {} FROM {relation} scanned",
            DAILY_INPUT_COLUMNS.join(", ")
        );
        let mut stream = ctx
            .sql(&query)
            .await
            .map_err(Error::query("planning the bronze scan"))?
            .execute_stream()
            .await
            .map_err(Error::query("scanning bronze"))?;
        while let Some(batch) = stream.next().await {
            self.push(batch.map_err(Error::query("scanning bronze"))?)
                .await?;
        }
        Ok(())
    }

    async fn send(&mut self, shard: usize, batch: RecordBatch) -> Result<()> {
        let rows = batch.num_rows() as u64;
        if self.shards[shard].queue.send(batch).await.is_err() {
            // The builder stopped on an error: report it.
            let shards = std::mem::take(&mut self.shards);
            for Shard { queue, worker } in shards {
                drop(queue);
                worker.join().map_err(|_| stopped())??;
            }
            return Err(stopped());
        }
        self.rows += rows;
        Ok(())
    }

    /// Stops feeding the builders and runs `finish` on each, every builder on a thread
    /// of its own.
    fn finish_each<T: Send>(
        self,
        finish: impl Fn(DailyBuilder) -> Result<T> + Sync,
    ) -> Result<Vec<T>> {
        let mut builders = Vec::with_capacity(self.shards.len());
        for Shard { queue, worker } in self.shards {
            drop(queue);
            builders.push(worker.join().map_err(|_| stopped())??);
        }
        let finish = &finish;
        std::thread::scope(|scope| {
            let running: Vec<_> = builders
                .into_iter()
                .map(|builder| scope.spawn(move || finish(builder)))
                .collect();
            running
                .into_iter()
                .map(|thread| thread.join().map_err(|_| stopped())?)
                .collect()
        })
    }

    /// The builders' daily rows (in [`DailyBuilder::finish`]'s order: operator, date,
    /// merchant) and `payer_sales` rows, each builder finishing on its own thread.
    pub fn finish_with_payer_sales(
        self,
        keep: impl Fn(&str, i32) -> bool + Sync,
    ) -> Result<(Vec<RecordBatch>, Vec<RecordBatch>)> {
        let finished = self.finish_each(|builder| builder.finish_with_payer_sales(&keep))?;
        let mut payer_sales = Vec::new();
        let mut daily = Vec::new();
        for (rows, payers) in finished {
            payer_sales.extend(payers);
            daily.push(rows);
        }
        Ok((by_operator(daily)?, payer_sales))
    }

    /// [`ParallelDaily::finish_with_payer_sales`]'s daily rows only.
    pub fn finish(self, keep: impl Fn(&str, i32) -> bool + Sync) -> Result<Vec<RecordBatch>> {
        Ok(self.finish_with_payer_sales(keep)?.0)
    }

    /// The builders' [`DailyBuilder::finish_history`] rows, in its order (operator,
    /// merchant, date, knowledge time).
    pub fn finish_history(self, spec: &HistorySpec<'_>) -> Result<Vec<RecordBatch>> {
        by_operator(self.finish_each(|builder| builder.finish_history(spec))?)
    }

    /// The builders' daily rows ([`ParallelDaily::finish`]) and history rows
    /// ([`ParallelDaily::finish_history`]) from one pass.
    pub fn finish_daily_and_history(
        self,
        keep: impl Fn(&str, i32) -> bool + Sync,
        spec: &HistorySpec<'_>,
    ) -> Result<(Vec<RecordBatch>, Vec<RecordBatch>)> {
        let finished = self.finish_each(|builder| builder.finish_daily_and_history(&keep, spec))?;
        let (mut daily, mut history) = (Vec::new(), Vec::new());
        for (rows, versions) in finished {
            daily.push(rows);
            history.push(versions);
        }
        Ok((by_operator(daily)?, by_operator(history)?))
    }
}

/// The rows of several builders (each sorted by operator, its operators its own) in one
/// order: the runs of one operator's rows ordered by the operator's name.
fn by_operator(outputs: Vec<Vec<RecordBatch>>) -> Result<Vec<RecordBatch>> {
    let mut runs: Vec<(String, RecordBatch)> = Vec::new();
    for batch in outputs.into_iter().flatten() {
        runs.extend(operator_runs(&batch)?);
    }
    runs.sort_by(|(a, _), (b, _)| a.cmp(b));
    Ok(runs.into_iter().map(|(_, rows)| rows).collect())
}

/// `batch` (sorted by operator) cut into runs of one operator each, zero-copy.
fn operator_runs(batch: &RecordBatch) -> Result<Vec<(String, RecordBatch)>> {
    let operators = strings(batch, "operator_id")?;
    let names = Strs::of(&operators);
    let mut runs = Vec::new();
    let mut start = 0;
    for row in 1..=batch.num_rows() {
        if row == batch.num_rows() || names.value(row) != names.value(start) {
            runs.push((
                names.value(start).to_owned(),
                batch.slice(start, row - start),
            ));
            start = row;
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daily::tests::district;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_threads_give_the_rows_of_one_builder() {
        let batches = district(3);
        let mut single = DailyBuilder::new();
        let mut parallel = ParallelDaily::new(3, DailyBuilder::new);
        for batch in &batches {
            single.push(batch).unwrap();
            parallel.push(batch.clone()).await.unwrap();
        }
        // And a batch that mixes operators, split on the way in.
        let mixed = streetflow_lake::arrow::compute::concat_batches(&batches[0].schema(), &batches)
            .unwrap();
        assert_eq!(parallel.rows(), single.rows());
        let expected = single.finish(|_, _| true).unwrap();
        let got = parallel.finish(|_, _| true).unwrap();
        let text = |b: &[RecordBatch]| {
            streetflow_lake::arrow::util::pretty::pretty_format_batches(b)
                .unwrap()
                .to_string()
        };
        assert_eq!(text(&got), text(&expected));
        assert!(expected.iter().map(RecordBatch::num_rows).sum::<usize>() > 100);

        let mut split = ParallelDaily::new(2, DailyBuilder::new);
        split.push(mixed).await.unwrap();
        assert_eq!(text(&split.finish(|_, _| true).unwrap()), text(&expected));
    }
}
