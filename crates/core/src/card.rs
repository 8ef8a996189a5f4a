//! Detection and masking of raw bank card numbers (PANs).
//!
//! POS systems sometimes leak the card number into a free-text field. streetflow must
//! never store one, so the decoder rejects such events (`raw_card_number`) and the
//! dead-letter writer masks card-like digit runs before it keeps the raw bytes.
//!
//! A *digit run* is a maximal sequence of ASCII digits in which single spaces or
//! hyphens may separate groups (`6222 0202 0011 2233`). It looks like a card number
//! when it has 13–19 digits and passes the Luhn check.

use std::borrow::Cow;

/// Shortest and longest PAN lengths (ISO/IEC 7812).
const PAN_DIGITS: std::ops::RangeInclusive<usize> = 13..=19;

/// A digit run found in a byte string: `start..end` in bytes, with its digit count.
struct DigitRun {
    start: usize,
    end: usize,
    digits: usize,
    luhn_ok: bool,
}

/// Finds every digit run; a run stops at any byte other than a digit, or at a separator
/// not followed by a digit.
fn digit_runs(bytes: &[u8]) -> impl Iterator<Item = DigitRun> + '_ {
    let mut pos = 0;
    std::iter::from_fn(move || {
        while pos < bytes.len() && !bytes[pos].is_ascii_digit() {
            pos += 1;
        }
        if pos >= bytes.len() {
            return None;
        }
        let start = pos;
        let mut digit_values: Vec<u8> = Vec::with_capacity(20);
        let mut end = pos;
        while pos < bytes.len() {
            let b = bytes[pos];
            if b.is_ascii_digit() {
                digit_values.push(b - b'0');
                pos += 1;
                end = pos;
            } else if (b == b' ' || b == b'-') && bytes.get(pos + 1).is_some_and(u8::is_ascii_digit)
            {
                pos += 1;
            } else {
                break;
            }
        }
        pos = end.max(pos);
        let luhn_ok = PAN_DIGITS.contains(&digit_values.len()) && luhn_valid(&digit_values);
        Some(DigitRun {
            start,
            end,
            digits: digit_values.len(),
            luhn_ok,
        })
    })
}

/// The Luhn (mod 10) check over decimal digit values.
pub fn luhn_valid(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 { doubled - 9 } else { doubled }
            } else {
                d
            }
        })
        .sum();
    !digits.is_empty() && sum.is_multiple_of(10)
}

/// True when the whole value is one card-like digit run. Used for identifiers, where a
/// longer value merely containing digits is legitimate (serial numbers, dates).
pub fn is_card_number(text: &str) -> bool {
    let bytes = text.as_bytes();
    digit_runs(bytes)
        .next()
        .is_some_and(|run| run.start == 0 && run.end == bytes.len() && run.luhn_ok)
}

/// True when any digit run inside the value looks like a card number. Used for
/// `payer_ref`, the field where a leaked PAN is most likely.
pub fn contains_card_number(text: &str) -> bool {
    digit_runs(text.as_bytes()).any(|run| run.luhn_ok)
}

/// Masks every card-like digit run in `raw`, keeping the last four digits, so a dead
/// letter never stores a PAN. Returns the input untouched (borrowed) when there is none.
pub fn mask_card_numbers(raw: &[u8]) -> Cow<'_, [u8]> {
    let runs: Vec<DigitRun> = digit_runs(raw).filter(|run| run.luhn_ok).collect();
    if runs.is_empty() {
        return Cow::Borrowed(raw);
    }
    let mut masked = raw.to_vec();
    for run in runs {
        let mut digits_left = run.digits;
        for byte in &mut masked[run.start..run.end] {
            if byte.is_ascii_digit() {
                if digits_left > 4 {
                    *byte = b'*';
                }
                digits_left -= 1;
            }
        }
    }
    Cow::Owned(masked)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Well-known public test PANs.
    const VISA_TEST: &str = "4111111111111111";
    const UNIONPAY_TEST: &str = "6212345678901265";

    #[test]
    fn luhn_accepts_test_cards_and_rejects_one_digit_changes() {
        assert!(is_card_number(VISA_TEST));
        assert!(is_card_number(UNIONPAY_TEST));
        assert!(!is_card_number("4111111111111112"));
        assert!(is_card_number("4111 1111 1111 1111"));
        assert!(is_card_number("4111-1111-1111-1111"));
    }

    #[test]
    fn lengths_outside_13_to_19_are_not_cards() {
        // 12 and 20 digits that pass Luhn.
        assert!(luhn_valid(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
        assert!(!is_card_number("000000000000"));
        assert!(!is_card_number("00000000000000000000"));
        assert!(is_card_number("0000000000000"));
    }

    #[test]
    fn identifiers_only_match_as_a_whole() {
        assert!(!is_card_number("ord-4111111111111111"));
        assert!(contains_card_number("ord-4111111111111111"));
        assert!(!contains_card_number("p_abcdefgh"));
        assert!(!is_card_number(""));
    }

    #[test]
    fn masking_keeps_last_four_and_leaves_other_digits() {
        let raw = br#"{"payer_ref":"4111 1111 1111 1111","amount_fen":1200}"#;
        let masked = mask_card_numbers(raw);
        assert_eq!(
            std::str::from_utf8(&masked).unwrap(),
            r#"{"payer_ref":"**** **** **** 1111","amount_fen":1200}"#
        );
        let clean = br#"{"amount_fen":1200}"#;
        assert!(matches!(mask_card_numbers(clean), Cow::Borrowed(_)));
    }
}
