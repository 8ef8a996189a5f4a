//! Stable reason codes for rejected messages.
//!
//! A code is part of the public contract: dashboards, the `dead_letters` table and
//! operators' tickets refer to it, so a spelling never changes once shipped.

use std::fmt;

use crate::event::Field;

/// Why a message was rejected. Each message gets exactly one code: the first rule it
/// breaks, in the order of [`crate::decode`] (size, encoding, JSON, shape, card numbers,
/// then the fields in contract order, then cross-field rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReasonCode {
    /// Zero-length message or a Kafka tombstone (`empty_message`).
    EmptyMessage,
    /// Longer than the 64 KiB limit (`oversized`).
    Oversized,
    /// Not valid UTF-8 (`invalid_utf8`).
    InvalidUtf8,
    /// Not one JSON document (`invalid_json`).
    InvalidJson,
    /// Valid JSON, but not an object (`not_an_object`).
    NotAnObject,
    /// The same key twice in one object (`duplicate_field:<field>`); parsers disagree on
    /// which value wins, so the message is ambiguous.
    DuplicateField(Field),
    /// A string field holds something that looks like a bank card number
    /// (13–19 digits passing the Luhn check) (`raw_card_number`).
    RawCardNumber,
    /// A required field is absent or `null` (`missing_field:<field>`).
    MissingField(Field),
    /// A field has the wrong type or breaks its format rule (`bad_<field>`, with the
    /// contract's historic names `bad_amount`, `bad_timestamp`, `unsupported_currency`).
    Invalid(Field),
    /// `occurred_at` lies more than the allowed skew after the receiving worker's clock
    /// (`future_timestamp`).
    FutureTimestamp,
    /// A sale that names a `ref_event_id` (`unexpected_ref_event_id`).
    UnexpectedRefEventId,
}

impl ReasonCode {
    /// Every code the decoder can return, for documentation, metrics and tests.
    pub fn all() -> Vec<ReasonCode> {
        let mut codes = vec![
            ReasonCode::EmptyMessage,
            ReasonCode::Oversized,
            ReasonCode::InvalidUtf8,
            ReasonCode::InvalidJson,
            ReasonCode::NotAnObject,
        ];
        codes.extend(Field::ALL.into_iter().map(ReasonCode::DuplicateField));
        codes.push(ReasonCode::RawCardNumber);
        codes.extend(
            Field::ALL
                .into_iter()
                .filter(|f| f.is_always_required() || *f == Field::RefEventId)
                .map(ReasonCode::MissingField),
        );
        codes.extend(Field::ALL.into_iter().map(ReasonCode::Invalid));
        codes.push(ReasonCode::FutureTimestamp);
        codes.push(ReasonCode::UnexpectedRefEventId);
        codes
    }

    /// The stable spelling, e.g. `missing_field:amount_fen`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ReasonCode::EmptyMessage => "empty_message",
            ReasonCode::Oversized => "oversized",
            ReasonCode::InvalidUtf8 => "invalid_utf8",
            ReasonCode::InvalidJson => "invalid_json",
            ReasonCode::NotAnObject => "not_an_object",
            ReasonCode::RawCardNumber => "raw_card_number",
            ReasonCode::FutureTimestamp => "future_timestamp",
            ReasonCode::UnexpectedRefEventId => "unexpected_ref_event_id",
            ReasonCode::DuplicateField(field) => match field {
                Field::EventId => "duplicate_field:event_id",
                Field::OperatorId => "duplicate_field:operator_id",
                Field::MerchantId => "duplicate_field:merchant_id",
                Field::TerminalId => "duplicate_field:terminal_id",
                Field::Kind => "duplicate_field:kind",
                Field::AmountFen => "duplicate_field:amount_fen",
                Field::Currency => "duplicate_field:currency",
                Field::OccurredAt => "duplicate_field:occurred_at",
                Field::Channel => "duplicate_field:channel",
                Field::RefEventId => "duplicate_field:ref_event_id",
                Field::PayerRef => "duplicate_field:payer_ref",
            },
            ReasonCode::MissingField(field) => match field {
                Field::EventId => "missing_field:event_id",
                Field::OperatorId => "missing_field:operator_id",
                Field::MerchantId => "missing_field:merchant_id",
                Field::TerminalId => "missing_field:terminal_id",
                Field::Kind => "missing_field:kind",
                Field::AmountFen => "missing_field:amount_fen",
                Field::Currency => "missing_field:currency",
                Field::OccurredAt => "missing_field:occurred_at",
                Field::Channel => "missing_field:channel",
                Field::RefEventId => "missing_field:ref_event_id",
                Field::PayerRef => "missing_field:payer_ref",
            },
            ReasonCode::Invalid(field) => match field {
                Field::EventId => "bad_event_id",
                Field::OperatorId => "bad_operator_id",
                Field::MerchantId => "bad_merchant_id",
                Field::TerminalId => "bad_terminal_id",
                Field::Kind => "bad_kind",
                Field::AmountFen => "bad_amount",
                Field::Currency => "unsupported_currency",
                Field::OccurredAt => "bad_timestamp",
                Field::Channel => "bad_channel",
                Field::RefEventId => "bad_ref_event_id",
                Field::PayerRef => "bad_payer_ref",
            },
        }
    }

    /// Parses a stable spelling back (e.g. when reading `dead_letters`).
    pub fn parse(code: &str) -> Option<ReasonCode> {
        ReasonCode::all().into_iter().find(|c| c.as_str() == code)
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        let all = ReasonCode::all();
        let spellings: HashSet<&str> = all.iter().map(|c| c.as_str()).collect();
        assert_eq!(spellings.len(), all.len(), "two codes share a spelling");
        for code in all {
            assert_eq!(ReasonCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(ReasonCode::parse("no_such_code"), None);
    }

    #[test]
    fn contract_spellings_are_kept() {
        assert_eq!(ReasonCode::Invalid(Field::AmountFen).as_str(), "bad_amount");
        assert_eq!(
            ReasonCode::Invalid(Field::Currency).as_str(),
            "unsupported_currency"
        );
        assert_eq!(
            ReasonCode::Invalid(Field::OccurredAt).as_str(),
            "bad_timestamp"
        );
        assert_eq!(
            ReasonCode::MissingField(Field::AmountFen).as_str(),
            "missing_field:amount_fen"
        );
    }
}
