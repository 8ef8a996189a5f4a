//! Bitemporal daily rows: every version of each `merchant_daily` row as the lake knew
//! it, from the end of its business day on.
//!
//! What an event says about its row changes only at a few instants, all knowledge times
//! of events: when it became known, when a void naming it became known (a sale), when
//! the sale it names became known (a refund or void stops being an orphan), when a later
//! delivery and a differing one became known. So a row's versions are its value at the
//! end of its day and at each such instant after it, each computed over the events known
//! then with the same rules as the latest rows ([`DailyBuilder::contribute`]); an instant
//! that changes nothing gives no version, and a row that stops existing (an orphan void
//! whose sale arrived) gets a retraction.

use std::collections::HashMap;

use streetflow_core::tables::{MERCHANT_DAILY_HISTORY, payers_type};
use streetflow_lake::arrow::array::{BooleanArray, ListArray, StructArray};
use streetflow_lake::arrow::buffer::{OffsetBuffer, ScalarBuffer};

use super::*;

/// Which versions [`DailyBuilder::finish_history`] computes.
pub struct HistorySpec<'a> {
    /// Emit only versions known after this instant (µs UTC; `None`: all of them). The
    /// versions before it are still computed, to know what each later one changes.
    pub after: Option<i64>,
    /// The lake's settled knowledge (µs UTC): no version after it, and no day that ends
    /// after it.
    pub horizon: i64,
    /// The end of a business day (µs UTC) of (operator, date): its first version.
    pub day_end: &'a (dyn Fn(&str, i32) -> i64 + Sync),
    /// Which (operator, date) days to compute.
    pub keep: &'a (dyn Fn(&str, i32) -> bool + Sync),
}

/// One version of one row: its value, or `None` for a retraction.
type Version = Option<(DayTotals, Vec<(u64, i64, i64)>)>;

/// Output rows before they become a batch.
#[derive(Default)]
struct HistoryRows {
    keys: Vec<(u32, i32, u32, i64, bool)>,
    days: Vec<DayTotals>,
    payers: Vec<Vec<(u64, i64, i64)>>,
}

pub(crate) use streetflow_core::tables::month_of;

/// Builders computing history versions right now, across the process.
static FINISHING_BUILDS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One builder computing history versions, for as long as it lives.
struct FinishingBuild;

impl FinishingBuild {
    fn enter() -> Self {
        FINISHING_BUILDS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        FinishingBuild
    }

    /// Builders computing versions now (this one included once entered).
    fn count() -> usize {
        FINISHING_BUILDS.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for FinishingBuild {
    fn drop(&mut self) {
        FINISHING_BUILDS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// `items` cut into at most `parts` consecutive runs of about equal total `weight`.
fn runs_of_similar_weight<T: Copy>(
    items: &[T],
    parts: usize,
    weight: impl Fn(T) -> usize,
) -> Vec<&[T]> {
    let total: usize = items.iter().map(|&item| weight(item)).sum();
    let share = total.div_ceil(parts.max(1)).max(1);
    let mut runs = Vec::new();
    let mut start = 0;
    let mut carried = 0;
    for (index, &item) in items.iter().enumerate() {
        carried += weight(item);
        if carried >= share && runs.len() + 1 < parts {
            runs.push(&items[start..=index]);
            start = index + 1;
            carried = 0;
        }
    }
    if start < items.len() || runs.is_empty() {
        runs.push(&items[start..]);
    }
    runs
}

impl DailyBuilder {
    /// Every version, within `spec`, of the rows of the days `spec` keeps, sorted by
    /// operator, merchant, date and knowledge time, in `merchant_daily_history`'s schema.
    pub fn finish_history(mut self, spec: &HistorySpec<'_>) -> Result<Vec<RecordBatch>> {
        self.history_rows(spec)
    }

    /// [`DailyBuilder::finish`]'s rows of the days `keep` accepts, and
    /// [`DailyBuilder::finish_history`]'s rows within `spec`: both tables of silver from
    /// one pass over bronze.
    pub fn finish_daily_and_history(
        mut self,
        keep: impl Fn(&str, i32) -> bool,
        spec: &HistorySpec<'_>,
    ) -> Result<(Vec<RecordBatch>, Vec<RecordBatch>)> {
        let history = self.history_rows(spec)?;
        let daily = self.finish(keep)?;
        Ok((daily, history))
    }

    fn history_rows(&mut self, spec: &HistorySpec<'_>) -> Result<Vec<RecordBatch>> {
        self.settle();
        let operator_names: Vec<String> = (0..self.operators.len() as u32)
            .map(|id| self.operators.text(id))
            .collect();
        let operator_of = |keys: &Interner, index: u32| keys.spans.get(index).namespace;

        // The events of each (operator, merchant, date) row whose day is kept and over.
        let mut day_ends: HashMap<(u32, i32), Option<i64>, FixedState> =
            HashMap::with_hasher(FixedState::with_seed(5));
        let mut group_of: HashMap<(u32, u32, i32), u32, FixedState> =
            HashMap::with_hasher(FixedState::with_seed(9));
        let mut groups: Vec<(u32, u32, i32, i64)> = Vec::new();
        let mut members: Vec<(u32, u32)> = Vec::new();
        for index in 0..self.events.len() as u32 {
            let event = *self.events.get(index);
            if event.deliveries == 0 {
                continue;
            }
            let operator = operator_of(&self.keys, index);
            let date = event.business_date;
            let end = *day_ends.entry((operator, date)).or_insert_with(|| {
                let name = &operator_names[operator as usize];
                let end = (spec.day_end)(name, date);
                ((spec.keep)(name, date) && end <= spec.horizon).then_some(end)
            });
            let Some(end) = end else {
                continue;
            };
            let key = (operator, event.merchant, date);
            let group = *group_of.entry(key).or_insert_with(|| {
                groups.push((operator, event.merchant, date, end));
                (groups.len() - 1) as u32
            });
            members.push((group, index));
        }
        members.sort_unstable();
        let mut starts = vec![0usize; groups.len() + 1];
        for &(group, _) in &members {
            starts[group as usize + 1] += 1;
        }
        for i in 1..starts.len() {
            starts[i] += starts[i - 1];
        }
        let merchant_names: HashMap<u32, String> = groups
            .iter()
            .map(|&(_, merchant, _, _)| (merchant, self.merchants.text(merchant)))
            .collect();
        let mut order: Vec<u32> = (0..groups.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| {
            let (ga, gb) = (groups[a as usize], groups[b as usize]);
            operator_names[ga.0 as usize]
                .cmp(&operator_names[gb.0 as usize])
                .then_with(|| merchant_names[&ga.1].cmp(&merchant_names[&gb.1]))
                .then(ga.2.cmp(&gb.2))
        });

        // Rows are independent of each other once the keys are settled: their versions
        // are computed on every core, each thread taking a run of rows in output order
        // of about the same number of events, and the runs joined in order.
        // Builders of several operators finish at once (`ParallelDaily`): they share the
        // cores instead of each taking all of them.
        let _finishing = FinishingBuild::enter();
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let threads = (cores / FinishingBuild::count().max(1)).max(1);
        let runs = runs_of_similar_weight(&order, threads, |group| {
            starts[group as usize + 1] - starts[group as usize]
        });
        let this = &*self;
        let (group_members, starts, groups) = (&members, &starts, &groups);
        let compute = move |run: &[u32]| {
            this.history_run(
                run,
                |group| {
                    let (operator, merchant, date, end) = groups[group as usize];
                    let events = &group_members[starts[group as usize]..starts[group as usize + 1]];
                    ((operator, merchant, date, end), events)
                },
                spec,
            )
        };
        let computed: Vec<Result<HistoryRows>> = if runs.len() == 1 {
            runs.into_iter().map(compute).collect()
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = runs
                    .iter()
                    .map(|&run| {
                        // A thread that cannot start leaves its run to this one.
                        std::thread::Builder::new()
                            .name("history-versions".to_owned())
                            .spawn_scoped(scope, move || compute(run))
                            .map_err(|_| run)
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|handle| match handle {
                        Ok(handle) => handle.join().unwrap_or_else(|_| {
                            Err(Error::Arrow {
                                context: "computing merchant_daily_history".to_owned(),
                                source: ArrowError::ComputeError(
                                    "a history thread stopped".to_owned(),
                                ),
                            })
                        }),
                        Err(run) => compute(run),
                    })
                    .collect()
            })
        };
        let mut rows = HistoryRows::default();
        for run in computed {
            let run = run?;
            rows.keys.extend(run.keys);
            rows.days.extend(run.days);
            rows.payers.extend(run.payers);
        }
        drop(members);
        rows.into_batches(&operator_names, &merchant_names)
    }

    /// The versions of a run of rows, in the run's order: `row` gives each row's
    /// (operator, merchant, date, end of day) and its events.
    fn history_run<'a>(
        &self,
        run: &[u32],
        row: impl Fn(u32) -> ((u32, u32, i32, i64), &'a [(u32, u32)]),
        spec: &HistorySpec<'_>,
    ) -> Result<HistoryRows> {
        let mut rows = HistoryRows::default();
        let mut instants: Vec<i64> = Vec::new();
        for &group in run {
            let ((operator, merchant, date, end), events) = row(group);
            instants.clear();
            instants.push(end);
            let mut note = |t: i64| {
                if t > end && t <= spec.horizon {
                    instants.push(t);
                }
            };
            for &(_, index) in events {
                let event = self.events.get(index);
                note(event.known());
                note(event.voided_from);
                note(event.answered_from);
                note(event.conflict_from);
                if let Some(later) = self.repeats.get(&index) {
                    later.iter().for_each(|d| note(d.known()));
                }
            }
            instants.sort_unstable();
            instants.dedup();
            let mut previous: Version = None;
            for &t in &instants {
                let current = self.version_at(events, t)?;
                if current != previous {
                    if spec.after.is_none_or(|after| t > after) {
                        rows.keys
                            .push((operator, date, merchant, t, current.is_none()));
                        let (day, payers) = current.clone().unwrap_or_default();
                        rows.days.push(day);
                        rows.payers.push(payers);
                    }
                    previous = current;
                }
            }
        }
        Ok(rows)
    }

    /// The row of `events` (one row's events) as known at `t`: `None` if it has none.
    fn version_at(&self, events: &[(u32, u32)], t: i64) -> Result<Version> {
        let mut day = DayTotals::default();
        let mut sales: Vec<(u64, i64)> = Vec::new();
        for &(_, index) in events {
            let event = self.events.get(index);
            if event.known() > t {
                continue;
            }
            self.contribute(index, event, t, &mut day, |payer, amount| {
                sales.push((payer, amount));
                Ok(())
            })?;
        }
        if day.counted == 0 {
            return Ok(None);
        }
        // Sorted as the table stores keys: signed.
        sales.sort_unstable_by_key(|&(payer, _)| payer as i64);
        let mut payers: Vec<(u64, i64, i64)> = Vec::new();
        for (payer, amount) in sales {
            match payers.last_mut() {
                Some(last) if last.0 == payer => {
                    last.1 += 1;
                    add(&mut last.2, amount)?;
                }
                _ => payers.push((payer, 1, amount)),
            }
        }
        day.distinct_payers = payers.len() as i64;
        day.settle_net()?;
        Ok(Some((day, payers)))
    }
}

impl HistoryRows {
    fn into_batches(
        self,
        operator_names: &[String],
        merchant_names: &HashMap<u32, String>,
    ) -> Result<Vec<RecordBatch>> {
        let mut batches = Vec::new();
        let total = self.keys.len();
        let mut start = 0;
        while start < total {
            let end = (start + OUTPUT_BATCH_ROWS).min(total);
            let keys = &self.keys[start..end];
            let mut columns: Vec<ArrayRef> = vec![
                Arc::new(StringArray::from_iter_values(
                    keys.iter().map(|k| operator_names[k.0 as usize].as_str()),
                )),
                Arc::new(Date32Array::from_iter_values(
                    keys.iter().map(|k| month_of(k.1)),
                )),
                Arc::new(Date32Array::from_iter_values(keys.iter().map(|k| k.1))),
                Arc::new(StringArray::from_iter_values(
                    keys.iter().map(|k| merchant_names[&k.2].as_str()),
                )),
                Arc::new(
                    TimestampMicrosecondArray::from_iter_values(keys.iter().map(|k| k.3))
                        .with_timezone("UTC"),
                ),
                Arc::new(BooleanArray::from_iter(keys.iter().map(|k| Some(k.4)))),
            ];
            columns.extend(measure_columns(self.days[start..end].iter()));
            columns.push(payer_list(&self.payers[start..end])?);
            batches.push(
                RecordBatch::try_new(MERCHANT_DAILY_HISTORY.schema.clone(), columns).map_err(
                    |source| Error::Arrow {
                        context: "building merchant_daily_history rows".to_owned(),
                        source,
                    },
                )?,
            );
            start = end;
        }
        Ok(batches)
    }
}

/// The `payers` column of rows with these payer-day entries.
fn payer_list(rows: &[Vec<(u64, i64, i64)>]) -> Result<ArrayRef> {
    let not_a_list = || Error::Arrow {
        context: "building merchant_daily_history rows".to_owned(),
        source: ArrowError::SchemaError("payers is not a list of structs".to_owned()),
    };
    let DataType::List(element) = payers_type() else {
        return Err(not_a_list());
    };
    let DataType::Struct(fields) = element.data_type().clone() else {
        return Err(not_a_list());
    };
    // Built as plain columns of known length: an `Int64Builder` per field behind
    // `StructBuilder`'s dynamic lookups cost three downcasts and regrown buffers per
    // entry, most of the time of writing the history (17 M entries a dense load).
    let entries: usize = rows.iter().map(Vec::len).sum();
    let mut offsets = Vec::with_capacity(rows.len() + 1);
    offsets.push(0_i32);
    let (mut keys, mut visits, mut fens) = (
        Vec::with_capacity(entries),
        Vec::with_capacity(entries),
        Vec::with_capacity(entries),
    );
    for payers in rows {
        for &(payer, payer_visits, fen) in payers {
            // Stored as signed, as the table keeps keys.
            keys.push(payer as i64);
            visits.push(payer_visits);
            fens.push(fen);
        }
        let end = i32::try_from(keys.len()).map_err(|_| Error::Arrow {
            context: "building merchant_daily_history rows".to_owned(),
            source: ArrowError::ComputeError("too many payer entries for one batch".to_owned()),
        })?;
        offsets.push(end);
    }
    let arrow = |source| Error::Arrow {
        context: "building merchant_daily_history rows".to_owned(),
        source,
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(keys)),
        Arc::new(Int64Array::from(visits)),
        Arc::new(Int64Array::from(fens)),
    ];
    let entries = StructArray::try_new(fields, columns, None).map_err(arrow)?;
    let list = ListArray::try_new(
        element,
        OffsetBuffer::new(ScalarBuffer::from(offsets)),
        Arc::new(entries),
        None,
    )
    .map_err(arrow)?;
    Ok(Arc::new(list))
}

#[cfg(test)]
mod tests;
