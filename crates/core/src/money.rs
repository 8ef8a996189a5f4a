//! Money: integer fen (1 yuan = 100 fen) in `i64`, never floats.
//!
//! Sums are checked: an overflow is an error the caller reports, not a wrapped number.
//! The largest single event is 100,000,000,000 fen (1 bn yuan), so even 10^7 maximal
//! events fit in an `i64` sum; the checks are there for corrupted inputs.

/// Fen per yuan.
pub const FEN_PER_YUAN: i64 = 100;

/// Largest accepted `amount_fen` of one event (1 bn yuan).
pub const MAX_EVENT_AMOUNT_FEN: i64 = 100_000_000_000;

/// A sum of fen overflowed `i64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("sum of fen amounts overflows i64")]
pub struct MoneyOverflow;

/// Adds fen amounts, failing instead of wrapping.
pub fn checked_sum<I: IntoIterator<Item = i64>>(amounts: I) -> Result<i64, MoneyOverflow> {
    amounts
        .into_iter()
        .try_fold(0i64, |acc, x| acc.checked_add(x))
        .ok_or(MoneyOverflow)
}

/// Formats fen as yuan with two decimals: `123456` → `"1234.56"`, `-5` → `"-0.05"`.
pub fn format_yuan(fen: i64) -> String {
    let sign = if fen < 0 { "-" } else { "" };
    let magnitude = fen.unsigned_abs();
    format!("{sign}{}.{:02}", magnitude / 100, magnitude % 100)
}

/// Parses a yuan amount with at most two decimals (`"12"`, `"12.5"`, `"-0.05"`) into
/// fen, exactly; `None` for anything else (more decimals, exponents, overflow).
pub fn parse_yuan(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty()
        || fraction.len() > 2
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
        || (digits.contains('.') && fraction.is_empty())
    {
        return None;
    }
    let whole: i64 = whole.parse().ok()?;
    let fraction: i64 = match fraction.len() {
        0 => 0,
        1 => fraction.parse::<i64>().ok()? * 10,
        _ => fraction.parse().ok()?,
    };
    let fen = whole.checked_mul(FEN_PER_YUAN)?.checked_add(fraction)?;
    Some(if negative { -fen } else { fen })
}

/// Groups digits in threes, for people: `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Whole yuan with thousands separators, from fen (limits are whole yuan; the fen are
/// cut off): `-123456789` → `-1,234,567`.
pub fn grouped_yuan(fen: i64) -> String {
    let sign = if fen < 0 { "-" } else { "" };
    format!(
        "{sign}{}",
        thousands(fen.unsigned_abs() / FEN_PER_YUAN.unsigned_abs())
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn groups_digits_and_whole_yuan() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(grouped_yuan(123_456_789), "1,234,567");
        assert_eq!(grouped_yuan(-123_456_789), "-1,234,567");
        assert_eq!(grouped_yuan(i64::MIN), "-92,233,720,368,547,758");
    }

    #[test]
    fn formats_and_parses_known_values() {
        assert_eq!(format_yuan(123_456), "1234.56");
        assert_eq!(format_yuan(-5), "-0.05");
        assert_eq!(format_yuan(0), "0.00");
        assert_eq!(format_yuan(i64::MIN), "-92233720368547758.08");
        assert_eq!(parse_yuan("12.5"), Some(1250));
        assert_eq!(parse_yuan("0.05"), Some(5));
        for bad in [
            "",
            "1.234",
            "1e3",
            "1.",
            ".5",
            "--1",
            "12,50",
            "92233720368547758.08",
        ] {
            assert_eq!(parse_yuan(bad), None, "{bad}");
        }
    }

    #[test]
    fn overflow_is_an_error() {
        assert_eq!(checked_sum([1, 2, 3]), Ok(6));
        assert_eq!(checked_sum([i64::MAX, 1]), Err(MoneyOverflow));
        assert_eq!(
            checked_sum([MAX_EVENT_AMOUNT_FEN; 10_000]),
            Ok(MAX_EVENT_AMOUNT_FEN * 10_000)
        );
    }

    proptest! {
        #[test]
        fn yuan_text_round_trips(fen in (i64::MIN + 1)..=i64::MAX) {
            prop_assert_eq!(parse_yuan(&format_yuan(fen)), Some(fen));
        }

        #[test]
        fn checked_sum_matches_i128(amounts in proptest::collection::vec(any::<i64>(), 0..8)) {
            let wide: i128 = amounts.iter().map(|&a| i128::from(a)).sum();
            match checked_sum(amounts.iter().copied()) {
                Ok(sum) => prop_assert_eq!(i128::from(sum), wide),
                // A prefix overflowed; the full i128 sum may or may not fit.
                Err(MoneyOverflow) => {
                    let mut acc: i128 = 0;
                    let overflowed = amounts.iter().any(|&a| {
                        acc += i128::from(a);
                        acc > i128::from(i64::MAX) || acc < i128::from(i64::MIN)
                    });
                    prop_assert!(overflowed);
                }
            }
        }
    }
}
