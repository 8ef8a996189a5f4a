//! JSON Lines output: a hand-written fast path for valid events and a field-list path
//! for the (rare) malformed messages, each built to break exactly one rule.

use streetflow_core::time::write_rfc3339_millis;
use streetflow_core::{Channel, EventKind, Field, ReasonCode};

/// What a reference names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reference {
    None,
    /// A sale of the same merchant in the feed.
    Sale(u64),
    /// A sale from before the feed began (an orphan).
    BeforeFeed(u64),
    /// A sale whose message was lost (an orphan).
    Lost(u64),
}

/// One event, compact; strings are rebuilt from the merchant's text when written.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Record {
    pub(crate) merchant: u32,
    pub(crate) seq: u64,
    pub(crate) kind: EventKind,
    pub(crate) amount_fen: i64,
    pub(crate) occurred_ms: i64,
    pub(crate) offset_secs: i32,
    pub(crate) channel: Channel,
    pub(crate) terminal: u8,
    pub(crate) reference: Reference,
    pub(crate) payer: Option<u64>,
}

/// The fixed strings of one merchant.
#[derive(Debug, Clone)]
pub(crate) struct MerchantText {
    pub(crate) operator_id: String,
    pub(crate) merchant_id: String,
    /// `","operator_id":"…","merchant_id":"…","terminal_id":"t`
    middle: Vec<u8>,
}

impl MerchantText {
    pub(crate) fn new(operator_id: String, merchant_id: String) -> Self {
        let middle = format!(
            "\",\"operator_id\":\"{operator_id}\",\"merchant_id\":\"{merchant_id}\",\"terminal_id\":\"t"
        )
        .into_bytes();
        Self {
            operator_id,
            merchant_id,
            middle,
        }
    }
}

fn push_padded(out: &mut Vec<u8>, value: u64, width: usize) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(value).as_bytes();
    out.extend(std::iter::repeat_n(
        b'0',
        width.saturating_sub(digits.len()),
    ));
    out.extend_from_slice(digits);
}

fn push_event_id(out: &mut Vec<u8>, merchant_id: &str, reference_like: Reference, seq: u64) {
    out.extend_from_slice(merchant_id.as_bytes());
    match reference_like {
        Reference::BeforeFeed(n) => {
            out.extend_from_slice(b"-pre");
            push_padded(out, n, 6);
        }
        Reference::Lost(n) => {
            out.extend_from_slice(b"-lost");
            push_padded(out, n, 6);
        }
        Reference::None | Reference::Sale(_) => {
            out.push(b'-');
            push_padded(out, seq, 8);
        }
    }
}

const LETTERS: &[u8; 26] = b"abcdefghijklmnopqrstuvwxyz";

/// A payer token: channel prefix plus 12 letters. Letters only, so a token can never be
/// mistaken for a card number.
fn push_payer_token(out: &mut Vec<u8>, channel: Channel, person: u64) {
    out.extend_from_slice(match channel {
        Channel::Wechat => b"wx_",
        Channel::Alipay => b"ap_",
        Channel::UnionpayQr => b"uq_",
        Channel::BankCard => b"bc_",
        Channel::Cash => b"ca_",
        Channel::Other => b"ot_",
    });
    let mut h = crate::generator::splitmix64(person ^ (channel as u64).wrapping_mul(0x9E37_79B9));
    for _ in 0..12 {
        out.push(LETTERS[(h % 26) as usize]);
        h /= 26;
    }
}

/// Appends one valid event as a JSON line.
pub(crate) fn write_event(out: &mut Vec<u8>, text: &MerchantText, rec: &Record) {
    out.extend_from_slice(b"{\"event_id\":\"");
    push_event_id(out, &text.merchant_id, Reference::None, rec.seq);
    out.extend_from_slice(&text.middle);
    push_padded(out, u64::from(rec.terminal), 1);
    out.extend_from_slice(b"\",\"kind\":\"");
    out.extend_from_slice(rec.kind.as_str().as_bytes());
    out.extend_from_slice(b"\",\"amount_fen\":");
    out.extend_from_slice(itoa::Buffer::new().format(rec.amount_fen).as_bytes());
    out.extend_from_slice(b",\"currency\":\"CNY\",\"occurred_at\":\"");
    write_rfc3339_millis(out, rec.occurred_ms, rec.offset_secs);
    out.extend_from_slice(b"\",\"channel\":\"");
    out.extend_from_slice(rec.channel.as_str().as_bytes());
    out.push(b'"');
    if rec.reference != Reference::None {
        out.extend_from_slice(b",\"ref_event_id\":\"");
        push_event_id(
            out,
            &text.merchant_id,
            rec.reference,
            reference_seq(rec.reference),
        );
        out.push(b'"');
    }
    if let Some(person) = rec.payer {
        out.extend_from_slice(b",\"payer_ref\":\"");
        push_payer_token(out, rec.channel, person);
        out.push(b'"');
    }
    out.extend_from_slice(b"}\n");
}

fn reference_seq(reference: Reference) -> u64 {
    match reference {
        Reference::Sale(seq) => seq,
        _ => 0,
    }
}

fn quoted(bytes: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(bytes.len() + 2);
    v.push(b'"');
    v.extend_from_slice(bytes);
    v.push(b'"');
    v
}

/// The event as (key, JSON fragment) pairs, in contract order.
fn fields(text: &MerchantText, rec: &Record) -> Vec<(&'static str, Vec<u8>)> {
    let mut event_id = Vec::new();
    push_event_id(&mut event_id, &text.merchant_id, Reference::None, rec.seq);
    let mut occurred = Vec::new();
    write_rfc3339_millis(&mut occurred, rec.occurred_ms, rec.offset_secs);
    let mut list = vec![
        (Field::EventId.as_str(), quoted(&event_id)),
        (
            Field::OperatorId.as_str(),
            quoted(text.operator_id.as_bytes()),
        ),
        (
            Field::MerchantId.as_str(),
            quoted(text.merchant_id.as_bytes()),
        ),
        (
            Field::TerminalId.as_str(),
            quoted(format!("t{}", rec.terminal).as_bytes()),
        ),
        (Field::Kind.as_str(), quoted(rec.kind.as_str().as_bytes())),
        (
            Field::AmountFen.as_str(),
            rec.amount_fen.to_string().into_bytes(),
        ),
        (Field::Currency.as_str(), quoted(b"CNY")),
        (Field::OccurredAt.as_str(), quoted(&occurred)),
        (
            Field::Channel.as_str(),
            quoted(rec.channel.as_str().as_bytes()),
        ),
    ];
    if rec.reference != Reference::None {
        let mut reference = Vec::new();
        push_event_id(
            &mut reference,
            &text.merchant_id,
            rec.reference,
            reference_seq(rec.reference),
        );
        list.push((Field::RefEventId.as_str(), quoted(&reference)));
    }
    if let Some(person) = rec.payer {
        let mut token = Vec::new();
        push_payer_token(&mut token, rec.channel, person);
        list.push((Field::PayerRef.as_str(), quoted(&token)));
    }
    list
}

fn set(list: &mut Vec<(&'static str, Vec<u8>)>, field: Field, value: Vec<u8>) {
    match list.iter_mut().find(|(k, _)| *k == field.as_str()) {
        Some(slot) => slot.1 = value,
        None => list.push((field.as_str(), value)),
    }
}

fn remove(list: &mut Vec<(&'static str, Vec<u8>)>, field: Field) {
    list.retain(|(k, _)| *k != field.as_str());
}

fn join(list: &[(&'static str, Vec<u8>)]) -> Vec<u8> {
    let mut out = vec![b'{'];
    for (i, (key, value)) in list.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&quoted(key.as_bytes()));
        out.push(b':');
        out.extend_from_slice(value);
    }
    out.push(b'}');
    out
}

/// A 16-digit UnionPay-style number with a valid Luhn check digit.
fn luhn_valid_pan(seed: u64) -> Vec<u8> {
    let mut digits: Vec<u8> = b"62".iter().map(|b| b - b'0').collect();
    let mut h = crate::generator::splitmix64(seed);
    while digits.len() < 15 {
        digits.push((h % 10) as u8);
        h /= 10;
    }
    // Check digit: the one that makes the whole number pass the Luhn check.
    let check = (0..=9u8)
        .find(|&d| {
            let mut candidate = digits.clone();
            candidate.push(d);
            streetflow_core::card::luhn_valid(&candidate)
        })
        .unwrap_or(0);
    digits.push(check);
    digits.into_iter().map(|d| d + b'0').collect()
}

/// Makes the record ready to carry a `ref_event_id` (a refund) if it is a sale.
fn as_refund(list: &mut Vec<(&'static str, Vec<u8>)>, text: &MerchantText, rec: &Record) {
    if rec.kind == EventKind::Sale {
        set(list, Field::Kind, quoted(b"refund"));
        let mut reference = Vec::new();
        push_event_id(
            &mut reference,
            &text.merchant_id,
            Reference::None,
            rec.seq.saturating_sub(1),
        );
        set(list, Field::RefEventId, quoted(&reference));
    }
}

/// Appends a message derived from `rec` that the decoder rejects with exactly `reason`.
pub(crate) fn write_malformed(
    out: &mut Vec<u8>,
    text: &MerchantText,
    rec: &Record,
    reason: ReasonCode,
    arrival_ms: i64,
) {
    let mut list = fields(text, rec);
    let line: Vec<u8> = match reason {
        ReasonCode::EmptyMessage => Vec::new(),
        ReasonCode::Oversized => {
            list.push(("note", quoted(&vec![b'x'; 70_000])));
            join(&list)
        }
        ReasonCode::InvalidUtf8 => {
            list.push(("note", quoted(b"caf\xff")));
            join(&list)
        }
        ReasonCode::InvalidJson => {
            let mut whole = join(&list);
            whole.truncate(whole.len() / 2);
            whole
        }
        ReasonCode::NotAnObject => {
            let mut wrapped = vec![b'['];
            wrapped.extend(join(&list));
            wrapped.push(b']');
            wrapped
        }
        ReasonCode::DuplicateField(field) => {
            let value = match list.iter().find(|(k, _)| *k == field.as_str()) {
                Some((_, v)) => v.clone(),
                None => {
                    let v = quoted(b"dup");
                    list.push((field.as_str(), v.clone()));
                    v
                }
            };
            list.push((field.as_str(), value));
            join(&list)
        }
        ReasonCode::RawCardNumber => {
            set(
                &mut list,
                Field::PayerRef,
                quoted(&luhn_valid_pan(rec.seq ^ arrival_ms as u64)),
            );
            join(&list)
        }
        ReasonCode::MissingField(Field::RefEventId) => {
            as_refund(&mut list, text, rec);
            remove(&mut list, Field::RefEventId);
            join(&list)
        }
        ReasonCode::MissingField(field) => {
            remove(&mut list, field);
            join(&list)
        }
        ReasonCode::Invalid(field) => {
            let bad: Vec<u8> = match field {
                Field::EventId | Field::MerchantId => quoted(b""),
                Field::OperatorId => quoted(b"Silverfish Lane"),
                Field::TerminalId => quoted(&[b't'; 65]),
                Field::Kind => quoted(b"return"),
                Field::AmountFen => {
                    const BAD_AMOUNTS: [&[u8]; 5] = [b"12.5", b"\"100\"", b"1e3", b"0", b"-500"];
                    BAD_AMOUNTS[(rec.seq % 5) as usize].to_vec()
                }
                Field::Currency => quoted(b"USD"),
                Field::OccurredAt => {
                    let mut local = Vec::new();
                    write_rfc3339_millis(&mut local, rec.occurred_ms, rec.offset_secs);
                    local.truncate(23); // drop the offset
                    quoted(&local)
                }
                Field::Channel => quoted(b"paypal"),
                Field::RefEventId => {
                    as_refund(&mut list, text, rec);
                    quoted(b"")
                }
                Field::PayerRef => quoted(&[b'p'; 129]),
            };
            set(&mut list, field, bad);
            join(&list)
        }
        ReasonCode::FutureTimestamp => {
            // A POS clock a century fast: in the future of any ingest time.
            let mut future = Vec::new();
            let century_ms = 36_525 * 86_400_000;
            write_rfc3339_millis(&mut future, arrival_ms + century_ms, rec.offset_secs);
            set(&mut list, Field::OccurredAt, quoted(&future));
            join(&list)
        }
        ReasonCode::UnexpectedRefEventId => {
            set(&mut list, Field::Kind, quoted(b"sale"));
            if !list.iter().any(|(k, _)| *k == Field::RefEventId.as_str()) {
                set(&mut list, Field::RefEventId, quoted(b"m-unexpected"));
            }
            join(&list)
        }
    };
    out.extend_from_slice(&line);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pans_pass_luhn() {
        for seed in 0..200 {
            let pan = luhn_valid_pan(seed);
            assert_eq!(pan.len(), 16);
            assert!(streetflow_core::card::is_card_number(
                std::str::from_utf8(&pan).unwrap()
            ));
        }
    }
}
