//! Bytes → [`PosEvent`], or a [`Rejection`] with a stable [`ReasonCode`].
//!
//! Decoding is one pass of `serde_json` over the message into raw field values (strings
//! borrow from the input when unescaped), followed by the contract's rules in a fixed
//! order, so each bad message gets exactly one, reproducible reason:
//!
//! 1. size (`empty_message`, `oversized`), encoding (`invalid_utf8`), syntax
//!    (`invalid_json`), shape (`not_an_object`), repeated keys (`duplicate_field:*`);
//! 2. `raw_card_number` in any string field, before anything else is judged, because
//!    such a message must be quarantined whatever else is wrong with it;
//! 3. each field in contract order (`missing_field:*`, `bad_*` (an `occurred_at` before
//!    the earliest accepted is `bad_timestamp`), `unsupported_currency`,
//!    `future_timestamp`);
//! 4. the `ref_event_id` rules that depend on `kind`.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, Duration, FixedOffset, Utc};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::card;
use crate::event::{Channel, Currency, EventKind, Field, PosEvent};
use crate::money::MAX_EVENT_AMOUNT_FEN;
use crate::reason::ReasonCode;
use crate::time::parse_rfc3339;

/// Largest accepted message, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// How far `occurred_at` may lie after the receiving worker's clock before it is `future_timestamp`
/// (POS clocks drift; ten minutes is generous).
pub const MAX_FUTURE_SKEW: Duration = Duration::minutes(10);

/// The earliest `occurred_at` accepted by default, 2000-01-01T00:00:00Z: every business
/// month is a lake partition, so a timestamp of year 1 would open thousands of them.
pub const EARLIEST_OCCURRED_AT_SECONDS: i64 = 946_684_800;

/// Limits the decoder applies. The defaults are the contract's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Messages longer than this are `oversized`.
    pub max_message_bytes: usize,
    /// Allowed lead of `occurred_at` over the receiving worker's clock.
    pub max_future_skew: Duration,
    /// Earlier `occurred_at` values are `bad_timestamp`.
    pub earliest_occurred_at: DateTime<Utc>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            max_message_bytes: MAX_MESSAGE_BYTES,
            max_future_skew: MAX_FUTURE_SKEW,
            earliest_occurred_at: DateTime::from_timestamp(EARLIEST_OCCURRED_AT_SECONDS, 0)
                .unwrap_or_default(),
        }
    }
}

/// Why a message was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Stable code, for counting and routing.
    pub reason: ReasonCode,
    /// Human-readable explanation for the operator; never contains a card number.
    pub detail: String,
}

impl Rejection {
    /// A rejection whose explanation has every card-like digit run masked: it quotes the
    /// offending value, and a value may hold a card number that its field's own check
    /// lets pass (an identifier only *containing* one), while dead letters keep the
    /// explanation beside their masked payload.
    fn new(reason: ReasonCode, detail: impl Into<String>) -> Self {
        let detail = detail.into();
        let detail = match card::mask_card_numbers(detail.as_bytes()) {
            std::borrow::Cow::Borrowed(_) => detail,
            std::borrow::Cow::Owned(masked) => String::from_utf8_lossy(&masked).into_owned(),
        };
        Self { reason, detail }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

impl std::error::Error for Rejection {}

/// Decodes and validates one message that the receiving worker's own clock read as
/// `received_at` (never a producer's or broker's timestamp: `future_timestamp` is judged
/// against it).
///
/// ```
/// use streetflow_core::{decode, DecodeOptions, EventKind};
/// let msg = br#"{"event_id":"e1","operator_id":"silverfish-lane","merchant_id":"m001",
///   "kind":"sale","amount_fen":1250,"currency":"CNY",
///   "occurred_at":"2025-09-30T12:34:56.789+08:00","channel":"wechat"}"#;
/// let now = chrono::Utc::now();
/// let event = decode(msg, now, &DecodeOptions::default()).unwrap();
/// assert_eq!((event.kind, event.amount_fen), (EventKind::Sale, 1250));
/// ```
pub fn decode<'a>(
    message: &'a [u8],
    received_at: DateTime<Utc>,
    options: &DecodeOptions,
) -> Result<PosEvent<'a>, Rejection> {
    if message.is_empty() {
        return Err(Rejection::new(
            ReasonCode::EmptyMessage,
            "message has no bytes",
        ));
    }
    if message.len() > options.max_message_bytes {
        return Err(Rejection::new(
            ReasonCode::Oversized,
            format!(
                "message has {} bytes, the limit is {}",
                message.len(),
                options.max_message_bytes
            ),
        ));
    }
    let text = std::str::from_utf8(message).map_err(|e| {
        Rejection::new(
            ReasonCode::InvalidUtf8,
            format!("invalid UTF-8 at byte {}", e.valid_up_to()),
        )
    })?;
    let mut raw = parse_raw(text)?;
    validate(&mut raw, received_at, options)
}

/// The `operator_id` of a message, if it has a valid one, even when the message is
/// otherwise rejected; dead letters are partitioned by it. Slow path: rejects only.
pub fn operator_hint(message: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe<'a> {
        #[serde(borrow)]
        operator_id: Option<Cow<'a, str>>,
    }
    let probe: Probe<'_> = serde_json::from_slice(message).ok()?;
    probe
        .operator_id
        .filter(|id| is_operator_id(id))
        .map(Cow::into_owned)
}

/// A JSON value as far as the contract cares: scalars kept, containers only noted.
#[derive(Debug)]
enum Scalar<'a> {
    Str(Cow<'a, str>),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Bool(bool),
    Null,
    Array,
    Object,
}

impl Scalar<'_> {
    fn type_name(&self) -> &'static str {
        match self {
            Scalar::Str(_) => "a string",
            Scalar::Unsigned(_) | Scalar::Signed(_) => "an integer",
            Scalar::Float(_) => "a non-integer number",
            Scalar::Bool(_) => "a boolean",
            Scalar::Null => "null",
            Scalar::Array => "an array",
            Scalar::Object => "an object",
        }
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Scalar::Unsigned(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Signed(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Float(v))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool(v))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Array)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Object)
    }
}

impl<'de> de::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// Reads an object key as a contract [`Field`], `None` for keys the contract ignores.
struct FieldKey;

impl<'de> DeserializeSeed<'de> for FieldKey {
    type Value = Option<Field>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for FieldKey {
    type Value = Option<Field>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Field::from_key(v))
    }
}

/// The known fields of one object, before any rule is applied.
#[derive(Default)]
struct RawEvent<'a> {
    values: [Option<Scalar<'a>>; Field::ALL.len()],
    first_duplicate: Option<Field>,
}

impl<'a> RawEvent<'a> {
    /// The field's value; JSON `null` counts as absent.
    fn take(&mut self, field: Field) -> Option<Scalar<'a>> {
        match self.values[field as usize].take() {
            Some(Scalar::Null) | None => None,
            other => other,
        }
    }
}

// Returned by value once per message; boxing the object would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum RawDocument<'a> {
    Object(RawEvent<'a>),
    NotObject(&'static str),
}

struct DocumentVisitor;

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = RawDocument<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut raw = RawEvent::default();
        while let Some(key) = map.next_key_seed(FieldKey)? {
            match key {
                Some(field) => {
                    let value: Scalar<'de> = map.next_value()?;
                    let slot = &mut raw.values[field as usize];
                    if slot.is_some() {
                        raw.first_duplicate.get_or_insert(field);
                    }
                    *slot = Some(value);
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(RawDocument::Object(raw))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(RawDocument::NotObject("an array"))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(RawDocument::NotObject("a string"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(RawDocument::NotObject("a number"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(RawDocument::NotObject("a number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(RawDocument::NotObject("a number"))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(RawDocument::NotObject("a boolean"))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(RawDocument::NotObject("null"))
    }
}

fn parse_raw(text: &str) -> Result<RawEvent<'_>, Rejection> {
    let invalid_json =
        |e: serde_json::Error| Rejection::new(ReasonCode::InvalidJson, e.to_string());
    let mut de = serde_json::Deserializer::from_str(text);
    let document = de.deserialize_any(DocumentVisitor).map_err(invalid_json)?;
    de.end().map_err(invalid_json)?;
    match document {
        RawDocument::NotObject(kind) => Err(Rejection::new(
            ReasonCode::NotAnObject,
            format!("message is {kind}, not a JSON object"),
        )),
        RawDocument::Object(raw) => match raw.first_duplicate {
            Some(field) => Err(Rejection::new(
                ReasonCode::DuplicateField(field),
                format!("key {} appears more than once", field.as_str()),
            )),
            None => Ok(raw),
        },
    }
}

/// A short, safe rendering of an offending value for a rejection detail.
fn describe(value: &Scalar<'_>) -> String {
    match value {
        Scalar::Str(s) => {
            let shown: String = s.chars().take(40).collect();
            let more = if s.chars().count() > 40 { "…" } else { "" };
            format!("{shown:?}{more}")
        }
        Scalar::Unsigned(v) => v.to_string(),
        Scalar::Signed(v) => v.to_string(),
        Scalar::Float(v) => v.to_string(),
        Scalar::Bool(v) => v.to_string(),
        other => other.type_name().to_owned(),
    }
}

fn missing(field: Field) -> Rejection {
    Rejection::new(
        ReasonCode::MissingField(field),
        format!("required field {} is absent or null", field.as_str()),
    )
}

fn invalid(field: Field, value: &Scalar<'_>, rule: &str) -> Rejection {
    Rejection::new(
        ReasonCode::Invalid(field),
        format!("{} must be {rule}, got {}", field.as_str(), describe(value)),
    )
}

fn is_event_id(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

fn is_operator_id(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=64).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

fn char_count_within(s: &str, range: std::ops::RangeInclusive<usize>) -> bool {
    range.contains(&s.chars().count())
}

const EVENT_ID_RULE: &str = "a string of 1 to 128 printable ASCII characters";

fn required_string<'a>(
    raw: &mut RawEvent<'a>,
    field: Field,
    rule: &str,
    ok: impl Fn(&str) -> bool,
) -> Result<Cow<'a, str>, Rejection> {
    match raw.take(field) {
        None => Err(missing(field)),
        Some(Scalar::Str(s)) if ok(&s) => Ok(s),
        Some(other) => Err(invalid(field, &other, rule)),
    }
}

fn optional_string<'a>(
    raw: &mut RawEvent<'a>,
    field: Field,
    rule: &str,
    ok: impl Fn(&str) -> bool,
) -> Result<Option<Cow<'a, str>>, Rejection> {
    match raw.take(field) {
        None => Ok(None),
        Some(Scalar::Str(s)) if ok(&s) => Ok(Some(s)),
        Some(other) => Err(invalid(field, &other, rule)),
    }
}

fn check_card_numbers(raw: &RawEvent<'_>) -> Result<(), Rejection> {
    for field in Field::ALL {
        if let Some(Scalar::Str(s)) = &raw.values[field as usize] {
            let leaked = if field == Field::PayerRef {
                card::contains_card_number(s)
            } else {
                card::is_card_number(s)
            };
            if leaked {
                return Err(Rejection::new(
                    ReasonCode::RawCardNumber,
                    format!(
                        "{} holds what looks like a bank card number (Luhn-valid, 13-19 digits); \
                         send a token, never the card number",
                        field.as_str()
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn validate<'a>(
    raw: &mut RawEvent<'a>,
    received_at: DateTime<Utc>,
    options: &DecodeOptions,
) -> Result<PosEvent<'a>, Rejection> {
    check_card_numbers(raw)?;

    let event_id = required_string(raw, Field::EventId, EVENT_ID_RULE, is_event_id)?;
    let operator_id = required_string(
        raw,
        Field::OperatorId,
        "a string matching [a-z0-9][a-z0-9_-]{0,63}",
        is_operator_id,
    )?;
    let merchant_id = required_string(
        raw,
        Field::MerchantId,
        "a string of 1 to 64 characters",
        |s| char_count_within(s, 1..=64),
    )?;
    let terminal_id = optional_string(
        raw,
        Field::TerminalId,
        "a string of at most 64 characters",
        |s| char_count_within(s, 0..=64),
    )?;
    let kind = match raw.take(Field::Kind) {
        None => return Err(missing(Field::Kind)),
        Some(value) => match &value {
            Scalar::Str(s) => EventKind::parse(s),
            _ => None,
        }
        .ok_or_else(|| invalid(Field::Kind, &value, "one of sale, refund, void"))?,
    };
    let amount_fen = match raw.take(Field::AmountFen) {
        None => return Err(missing(Field::AmountFen)),
        Some(Scalar::Unsigned(v)) if (1..=MAX_EVENT_AMOUNT_FEN as u64).contains(&v) => v as i64,
        Some(other) => {
            return Err(invalid(
                Field::AmountFen,
                &other,
                "an integer number of fen from 1 to 100000000000 (no decimals, exponents or quotes)",
            ));
        }
    };
    let currency = match raw.take(Field::Currency) {
        None => return Err(missing(Field::Currency)),
        Some(Scalar::Str(s)) if s == "CNY" => Currency::Cny,
        Some(other) => {
            return Err(invalid(
                Field::Currency,
                &other,
                "\"CNY\" (the only currency of v1)",
            ));
        }
    };
    let occurred_at: DateTime<FixedOffset> = match raw.take(Field::OccurredAt) {
        None => return Err(missing(Field::OccurredAt)),
        Some(Scalar::Str(s)) => match parse_rfc3339(&s) {
            Some(t) => t,
            None => {
                return Err(invalid(
                    Field::OccurredAt,
                    &Scalar::Str(s),
                    "an RFC 3339 timestamp with offset, e.g. 2025-09-30T12:34:56.789+08:00",
                ));
            }
        },
        Some(other) => {
            return Err(invalid(
                Field::OccurredAt,
                &other,
                "an RFC 3339 timestamp string",
            ));
        }
    };
    if occurred_at < options.earliest_occurred_at {
        return Err(Rejection::new(
            ReasonCode::Invalid(Field::OccurredAt),
            format!(
                "occurred_at {} is before {}, the earliest the pipeline accepts \
                 (decode.earliest_occurred_at)",
                occurred_at.to_rfc3339(),
                options.earliest_occurred_at.to_rfc3339(),
            ),
        ));
    }
    if occurred_at.timestamp_millis() > (received_at + options.max_future_skew).timestamp_millis() {
        return Err(Rejection::new(
            ReasonCode::FutureTimestamp,
            // The clock's reading is the dead letter's `ingested_at`; leaving it out of
            // the detail keeps a replayed record's dead letter identical.
            format!(
                "occurred_at {} is more than {} minutes after the receiving worker's clock \
                 (the dead letter's ingested_at)",
                occurred_at.to_rfc3339(),
                options.max_future_skew.num_minutes(),
            ),
        ));
    }
    let channel = match raw.take(Field::Channel) {
        None => return Err(missing(Field::Channel)),
        Some(value) => match &value {
            Scalar::Str(s) => Channel::parse(s),
            _ => None,
        }
        .ok_or_else(|| {
            invalid(
                Field::Channel,
                &value,
                "one of wechat, alipay, unionpay_qr, bank_card, cash, other",
            )
        })?,
    };
    let ref_event_id = optional_string(raw, Field::RefEventId, EVENT_ID_RULE, is_event_id)?;
    let payer_ref = optional_string(
        raw,
        Field::PayerRef,
        "a string of at most 128 characters",
        |s| char_count_within(s, 0..=128),
    )?;

    match (kind, &ref_event_id) {
        (EventKind::Sale, Some(_)) => {
            return Err(Rejection::new(
                ReasonCode::UnexpectedRefEventId,
                "a sale must not carry ref_event_id (only refunds and voids reference a sale)",
            ));
        }
        (EventKind::Refund | EventKind::Void, None) => {
            return Err(Rejection::new(
                ReasonCode::MissingField(Field::RefEventId),
                format!("a {kind} must name the original sale in ref_event_id"),
            ));
        }
        _ => {}
    }

    Ok(PosEvent {
        event_id,
        operator_id,
        merchant_id,
        terminal_id,
        kind,
        amount_fen,
        currency,
        occurred_at,
        channel,
        ref_event_id,
        payer_ref,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the fuzzer (fuzz/README.md): a value that only contains a card number
    /// passes its field's check, and a rejection for another reason quoted it unmasked.
    #[test]
    fn a_rejection_never_quotes_a_card_number() {
        let message = br#"{"event_id":"e1","operator_id":"silverfish-lane","merchant_id":"m001",
            "kind":"sale","amount_fen":1250,"currency":"CNY","channel":"wechat",
            "occurred_at":"x 4111 1111 1111 1111 y"}"#;
        let rejection =
            decode(message, Utc::now(), &DecodeOptions::default()).expect_err("not a timestamp");
        assert_eq!(rejection.reason, ReasonCode::Invalid(Field::OccurredAt));
        assert!(
            !card::contains_card_number(&rejection.detail),
            "{}",
            rejection.detail
        );
        assert!(rejection.detail.contains("1111 y"), "{}", rejection.detail);
    }

    #[test]
    fn operator_hint_reads_valid_operators_only() {
        assert_eq!(
            operator_hint(br#"{"operator_id":"jade-market","amount_fen":"x"}"#).as_deref(),
            Some("jade-market")
        );
        assert_eq!(operator_hint(br#"{"operator_id":"../../etc"}"#), None);
        assert_eq!(operator_hint(br#"{"operator_id":"jade"#), None);
        assert_eq!(operator_hint(b"\xff"), None);
        assert_eq!(operator_hint(br#"[1]"#), None);
    }
}
