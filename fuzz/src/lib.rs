//! Fuzzing of the parsers that read untrusted input: each `check_*` function feeds one
//! input to a parser and asserts the contract's promise for it (no panic, and every input
//! is accepted, or rejected with a stable reason and an explanation). The same checks
//! run under AFL++ (`src/bin/afl_*.rs`), under [`Mutator`]'s structured mutation on
//! stable Rust (`streetflow-fuzz` tests and credit's policy test, which turns on the
//! `policy` feature for [`check_policy`]), and over the corpus
//! in `fuzz/corpus` in every `cargo test`.

#![deny(unsafe_code)]
#![warn(missing_docs)]

use std::io::Read;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use rand::{Rng, RngCore, SeedableRng};
use rand_pcg::Pcg64Mcg;
use streetflow_core::card::{contains_card_number, is_card_number};
use streetflow_core::csv_mapping::{CsvMapping, row_as_csv};
use streetflow_core::money::MAX_EVENT_AMOUNT_FEN;
use streetflow_core::{DecodeOptions, EventKind, ReasonCode, decode};

#[cfg(feature = "policy")]
mod policy;
#[cfg(feature = "policy")]
pub use policy::{check_policy, policy_runtime};

/// The receiving worker's clock for every check: fixed, so a run is reproducible.
pub fn received_at() -> DateTime<Utc> {
    DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default()
}

/// What became of one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted as an event.
    Accepted,
    /// Rejected with this reason code.
    Rejected(ReasonCode),
}

/// Decodes `data` as one Kafka message and checks the decoder's promises; panics when
/// one is broken (which is what a fuzzer reports).
pub fn check_decode(data: &[u8]) -> Verdict {
    let options = DecodeOptions::default();
    let first = decode(data, received_at(), &options);
    let again = decode(data, received_at(), &options);
    assert_eq!(first, again, "decoding is not deterministic");
    match first {
        Ok(event) => {
            for (name, value, may_be_empty) in [
                ("event_id", Some(&event.event_id), false),
                ("operator_id", Some(&event.operator_id), false),
                ("merchant_id", Some(&event.merchant_id), false),
                ("terminal_id", event.terminal_id.as_ref(), true),
                ("ref_event_id", event.ref_event_id.as_ref(), false),
                ("payer_ref", event.payer_ref.as_ref(), true),
            ] {
                if let Some(value) = value {
                    // The contract's rule: 1 character or more (a blank one is allowed).
                    assert!(
                        may_be_empty || !value.is_empty(),
                        "accepted an empty {name}"
                    );
                    // The contract's rule: no identifier that is a card number, and
                    // no card number anywhere in payer_ref (identifiers may contain long
                    // digit runs: serial numbers, dates).
                    let leaked = if name == "payer_ref" {
                        contains_card_number(value)
                    } else {
                        is_card_number(value)
                    };
                    assert!(!leaked, "accepted a card number in {name}: {value}");
                }
            }
            assert!(
                (1..=MAX_EVENT_AMOUNT_FEN).contains(&event.amount_fen),
                "accepted amount_fen {}",
                event.amount_fen
            );
            let at = event.occurred_at.with_timezone(&Utc);
            assert!(
                at >= options.earliest_occurred_at,
                "accepted occurred_at {at} before the earliest"
            );
            assert!(
                at <= received_at() + options.max_future_skew,
                "accepted occurred_at {at} in the future"
            );
            match event.kind {
                EventKind::Sale => assert!(
                    event.ref_event_id.is_none(),
                    "accepted a sale with ref_event_id"
                ),
                EventKind::Refund | EventKind::Void => assert!(
                    event.ref_event_id.is_some(),
                    "accepted a {:?} without ref_event_id",
                    event.kind
                ),
            }
            Verdict::Accepted
        }
        Err(rejection) => {
            assert!(
                !rejection.detail.trim().is_empty(),
                "rejected as {} without an explanation",
                rejection.reason
            );
            assert_eq!(
                ReasonCode::parse(rejection.reason.as_str()),
                Some(rejection.reason),
                "reason {} does not parse back",
                rejection.reason
            );
            assert!(
                !contains_card_number(&rejection.detail),
                "a rejection's explanation repeats a card number: {}",
                rejection.detail
            );
            Verdict::Rejected(rejection.reason)
        }
    }
}

/// Splits a CSV-mapping input: the mapping file's TOML, a line `---`, the export.
pub fn split_csv_input(data: &[u8]) -> (&[u8], &[u8]) {
    let marker = b"\n---\n";
    match data.windows(marker.len()).position(|w| w == marker) {
        Some(at) => (&data[..at], &data[at + marker.len()..]),
        None => (data, &[]),
    }
}

/// Most rows one input converts (an export's size is not what is being fuzzed).
const MAX_ROWS: usize = 64;

/// Parses a mapping file and converts the export below it (see [`split_csv_input`]),
/// checking the mapping's promises: a bad mapping or header gets a message, every row
/// becomes one JSON object that the decoder then accepts or rejects with a reason, and
/// a row's dead-letter payload reads back as the same row. Returns the rows' verdicts,
/// or `None` when the mapping or header was refused.
pub fn check_csv_mapping(data: &[u8]) -> Option<Vec<Verdict>> {
    let (mapping_bytes, export) = split_csv_input(data);
    let text = std::str::from_utf8(mapping_bytes).ok()?;
    let mapping = match CsvMapping::from_toml(text) {
        Ok(mapping) => mapping,
        Err(error) => {
            assert!(
                !error.0.trim().is_empty(),
                "a mapping refused without a message"
            );
            return None;
        }
    };
    let mut reader = mapping.reader_builder().from_reader(export);
    let header = if mapping.header {
        match reader.headers() {
            Ok(header) => Some(header.clone()),
            Err(_) => return None,
        }
    } else {
        None
    };
    let bound = match mapping.bind(header.as_ref()) {
        Ok(bound) => bound,
        Err(error) => {
            assert!(
                !error.0.trim().is_empty(),
                "a header refused without a message"
            );
            return None;
        }
    };
    let delimiter = u8::try_from(mapping.delimiter).unwrap_or(b',');
    let mut verdicts = Vec::new();
    for row in reader.records().take(MAX_ROWS) {
        let Ok(row) = row else {
            // The backfill dead-letters unreadable rows itself (`bad_csv_row`).
            continue;
        };
        let (json, occurred_at) = bound.to_event_json(&row);
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&json)
            .unwrap_or_else(|e| panic!("a row became no JSON object ({e}): {json:?}"));
        assert_eq!(
            object.get("occurred_at").and_then(|v| v.as_str()),
            occurred_at.as_deref(),
            "the stream clock's occurred_at differs from the event's"
        );
        if !row.iter().all(str::is_empty) {
            check_payload_round_trip(&row, delimiter);
        }
        verdicts.push(check_decode(&json));
    }
    Some(verdicts)
}

/// A dead letter's payload is the row as CSV again: read back, it is the same row.
fn check_payload_round_trip(row: &csv::StringRecord, delimiter: u8) {
    let payload = row_as_csv(row, delimiter);
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(false)
        .flexible(true)
        .from_reader(payload.as_slice());
    let back = reader.records().next().and_then(Result::ok);
    assert_eq!(
        back.as_ref(),
        Some(row),
        "the payload {:?} does not read back as its row",
        String::from_utf8_lossy(&payload)
    );
}

/// The corpus files of one target (`decode`, `csv_mapping`, `policy`), sorted.
pub fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
        .into_iter()
        .filter_map(|path| {
            let mut bytes = Vec::new();
            std::fs::File::open(&path)
                .and_then(|mut f| f.read_to_end(&mut bytes))
                .ok()?;
            Some((path, bytes))
        })
        .collect()
}

/// Values that break parsers: limits of the contract and of number types, encodings,
/// card numbers, separators and structure.
const INTERESTING: &[&str] = &[
    "0",
    "-1",
    "1",
    "100000000000",
    "100000000001",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "18446744073709551616",
    "1e3",
    "1.0",
    "0.005",
    "12.345",
    "NaN",
    "inf",
    "\"\"",
    "\" \"",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "\"\\\"\"",
    "null",
    "true",
    "[]",
    "{}",
    "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]",
    "\"4111111111111111\"",
    "\"4111 1111 1111 1111\"",
    "\"4111-1111-1111-1111\"",
    "\"1970-01-01T00:00:00Z\"",
    "\"1999-12-31T23:59:59Z\"",
    "\"9999-12-31T23:59:59+14:00\"",
    "\"2026-02-30T12:00:00+08:00\"",
    "\"2026-03-01T12:00:00+24:00\"",
    "\"2026-03-01 12:00:00\"",
    "\"+262143-12-31T23:59:59Z\"",
    "\"sale\"",
    "\"void\"",
    "\"refund\"",
    "\"CNY\"",
    "\"cny\"",
    "\"wechat\"",
    "\"商户\"",
    "\"\u{202e}evil\"",
    "\"\u{feff}\"",
    ",",
    ";",
    "\t",
    "\n",
    "\r\n",
    "\"",
    "'",
    "\\",
    "---",
    "=",
    "[columns]",
    "[constants]",
    "[values.kind]",
    "SELECT",
    "amount_fen",
    "ref_event_id",
    "operator_id",
];

/// Structured mutation for when no coverage-guided fuzzer is at hand: it starts from
/// corpus inputs and replaces tokens (JSON values, CSV cells, TOML values, SQL words)
/// with [`INTERESTING`] ones, splices inputs together, repeats, deletes and flips bytes.
/// Seeded, so a failure can be replayed from its seed and execution number.
pub struct Mutator {
    rng: Pcg64Mcg,
    seeds: Vec<Vec<u8>>,
}

impl Mutator {
    /// A mutator over `seeds` (at least one).
    pub fn new(seed: u64, seeds: Vec<Vec<u8>>) -> Self {
        Self {
            rng: Pcg64Mcg::seed_from_u64(seed),
            seeds: if seeds.is_empty() {
                vec![Vec::new()]
            } else {
                seeds
            },
        }
    }

    /// The next input: one to four mutations of a seed.
    pub fn next_input(&mut self) -> Vec<u8> {
        let pick = self.rng.random_range(0..self.seeds.len());
        let mut input = self.seeds[pick].clone();
        for _ in 0..self.rng.random_range(1..=4) {
            self.mutate(&mut input);
        }
        input
    }

    fn mutate(&mut self, input: &mut Vec<u8>) {
        let len = input.len();
        match self.rng.random_range(0..10) {
            // Replace the token at a random position with an interesting value.
            0..=3 if len > 0 => {
                let (start, end) = token_around(input, self.rng.random_range(0..len));
                let value = INTERESTING[self.rng.random_range(0..INTERESTING.len())];
                input.splice(start..end, value.bytes());
            }
            // Insert an interesting value.
            4 => {
                let at = self.rng.random_range(0..=len);
                let value = INTERESTING[self.rng.random_range(0..INTERESTING.len())];
                input.splice(at..at, value.bytes());
            }
            // Splice in a piece of another seed.
            5 => {
                let other = &self.seeds[self.rng.random_range(0..self.seeds.len())];
                if !other.is_empty() {
                    let from = self.rng.random_range(0..other.len());
                    let to = self.rng.random_range(from..=other.len());
                    let piece = other[from..to].to_vec();
                    let at = self.rng.random_range(0..=len);
                    input.splice(at..at, piece);
                }
            }
            // Repeat a piece (duplicate keys, long strings, deep nesting).
            6 if len > 0 => {
                let from = self.rng.random_range(0..len);
                let to = self.rng.random_range(from..=len.min(from + 64));
                let piece = input[from..to].to_vec();
                for _ in 0..self.rng.random_range(1..=8) {
                    input.splice(to..to, piece.iter().copied());
                }
            }
            // Delete a range (truncation included).
            7 if len > 0 => {
                let from = self.rng.random_range(0..len);
                let to = self.rng.random_range(from..=len);
                input.drain(from..to);
            }
            // Flip bits, or write a random byte.
            _ if len > 0 => {
                let at = self.rng.random_range(0..len);
                if self.rng.random_bool(0.5) {
                    input[at] ^= 1 << self.rng.random_range(0..8);
                } else {
                    input[at] = (self.rng.next_u32() & 0xff) as u8;
                }
            }
            _ => input.extend_from_slice(b"{}"),
        }
    }
}

/// The token around `at`: a quoted string, or a run of characters that are not
/// structure (`{}[]:,="` and whitespace).
fn token_around(input: &[u8], at: usize) -> (usize, usize) {
    let structure = |b: u8| b"{}[]:,=\n\r\t ".contains(&b);
    if input[at] == b'"' {
        let end = input[at + 1..]
            .iter()
            .position(|&b| b == b'"')
            .map_or(input.len(), |p| at + p + 2);
        return (at, end);
    }
    let mut start = at;
    while start > 0 && !structure(input[start - 1]) {
        start -= 1;
    }
    let mut end = at;
    while end < input.len() && !structure(input[end]) {
        end += 1;
    }
    (start, end)
}

/// The long runs' execution count and seed: `STREETFLOW_FUZZ_EXECUTIONS` (10 M unless
/// set) and `STREETFLOW_FUZZ_SEED` (20261203 unless set).
pub fn long_run_settings() -> (u64, u64) {
    let read = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    (
        read("STREETFLOW_FUZZ_EXECUTIONS", 10_000_000),
        read("STREETFLOW_FUZZ_SEED", 20_261_203),
    )
}

/// Runs `check` over `executions` mutated inputs of `target`'s corpus; returns the
/// executions per second. A panic names the seed and execution to replay.
pub fn run_mutation<T>(
    target: &str,
    seed: u64,
    executions: u64,
    mut check: impl FnMut(&[u8]) -> T,
) -> f64 {
    let seeds = corpus(target).into_iter().map(|(_, bytes)| bytes).collect();
    let mut mutator = Mutator::new(seed, seeds);
    let started = std::time::Instant::now();
    for execution in 0..executions {
        let input = mutator.next_input();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input)));
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!(
                "{target}: seed {seed}, execution {execution}: {message}\ninput: {:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }
    executions as f64 / started.elapsed().as_secs_f64().max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_decode_corpus_input_is_accepted_or_rejected_with_a_reason() {
        let corpus = corpus("decode");
        assert!(corpus.len() >= 10, "the decode corpus is missing");
        let mut accepted = 0;
        for (path, bytes) in &corpus {
            let verdict = std::panic::catch_unwind(|| check_decode(bytes))
                .unwrap_or_else(|_| panic!("{} broke the decoder", path.display()));
            accepted += usize::from(verdict == Verdict::Accepted);
        }
        assert!(
            accepted > 0 && accepted < corpus.len(),
            "the corpus has both kinds"
        );
    }

    #[test]
    fn every_csv_mapping_corpus_input_is_converted_or_refused_with_a_message() {
        let corpus = corpus("csv_mapping");
        assert!(corpus.len() >= 3, "the csv_mapping corpus is missing");
        let mut rows = 0;
        for (path, bytes) in &corpus {
            let verdicts = std::panic::catch_unwind(|| check_csv_mapping(bytes))
                .unwrap_or_else(|_| panic!("{} broke the CSV mapping", path.display()));
            rows += verdicts.map_or(0, |v| v.len());
        }
        assert!(rows > 0, "no corpus export converted a row");
    }

    /// Every `cargo test`: a short structured-mutation run of each target.
    #[test]
    fn short_mutation_runs_find_nothing() {
        run_mutation("decode", 20_261_203, 100_000, check_decode);
        run_mutation("csv_mapping", 20_261_203, 10_000, check_csv_mapping);
    }

    /// The long runs (`fuzz/README.md`): `STREETFLOW_FUZZ_EXECUTIONS` inputs per target
    /// (10 M by default), release build.
    #[test]
    #[ignore = "minutes in a release build; see fuzz/README.md"]
    fn long_mutation_runs_find_nothing() {
        let (executions, seed) = super::long_run_settings();
        for (target, rate) in [
            (
                "decode",
                run_mutation("decode", seed, executions, check_decode),
            ),
            (
                "csv_mapping",
                run_mutation("csv_mapping", seed, executions, check_csv_mapping),
            ),
        ] {
            eprintln!("{target}: {executions} executions, seed {seed}, {rate:.0}/s");
        }
    }
}
