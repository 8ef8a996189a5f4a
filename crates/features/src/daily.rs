//! `merchant_daily` rows computed in one pass over bronze rows, without SQL.
//!
//! The rows are exactly those of `pipelines/features/daily.sql` over the resolution steps
//! (`repeated_keys.sql` … `resolved.sql`); the SQL stays the specification, and the tests
//! compare the two on generated and hand-made edge cases. Silver uses this path because
//! the SQL re-scans all of bronze for every resolution step and holds its hash tables as
//! strings, which cost several times the time and memory (`deploy/SCALING.md`, "Why
//! the designs").
//!
//! How: every `(operator_id, event_id)` key, and every key a refund or void names, is
//! interned once into a compact table. Each key keeps its first arrival's content, its
//! delivery count and whether any delivery disagreed. Then the claims (refunds and voids)
//! are resolved against the keys they name, and the surviving events are summed per
//! (operator, merchant, business date).

use std::cmp::Ordering;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use foldhash::fast::FixedState;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry;
use streetflow_core::Channel;
use streetflow_core::tables::MERCHANT_DAILY;
use streetflow_lake::arrow::array::{
    Array, ArrayRef, AsArray, Date32Array, Int64Array, PrimitiveArray, RecordBatch, StringArray,
    StringViewArray, TimestampMicrosecondArray,
};
use streetflow_lake::arrow::compute::cast;
use streetflow_lake::arrow::datatypes::{
    ArrowPrimitiveType, DataType, Date32Type, Field, Int32Type, Int64Type, Schema, SchemaRef,
    TimeUnit, TimestampMicrosecondType,
};
use streetflow_lake::arrow::error::ArrowError;

use crate::error::{Error, Result};

mod history;
pub use history::HistorySpec;
pub(crate) use history::month_of;

/// The bronze columns the daily rows depend on.
pub const DAILY_INPUT_COLUMNS: [&str; 17] = [
    "operator_id",
    "business_date",
    "event_id",
    "merchant_id",
    "terminal_id",
    "kind",
    "amount_fen",
    "occurred_at",
    "local_minute_of_day",
    "channel",
    "ref_event_id",
    "payer_ref",
    "knowledge_time",
    "kafka_partition",
    "kafka_offset",
    "source_file",
    "source_line",
];

/// No value (a NULL column, or no key).
const NONE: u32 = u32::MAX;
/// Elements per chunk of a [`Chunked`] vector.
const CHUNK: usize = 1 << 16;
/// Bytes per chunk of interned text.
const TEXT_CHUNK: usize = 1 << 20;
/// Rows per output batch.
const OUTPUT_BATCH_ROWS: usize = 1 << 16;

/// A vector stored in fixed-size chunks: growing it never copies what it holds, so a
/// table of millions of events never exists twice in memory during a reallocation.
struct Chunked<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T: Copy> Chunked<T> {
    fn new() -> Self {
        Chunked {
            chunks: Vec::new(),
            len: 0,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, value: T) {
        if self.len.is_multiple_of(CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.push(value);
            self.len += 1;
        }
    }

    fn get(&self, index: u32) -> &T {
        let index = index as usize;
        &self.chunks[index / CHUNK][index % CHUNK]
    }

    fn get_mut(&mut self, index: u32) -> &mut T {
        let index = index as usize;
        &mut self.chunks[index / CHUNK][index % CHUNK]
    }
}

/// Where one interned string lives.
#[derive(Clone, Copy)]
struct Span {
    namespace: u32,
    chunk: u32,
    start: u32,
    len: u32,
}

/// An entry of an [`Interner`]'s hash table: the string's number and 32 bits of its
/// hash, so that growing the table never reads the strings again.
#[derive(Clone, Copy)]
struct Slot {
    id: u32,
    tag: u32,
}

impl Slot {
    /// The table hash of a tag: a fixed odd multiplier spreads 32 bits over 64.
    fn hash(tag: u32) -> u64 {
        u64::from(tag).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
}

/// Strings (within a namespace, e.g. an operator) numbered densely from 0 in the order
/// first seen. Exact: keys are compared byte for byte, never by hash alone.
struct Interner {
    table: HashTable<Slot>,
    spans: Chunked<Span>,
    text: Vec<Vec<u8>>,
    hasher: FixedState,
}

impl Interner {
    fn new() -> Self {
        Interner {
            table: HashTable::new(),
            spans: Chunked::new(),
            text: Vec::new(),
            hasher: FixedState::with_seed(0x5eed_da11),
        }
    }

    fn len(&self) -> usize {
        self.spans.len()
    }

    fn bytes_of<'a>(text: &'a [Vec<u8>], span: &Span) -> &'a [u8] {
        let start = span.start as usize;
        &text[span.chunk as usize][start..start + span.len as usize]
    }

    /// The number of `value` in `namespace`, numbering it if it is new.
    fn intern(&mut self, namespace: u32, value: &str) -> Result<u32> {
        let Interner {
            table,
            spans,
            text,
            hasher,
        } = self;
        let bytes = value.as_bytes();
        let full = hasher.hash_one((namespace, bytes));
        let tag = (full ^ (full >> 32)) as u32;
        let entry = table.entry(
            Slot::hash(tag),
            |slot| {
                slot.tag == tag && {
                    let span = spans.get(slot.id);
                    span.namespace == namespace && Self::bytes_of(text, span) == bytes
                }
            },
            |slot| Slot::hash(slot.tag),
        );
        match entry {
            Entry::Occupied(found) => Ok(found.get().id),
            Entry::Vacant(vacant) => {
                let id = u32::try_from(spans.len())
                    .ok()
                    .filter(|&id| id != NONE)
                    .ok_or_else(|| too_many("distinct keys"))?;
                let room = text
                    .last()
                    .is_some_and(|chunk| chunk.capacity() - chunk.len() >= bytes.len());
                if !room {
                    text.push(Vec::with_capacity(TEXT_CHUNK.max(bytes.len())));
                }
                let chunk_index = text.len() - 1;
                let chunk = &mut text[chunk_index];
                let span = Span {
                    namespace,
                    chunk: u32::try_from(chunk_index).map_err(|_| too_many("text chunks"))?,
                    start: u32::try_from(chunk.len()).map_err(|_| too_many("text bytes"))?,
                    len: u32::try_from(bytes.len()).map_err(|_| too_many("key length"))?,
                };
                chunk.extend_from_slice(bytes);
                spans.push(span);
                vacant.insert(Slot { id, tag });
                Ok(id)
            }
        }
    }

    /// [`Interner::intern`] in namespace 0 for a value that usually equals the previous
    /// row's (partition columns, file names): `last` remembers it.
    fn intern_repeated<'a>(
        &mut self,
        last: &mut Option<(&'a str, u32)>,
        value: &'a str,
    ) -> Result<u32> {
        if let Some((text, id)) = *last
            && text == value
        {
            return Ok(id);
        }
        let id = self.intern(0, value)?;
        *last = Some((value, id));
        Ok(id)
    }

    fn bytes(&self, id: u32) -> &[u8] {
        Self::bytes_of(&self.text, self.spans.get(id))
    }

    fn text(&self, id: u32) -> String {
        String::from_utf8_lossy(self.bytes(id)).into_owned()
    }

    fn is_empty_text(&self, id: u32) -> bool {
        id != NONE && self.spans.get(id).len == 0
    }
}

fn too_many(what: &str) -> Error {
    Error::Arrow {
        context: "computing merchant_daily".to_owned(),
        source: ArrowError::ComputeError(format!("more {what} than one pass can number")),
    }
}

/// No `payer_ref` (NULL).
const NO_PAYER: u64 = u64::MAX;

/// The payer key of a `payer_ref` ([`streetflow_core::payer_key`]), never [`NO_PAYER`].
fn payer_key(payer_ref: &str) -> u64 {
    let key = streetflow_core::payer_key(payer_ref) as u64;
    if key == NO_PAYER { key - 1 } else { key }
}

/// Knowledge time of a flag that never turns on (`*_from` fields of [`Event`]).
const NEVER: i64 = i64::MAX;

/// The instant "everything the builder was given is known": the latest rows, as
/// `merchant_daily` holds them. Below [`NEVER`], so `from <= LATEST` reads "ever".
pub(crate) const LATEST: i64 = i64::MAX - 1;

/// What an event kind means to the daily rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sale,
    Refund,
    Void,
    /// Any other spelling: a claim (it is not a sale) that counts nowhere.
    Other,
}

/// A few distinct labels (kinds, channels) numbered in the order first seen.
struct Labels<T> {
    names: Vec<String>,
    meanings: Vec<T>,
}

impl<T: Copy> Labels<T> {
    fn new() -> Self {
        Labels {
            names: Vec::new(),
            meanings: Vec::new(),
        }
    }

    fn id(&mut self, name: &str, meaning: impl FnOnce(&str) -> T) -> Result<u16> {
        if let Some(found) = self.names.iter().position(|known| known == name) {
            return Ok(found as u16);
        }
        let id = u16::try_from(self.names.len()).map_err(|_| too_many("labels"))?;
        self.meanings.push(meaning(name));
        self.names.push(name.to_owned());
        Ok(id)
    }

    fn meaning(&self, id: u16) -> T {
        self.meanings[id as usize]
    }
}

/// When a delivery arrived: `repeated.sql`'s order (earliest `knowledge_time`, then Kafka
/// partition and offset, then file and line; NULLs last).
#[derive(Clone, Copy)]
struct Arrival {
    knowledge_time: i64,
    kafka_offset: i64,
    source_line: i64,
    kafka_partition: i32,
    /// Interned `source_file`, or [`NONE`].
    source_file: u32,
}

/// One event key: its first arrival's content, and what its deliveries and the other
/// events say about it.
#[derive(Clone, Copy)]
struct Event {
    arrival: Arrival,
    amount_fen: i64,
    occurred_at: i64,
    business_date: i32,
    merchant: u32,
    terminal: u32,
    /// `payer_ref` as its payer key ([`payer_key`]), or [`NO_PAYER`].
    payer: u64,
    /// The key `ref_event_id` names, or [`NONE`].
    reference: u32,
    /// Interned `payer_ref` when the builder sums payers and this delivery's business
    /// date is in the payer window, else [`NONE`].
    payer_text: u32,
    /// Deliveries seen; 0 for a key that is only named by a refund or void.
    deliveries: u32,
    local_minute_of_day: u16,
    kind: u16,
    channel: u16,
    /// From when a later delivery that differs from the first is known ([`NEVER`]).
    conflict_from: i64,
    /// A sale: from when a void naming it is known ([`NEVER`]).
    voided_from: i64,
    /// A refund or void: from when the sale it names is known ([`NEVER`]: an orphan for
    /// good). Before that instant it is an orphan.
    answered_from: i64,
}

impl Event {
    const UNSEEN: Event = Event {
        arrival: Arrival {
            knowledge_time: 0,
            kafka_offset: 0,
            source_line: 0,
            kafka_partition: 0,
            source_file: NONE,
        },
        amount_fen: 0,
        occurred_at: 0,
        business_date: 0,
        merchant: NONE,
        terminal: NONE,
        payer: NO_PAYER,
        reference: NONE,
        payer_text: NONE,
        deliveries: 0,
        local_minute_of_day: 0,
        kind: 0,
        channel: 0,
        conflict_from: NEVER,
        voided_from: NEVER,
        answered_from: NEVER,
    };

    /// When the lake first knew the event: its first arrival's knowledge time (arrivals
    /// are ordered by knowledge time first).
    fn known(&self) -> i64 {
        self.arrival.knowledge_time
    }
}

/// Per-day sums of one (operator, merchant, business date).
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DayTotals {
    sales_count: i64,
    sales_fen: i64,
    refund_count: i64,
    refund_fen: i64,
    void_count: i64,
    orphan_refund_count: i64,
    orphan_void_count: i64,
    max_ticket_fen: i64,
    first_sale_at: Option<i64>,
    last_sale_at: Option<i64>,
    channel_fen: [i64; 6],
    night_sales_count: i64,
    night_sales_fen: i64,
    round_sales_count: i64,
    round_sales_fen: i64,
    duplicate_deliveries: i64,
    conflicting_events: i64,
    distinct_payers: i64,
    net_fen: i64,
    /// Live sales, refunds, voided sales and orphan voids: a day with none has no row.
    counted: i64,
}

impl DayTotals {
    /// `net_fen = sales_fen − refund_fen`, checked.
    fn settle_net(&mut self) -> Result<()> {
        self.net_fen = self
            .sales_fen
            .checked_sub(self.refund_fen)
            .ok_or_else(|| Error::Arrow {
                context: "computing merchant_daily".to_owned(),
                source: ArrowError::ComputeError("net_fen overflows 64 bits".to_owned()),
            })?;
        Ok(())
    }
}

/// Adds, failing loudly instead of wrapping (money is never allowed to wrap).
fn add(total: &mut i64, value: i64) -> Result<()> {
    *total = total.checked_add(value).ok_or_else(|| Error::Arrow {
        context: "computing merchant_daily".to_owned(),
        source: ArrowError::ComputeError("a daily sum overflows 64 bits".to_owned()),
    })?;
    Ok(())
}

/// Business dates (days since 1970-01-01, as in `Date32`) from `from` up to but not
/// including `until`, whose live sales are also summed per payer (`payer_sales.sql`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayerWindow {
    /// First business date in the window.
    pub from: i32,
    /// First business date after the window.
    pub until: i32,
}

impl PayerWindow {
    fn contains(&self, business_date: i32) -> bool {
        (self.from..self.until).contains(&business_date)
    }
}

/// The columns of the `payer_sales` relation (`payer_sales.sql`).
pub fn payer_sales_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("operator_id", DataType::Utf8, false),
        Field::new("merchant_id", DataType::Utf8, false),
        Field::new("payer_ref", DataType::Utf8, false),
        Field::new("visits", DataType::Int64, false),
        Field::new("fen", DataType::Int64, false),
    ]))
}

/// Live sales and their sum per (operator, merchant, payer).
type PayerTotals = HashMap<(u32, u32, u32), (i64, i64), FixedState>;

/// Builds `merchant_daily` rows from bronze batches pushed in any order.
pub struct DailyBuilder {
    operators: Interner,
    keys: Interner,
    merchants: Interner,
    terminals: Interner,
    /// Every delivery of the keys delivered more than once (POS retries, replays), by
    /// key: the first arrival, and when each later one became known, are decided once
    /// all are in (a delivery pushed later may have arrived first).
    repeats: HashMap<u32, Vec<Event>, FixedState>,
    /// Payers by their exact text, for the payer window only.
    payer_texts: Interner,
    payer_window: Option<PayerWindow>,
    files: Interner,
    kinds: Labels<Kind>,
    channels: Labels<Option<usize>>,
    events: Chunked<Event>,
    rows: u64,
    /// Whether repeats and claims are resolved: they are once all rows are in.
    settled: bool,
}

impl Default for DailyBuilder {
    fn default() -> Self {
        Self::new()
    }
}

/// A string column as `Utf8` or `Utf8View` (what scans give), cast from any other
/// string or dictionary type.
pub(crate) fn strings(batch: &RecordBatch, name: &str) -> Result<ArrayRef> {
    let column = column(batch, name)?;
    if matches!(column.data_type(), DataType::Utf8 | DataType::Utf8View) {
        return Ok(column.clone());
    }
    cast(column, &DataType::Utf8).map_err(|source| Error::Arrow {
        context: format!("reading bronze column {name}"),
        source,
    })
}

/// A column cast to `to` when it has another type.
pub(crate) fn typed(batch: &RecordBatch, name: &str, to: &DataType) -> Result<ArrayRef> {
    let column = column(batch, name)?;
    if column.data_type() == to {
        return Ok(column.clone());
    }
    cast(column, to).map_err(|source| Error::Arrow {
        context: format!("reading bronze column {name}"),
        source,
    })
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef> {
    batch.column_by_name(name).ok_or_else(|| Error::Arrow {
        context: "reading bronze rows".to_owned(),
        source: ArrowError::SchemaError(format!("no column {name}")),
    })
}

fn no_nulls(array: &ArrayRef, name: &str) -> Result<()> {
    if array.null_count() > 0 {
        return Err(Error::Arrow {
            context: "reading bronze rows".to_owned(),
            source: ArrowError::InvalidArgumentError(format!(
                "{name} is NULL in a bronze row; the pos_events contract requires it"
            )),
        });
    }
    Ok(())
}

/// Read access to a [`strings`] column without copying it.
#[derive(Clone, Copy)]
pub(crate) enum Strs<'a> {
    Plain(&'a StringArray),
    View(&'a StringViewArray),
}

impl<'a> Strs<'a> {
    pub(crate) fn of(array: &'a ArrayRef) -> Self {
        match array.as_string_view_opt() {
            Some(view) => Strs::View(view),
            None => Strs::Plain(array.as_string::<i32>()),
        }
    }

    pub(crate) fn value(self, row: usize) -> &'a str {
        match self {
            Strs::Plain(array) => array.value(row),
            Strs::View(array) => array.value(row),
        }
    }

    fn is_null(self, row: usize) -> bool {
        match self {
            Strs::Plain(array) => array.is_null(row),
            Strs::View(array) => array.is_null(row),
        }
    }
}

/// A nullable value in `repeated.sql`'s arrival order, where NULL sorts after every
/// value: `last` stands for it.
fn nulls_last<T: ArrowPrimitiveType>(
    array: &PrimitiveArray<T>,
    row: usize,
    last: T::Native,
) -> T::Native {
    if array.is_null(row) {
        last
    } else {
        array.value(row)
    }
}

/// An optional interned string.
fn intern_optional(
    interner: &mut Interner,
    namespace: u32,
    array: Strs<'_>,
    row: usize,
) -> Result<u32> {
    if array.is_null(row) {
        Ok(NONE)
    } else {
        interner.intern(namespace, array.value(row))
    }
}

impl DailyBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        DailyBuilder {
            operators: Interner::new(),
            keys: Interner::new(),
            merchants: Interner::new(),
            terminals: Interner::new(),
            repeats: HashMap::with_hasher(FixedState::with_seed(3)),
            payer_texts: Interner::new(),
            payer_window: None,
            files: Interner::new(),
            kinds: Labels::new(),
            channels: Labels::new(),
            events: Chunked::new(),
            rows: 0,
            settled: false,
        }
    }

    /// An empty builder that also sums the live sales of `window` per payer, for
    /// [`DailyBuilder::finish_with_payer_sales`].
    pub fn with_payer_window(window: PayerWindow) -> Self {
        DailyBuilder {
            payer_window: Some(window),
            ..Self::new()
        }
    }

    /// Bronze rows pushed so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The event slot of `(operator, event_id)`, created unseen when new.
    fn key(&mut self, operator: u32, event_id: &str) -> Result<u32> {
        let id = self.keys.intern(operator, event_id)?;
        if id as usize == self.events.len() {
            self.events.push(Event::UNSEEN);
        }
        Ok(id)
    }

    /// Adds bronze rows (any column order; extra columns are ignored).
    pub fn push(&mut self, batch: &RecordBatch) -> Result<()> {
        let micros = DataType::Timestamp(TimeUnit::Microsecond, None);
        let operator_id = strings(batch, "operator_id")?;
        let business_date = typed(batch, "business_date", &DataType::Date32)?;
        let event_id = strings(batch, "event_id")?;
        let merchant_id = strings(batch, "merchant_id")?;
        let terminal_id = strings(batch, "terminal_id")?;
        let kind = strings(batch, "kind")?;
        let amount_fen = typed(batch, "amount_fen", &DataType::Int64)?;
        let occurred_at = timestamps(batch, "occurred_at", &micros)?;
        let local_minute = typed(batch, "local_minute_of_day", &DataType::Int32)?;
        let channel = strings(batch, "channel")?;
        let ref_event_id = strings(batch, "ref_event_id")?;
        let payer_ref = strings(batch, "payer_ref")?;
        let knowledge_time = timestamps(batch, "knowledge_time", &micros)?;
        let kafka_partition = typed(batch, "kafka_partition", &DataType::Int32)?;
        let kafka_offset = typed(batch, "kafka_offset", &DataType::Int64)?;
        let source_file = strings(batch, "source_file")?;
        let source_line = typed(batch, "source_line", &DataType::Int64)?;
        for (array, name) in [
            (&operator_id, "operator_id"),
            (&business_date, "business_date"),
            (&event_id, "event_id"),
            (&merchant_id, "merchant_id"),
            (&kind, "kind"),
            (&amount_fen, "amount_fen"),
            (&occurred_at, "occurred_at"),
            (&local_minute, "local_minute_of_day"),
            (&channel, "channel"),
        ] {
            no_nulls(array, name)?;
        }

        let operator_id = Strs::of(&operator_id);
        let business_date = business_date.as_primitive::<Date32Type>();
        let event_id = Strs::of(&event_id);
        let merchant_id = Strs::of(&merchant_id);
        let terminal_id = Strs::of(&terminal_id);
        let kind = Strs::of(&kind);
        let amount_fen = amount_fen.as_primitive::<Int64Type>();
        let occurred_at = occurred_at.as_primitive::<TimestampMicrosecondType>();
        let local_minute = local_minute.as_primitive::<Int32Type>();
        let channel = Strs::of(&channel);
        let ref_event_id = Strs::of(&ref_event_id);
        let payer_ref = Strs::of(&payer_ref);
        let knowledge_time = knowledge_time.as_primitive::<TimestampMicrosecondType>();
        let kafka_partition = kafka_partition.as_primitive::<Int32Type>();
        let kafka_offset = kafka_offset.as_primitive::<Int64Type>();
        let source_file = Strs::of(&source_file);
        let source_line = source_line.as_primitive::<Int64Type>();

        // Partition columns and file names repeat row after row: look them up once per run.
        let mut last_operator: Option<(&str, u32)> = None;
        let mut last_file: Option<(&str, u32)> = None;
        for row in 0..batch.num_rows() {
            let operator = self
                .operators
                .intern_repeated(&mut last_operator, operator_id.value(row))?;
            let file = if source_file.is_null(row) {
                NONE
            } else {
                self.files
                    .intern_repeated(&mut last_file, source_file.value(row))?
            };
            let reference = if ref_event_id.is_null(row) {
                NONE
            } else {
                self.key(operator, ref_event_id.value(row))?
            };
            let minute = local_minute.value(row);
            let date = business_date.value(row);
            let payer_text = match self.payer_window {
                Some(window) if window.contains(date) && !payer_ref.is_null(row) => {
                    self.payer_texts.intern(0, payer_ref.value(row))?
                }
                _ => NONE,
            };
            let delivery = Event {
                arrival: Arrival {
                    knowledge_time: nulls_last(knowledge_time, row, i64::MAX),
                    kafka_partition: nulls_last(kafka_partition, row, i32::MAX),
                    kafka_offset: nulls_last(kafka_offset, row, i64::MAX),
                    source_file: file,
                    source_line: nulls_last(source_line, row, i64::MAX),
                },
                amount_fen: amount_fen.value(row),
                occurred_at: occurred_at.value(row),
                business_date: date,
                merchant: self.merchants.intern(0, merchant_id.value(row))?,
                terminal: intern_optional(&mut self.terminals, 0, terminal_id, row)?,
                payer: if payer_ref.is_null(row) {
                    NO_PAYER
                } else {
                    payer_key(payer_ref.value(row))
                },
                reference,
                payer_text,
                deliveries: 1,
                local_minute_of_day: u16::try_from(minute).map_err(|_| Error::Arrow {
                    context: "reading bronze rows".to_owned(),
                    source: ArrowError::InvalidArgumentError(format!(
                        "local_minute_of_day {minute} is outside a day"
                    )),
                })?,
                kind: self.kinds.id(kind.value(row), |name| match name {
                    "sale" => Kind::Sale,
                    "refund" => Kind::Refund,
                    "void" => Kind::Void,
                    _ => Kind::Other,
                })?,
                channel: self.channels.id(channel.value(row), |name| {
                    Channel::ALL.iter().position(|c| c.as_str() == name)
                })?,
                conflict_from: NEVER,
                voided_from: NEVER,
                answered_from: NEVER,
            };
            let key = self.key(operator, event_id.value(row))?;
            let known = *self.events.get(key);
            if known.deliveries == 0 {
                *self.events.get_mut(key) = delivery;
            } else {
                // Kept whole until finish, which decides the first arrival.
                let deliveries = self.repeats.entry(key).or_insert_with(|| vec![known]);
                deliveries.push(delivery);
                self.events.get_mut(key).deliveries = known.deliveries.saturating_add(1);
            }
            self.rows += 1;
        }
        Ok(())
    }

    /// Whether two optional interned strings are equal once NULL reads as `''`, as
    /// `repeated.sql`'s `coalesce(…, '')` compares them.
    fn same_or_empty(interner: &Interner, a: u32, b: u32) -> bool {
        a == b
            || (a == NONE && interner.is_empty_text(b))
            || (b == NONE && interner.is_empty_text(a))
    }

    /// `repeated.sql`'s content comparison: merchant, kind, amount, time, channel,
    /// reference, payer and terminal.
    fn same_content_in(keys: &Interner, terminals: &Interner, a: &Event, b: &Event) -> bool {
        a.merchant == b.merchant
            && a.kind == b.kind
            && a.amount_fen == b.amount_fen
            && a.occurred_at == b.occurred_at
            && a.channel == b.channel
            && Self::same_or_empty(keys, a.reference, b.reference)
            && (a.payer == b.payer
                || (a.payer == NO_PAYER && b.payer == payer_key(""))
                || (b.payer == NO_PAYER && a.payer == payer_key("")))
            && Self::same_or_empty(terminals, a.terminal, b.terminal)
    }

    /// `repeated.sql`'s arrival order of two deliveries: earliest knowledge time, then
    /// Kafka partition and offset, then file and line (NULLs last).
    fn arrival_order(files: &Interner, a: &Arrival, b: &Arrival) -> Ordering {
        let file = match (a.source_file, b.source_file) {
            (x, y) if x == y => Ordering::Equal,
            (NONE, _) => Ordering::Greater,
            (_, NONE) => Ordering::Less,
            (x, y) => files.bytes(x).cmp(files.bytes(y)),
        };
        a.knowledge_time
            .cmp(&b.knowledge_time)
            .then(a.kafka_partition.cmp(&b.kafka_partition))
            .then(a.kafka_offset.cmp(&b.kafka_offset))
            .then(file)
            .then(a.source_line.cmp(&b.source_line))
    }

    /// Resolves repeats and claims once every row is in (again: nothing to do).
    pub(crate) fn settle(&mut self) {
        if !self.settled {
            self.settle_repeats();
            self.resolve_claims();
            self.settled = true;
        }
    }

    /// Decides each repeated key's first arrival (`repeated.sql`'s order), and when a
    /// delivery that differs from it became known. The event keeps the first arrival's
    /// content; its later deliveries' knowledge times stay in `repeats`, sorted.
    fn settle_repeats(&mut self) {
        for (&key, deliveries) in &mut self.repeats {
            let Some(first_index) = (0..deliveries.len()).reduce(|best, i| {
                if Self::arrival_order(
                    &self.files,
                    &deliveries[i].arrival,
                    &deliveries[best].arrival,
                ) == Ordering::Less
                {
                    i
                } else {
                    best
                }
            }) else {
                continue;
            };
            let first = deliveries.swap_remove(first_index);
            let conflict_from = deliveries
                .iter()
                .filter(|later| !Self::same_content_in(&self.keys, &self.terminals, &first, later))
                .map(Event::known)
                .min()
                .unwrap_or(NEVER);
            deliveries.sort_unstable_by_key(Event::known);
            let slot = self.events.get_mut(key);
            *slot = Event {
                deliveries: slot.deliveries,
                conflict_from,
                ..first
            };
        }
    }

    /// Later deliveries of `index` known by `t` (`duplicate_deliveries` at `t`).
    fn extra_deliveries_at(&self, index: u32, event: &Event, t: i64) -> i64 {
        if event.deliveries <= 1 || t >= LATEST {
            return i64::from(event.deliveries.saturating_sub(1));
        }
        self.repeats
            .get(&index)
            .map_or(0, |later| later.partition_point(|d| d.known() <= t) as i64)
    }

    /// Resolves refunds and voids against the sales they name (`links.sql`), in time: a
    /// sale is voided from when the first matching void naming it is known, and a refund
    /// or void is an orphan until the sale it names is known (for good when that sale is
    /// another merchant's, or a void's amount differs from it).
    fn resolve_claims(&mut self) {
        for index in 0..self.events.len() as u32 {
            let claim = *self.events.get(index);
            if claim.deliveries == 0 {
                continue;
            }
            let kind = self.kinds.meaning(claim.kind);
            if kind == Kind::Sale {
                continue;
            }
            // The named sale must be the same merchant's, and a void's amount the
            // sale's (links.sql): otherwise the claim is an orphan for good.
            let matches = claim.reference != NONE && {
                let named = self.events.get(claim.reference);
                named.deliveries > 0
                    && self.kinds.meaning(named.kind) == Kind::Sale
                    && named.merchant == claim.merchant
                    && (kind != Kind::Void || named.amount_fen == claim.amount_fen)
            };
            if !matches {
                self.events.get_mut(index).answered_from = NEVER;
                continue;
            }
            let answered_from = self.events.get(claim.reference).known();
            self.events.get_mut(index).answered_from = answered_from;
            if kind == Kind::Void {
                let named = self.events.get_mut(claim.reference);
                named.voided_from = named.voided_from.min(claim.known());
            }
        }
    }

    /// Adds what one event says about its (operator, merchant, date) row as the lake knew
    /// it at `t` (the event must be known by then); a live sale with a payer is also
    /// handed to `live_payer` (payer key, amount).
    fn contribute(
        &self,
        index: u32,
        event: &Event,
        t: i64,
        day: &mut DayTotals,
        mut live_payer: impl FnMut(u64, i64) -> Result<()>,
    ) -> Result<()> {
        let kind = self.kinds.meaning(event.kind);
        let voided = event.voided_from <= t;
        let orphan = t < event.answered_from;
        let live = kind == Kind::Sale && !voided;
        let voided_sale = kind == Kind::Sale && voided;
        let refund = kind == Kind::Refund;
        let orphan_void = kind == Kind::Void && orphan;
        let amount = event.amount_fen;
        let minute = event.local_minute_of_day;
        // 22:00–05:59 local wall time.
        let night = !(360..1320).contains(&minute);
        let round = amount % 10_000 == 0;
        add(
            &mut day.duplicate_deliveries,
            self.extra_deliveries_at(index, event, t),
        )?;
        if event.conflict_from <= t {
            day.conflicting_events += 1;
        }
        if live {
            day.counted += 1;
            day.sales_count += 1;
            add(&mut day.sales_fen, amount)?;
            day.max_ticket_fen = if day.sales_count == 1 {
                amount
            } else {
                day.max_ticket_fen.max(amount)
            };
            let at = event.occurred_at;
            day.first_sale_at = Some(day.first_sale_at.map_or(at, |f| f.min(at)));
            day.last_sale_at = Some(day.last_sale_at.map_or(at, |l| l.max(at)));
            if let Some(channel) = self.channels.meaning(event.channel) {
                add(&mut day.channel_fen[channel], amount)?;
            }
            if night {
                day.night_sales_count += 1;
                add(&mut day.night_sales_fen, amount)?;
            }
            if round {
                day.round_sales_count += 1;
                add(&mut day.round_sales_fen, amount)?;
            }
            if event.payer != NO_PAYER {
                live_payer(event.payer, amount)?;
            }
        }
        if refund {
            day.counted += 1;
            day.refund_count += 1;
            add(&mut day.refund_fen, amount)?;
            if orphan {
                day.orphan_refund_count += 1;
            }
        }
        if voided_sale {
            day.counted += 1;
            day.void_count += 1;
        }
        if orphan_void {
            day.counted += 1;
            day.orphan_void_count += 1;
        }
        Ok(())
    }

    /// The daily rows of every (operator, business date) `keep` accepts, sorted by
    /// operator, date and merchant, in the exact `merchant_daily` schema.
    pub fn finish(self, keep: impl Fn(&str, i32) -> bool) -> Result<Vec<RecordBatch>> {
        Ok(self.finish_with_payer_sales(keep)?.0)
    }

    /// [`DailyBuilder::finish`]'s daily rows, and the `payer_sales` rows
    /// ([`payer_sales_schema`]) of the payer window: every payer's live sales per
    /// merchant, as `payer_sales.sql` computes them (none without a payer window).
    pub fn finish_with_payer_sales(
        mut self,
        keep: impl Fn(&str, i32) -> bool,
    ) -> Result<(Vec<RecordBatch>, Vec<RecordBatch>)> {
        self.settle();
        let mut payer_totals: PayerTotals = HashMap::with_hasher(FixedState::with_seed(11));
        let mut groups: HashMap<(u32, u32, i32), u32, FixedState> =
            HashMap::with_hasher(FixedState::with_seed(7));
        let mut group_keys: Vec<(u32, u32, i32)> = Vec::new();
        let mut totals: Vec<DayTotals> = Vec::new();
        // (group, payer key) of every live sale with a payer, for the distinct count (one
        // integer sorts fastest).
        let mut day_payers: Vec<u128> = Vec::new();
        let operator_of = |keys: &Interner, index: u32| keys.spans.get(index).namespace;

        for index in 0..self.events.len() as u32 {
            let event = *self.events.get(index);
            if event.deliveries == 0 {
                continue;
            }
            let operator = operator_of(&self.keys, index);
            let group_key = (operator, event.merchant, event.business_date);
            let group = *groups.entry(group_key).or_insert_with(|| {
                group_keys.push(group_key);
                totals.push(DayTotals::default());
                (totals.len() - 1) as u32
            });
            let day = &mut totals[group as usize];
            self.contribute(index, &event, LATEST, day, |payer, amount| {
                if event.payer_text != NONE {
                    let totals = payer_totals
                        .entry((operator, event.merchant, event.payer_text))
                        .or_default();
                    totals.0 += 1;
                    add(&mut totals.1, amount)?;
                }
                day_payers.push((u128::from(group) << 64) | u128::from(payer));
                Ok(())
            })?;
        }
        // Free the event table before building the output.
        drop(std::mem::replace(&mut self.events, Chunked::new()));
        day_payers.sort_unstable();
        day_payers.dedup();
        for pair in &day_payers {
            totals[(pair >> 64) as usize].distinct_payers += 1;
        }
        drop(day_payers);
        for day in &mut totals {
            day.settle_net()?;
        }

        let operator_names: Vec<String> = (0..self.operators.len() as u32)
            .map(|id| self.operators.text(id))
            .collect();
        let mut kept: Vec<(usize, String)> = group_keys
            .iter()
            .enumerate()
            .filter(|(group, (operator, _, date))| {
                totals[*group].counted > 0 && keep(&operator_names[*operator as usize], *date)
            })
            .map(|(group, (_, merchant, _))| (group, self.merchants.text(*merchant)))
            .collect();
        kept.sort_unstable_by(|(a, a_merchant), (b, b_merchant)| {
            let (a_operator, _, a_date) = group_keys[*a];
            let (b_operator, _, b_date) = group_keys[*b];
            operator_names[a_operator as usize]
                .cmp(&operator_names[b_operator as usize])
                .then(a_date.cmp(&b_date))
                .then(a_merchant.cmp(b_merchant))
        });
        let payer_sales = self.payer_sales_batches(&operator_names, payer_totals)?;
        let daily = kept
            .chunks(OUTPUT_BATCH_ROWS)
            .map(|rows| {
                output_batch(
                    rows.iter().map(|(group, merchant)| {
                        let (operator, _, date) = group_keys[*group];
                        (
                            operator_names[operator as usize].as_str(),
                            date,
                            merchant.as_str(),
                            &totals[*group],
                        )
                    }),
                    rows.len(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((daily, payer_sales))
    }

    /// The `payer_sales` rows of `totals`.
    fn payer_sales_batches(
        &self,
        operator_names: &[String],
        totals: PayerTotals,
    ) -> Result<Vec<RecordBatch>> {
        let rows: Vec<_> = totals.into_iter().collect();
        rows.chunks(OUTPUT_BATCH_ROWS)
            .map(|chunk| {
                let columns: Vec<ArrayRef> = vec![
                    Arc::new(StringArray::from_iter_values(chunk.iter().map(
                        |((operator, _, _), _)| operator_names[*operator as usize].as_str(),
                    ))),
                    Arc::new(StringArray::from_iter_values(
                        chunk
                            .iter()
                            .map(|((_, merchant, _), _)| self.merchants.text(*merchant)),
                    )),
                    Arc::new(StringArray::from_iter_values(
                        chunk
                            .iter()
                            .map(|((_, _, payer), _)| self.payer_texts.text(*payer)),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        chunk.iter().map(|(_, (visits, _))| *visits),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        chunk.iter().map(|(_, (_, fen))| *fen),
                    )),
                ];
                RecordBatch::try_new(payer_sales_schema(), columns).map_err(|source| Error::Arrow {
                    context: "building payer_sales rows".to_owned(),
                    source,
                })
            })
            .collect()
    }
}

/// A timestamp column as microsecond values (the time zone does not change them).
fn timestamps(batch: &RecordBatch, name: &str, micros: &DataType) -> Result<ArrayRef> {
    let column = column(batch, name)?;
    match column.data_type() {
        DataType::Timestamp(TimeUnit::Microsecond, _) => Ok(column.clone()),
        _ => cast(column, micros).map_err(|source| Error::Arrow {
            context: format!("reading bronze column {name}"),
            source,
        }),
    }
}

/// The measure columns of `merchant_daily` (every column after the key), one value per
/// day of `days`.
fn measure_columns<'a>(days: impl Iterator<Item = &'a DayTotals> + Clone) -> Vec<ArrayRef> {
    let long = |value: fn(&DayTotals) -> i64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(days.clone().map(value)))
    };
    let utc = |value: fn(&DayTotals) -> Option<i64>| -> ArrayRef {
        Arc::new(TimestampMicrosecondArray::from_iter(days.clone().map(value)).with_timezone("UTC"))
    };
    vec![
        long(|d| d.sales_count),
        long(|d| d.sales_fen),
        long(|d| d.refund_count),
        long(|d| d.refund_fen),
        long(|d| d.void_count),
        long(|d| d.net_fen),
        long(|d| d.orphan_refund_count),
        long(|d| d.orphan_void_count),
        long(|d| d.distinct_payers),
        long(|d| d.max_ticket_fen),
        utc(|d| d.first_sale_at),
        utc(|d| d.last_sale_at),
        long(|d| d.channel_fen[0]),
        long(|d| d.channel_fen[1]),
        long(|d| d.channel_fen[2]),
        long(|d| d.channel_fen[3]),
        long(|d| d.channel_fen[4]),
        long(|d| d.channel_fen[5]),
        long(|d| d.night_sales_count),
        long(|d| d.night_sales_fen),
        long(|d| d.round_sales_count),
        long(|d| d.round_sales_fen),
        long(|d| d.duplicate_deliveries),
        long(|d| d.conflicting_events),
    ]
}

/// One `merchant_daily` batch from (operator, date, merchant, totals) rows.
fn output_batch<'a>(
    rows: impl Iterator<Item = (&'a str, i32, &'a str, &'a DayTotals)> + Clone,
    len: usize,
) -> Result<RecordBatch> {
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(MERCHANT_DAILY.schema.fields().len());
    columns.push(Arc::new(StringArray::from_iter_values(
        rows.clone().map(|(operator, _, _, _)| operator),
    )));
    columns.push(Arc::new(Date32Array::from_iter_values(
        rows.clone().map(|(_, date, _, _)| date),
    )));
    columns.push(Arc::new(StringArray::from_iter_values(
        rows.clone().map(|(_, _, merchant, _)| merchant),
    )));
    columns.extend(measure_columns(rows.clone().map(|(_, _, _, day)| day)));
    columns.push(Arc::new(Date32Array::from_iter_values(
        rows.map(|(_, date, _, _)| streetflow_core::tables::month_of(date)),
    )));
    debug_assert_eq!(columns.len(), MERCHANT_DAILY.schema.fields().len());
    debug_assert!(columns.iter().all(|c| c.len() == len));
    RecordBatch::try_new(MERCHANT_DAILY.schema.clone(), columns).map_err(|source| Error::Arrow {
        context: "building merchant_daily rows".to_owned(),
        source,
    })
}

#[cfg(test)]
#[path = "daily_tests.rs"]
pub(crate) mod tests;
