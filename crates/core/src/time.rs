//! Strict RFC 3339 timestamps: parsing for the decoder, formatting for writers.
//!
//! Accepted: `YYYY-MM-DDTHH:MM:SS[.fraction]OFFSET`, `T` or `t`, a fraction of 1–9
//! digits, and an offset of `Z`, `z` or `±HH:MM`. An offset is mandatory: a local time
//! without one cannot be placed on a business date. Leap seconds (`:60`) are refused.
//! The JSON Schema's `occurred_at` pattern states the same grammar.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime};

fn two_digits(bytes: &[u8], at: usize) -> Option<u32> {
    let hi = bytes.get(at)?;
    let lo = bytes.get(at + 1)?;
    if hi.is_ascii_digit() && lo.is_ascii_digit() {
        Some(u32::from(hi - b'0') * 10 + u32::from(lo - b'0'))
    } else {
        None
    }
}

/// Parses a strict RFC 3339 timestamp with offset; `None` when it is not one.
pub fn parse_rfc3339(text: &str) -> Option<DateTime<FixedOffset>> {
    let b = text.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let year = two_digits(b, 0)? * 100 + two_digits(b, 2)?;
    let (month, day) = (two_digits(b, 5)?, two_digits(b, 8)?);
    let (hour, minute, second) = (two_digits(b, 11)?, two_digits(b, 14)?, two_digits(b, 17)?);
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let mut pos = 19;
    let mut nanos: u32 = 0;
    if b[pos] == b'.' {
        pos += 1;
        let digits_start = pos;
        while pos < b.len() && b[pos].is_ascii_digit() {
            pos += 1;
        }
        let digits = pos - digits_start;
        if !(1..=9).contains(&digits) {
            return None;
        }
        for &d in &b[digits_start..pos] {
            nanos = nanos * 10 + u32::from(d - b'0');
        }
        nanos *= 10u32.pow(9 - digits as u32);
    }
    let offset_seconds: i32 = match &b[pos..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let oh = two_digits(b, pos + 1)?;
            let om = two_digits(b, pos + 4)?;
            if oh > 23 || om > 59 {
                return None;
            }
            let magnitude = (oh * 3600 + om * 60) as i32;
            if *sign == b'-' { -magnitude } else { magnitude }
        }
        _ => return None,
    };
    let date = NaiveDate::from_ymd_opt(year as i32, month, day)?;
    let time = NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)?;
    let offset = FixedOffset::east_opt(offset_seconds)?;
    NaiveDateTime::new(date, time)
        .and_local_timezone(offset)
        .single()
}

/// Appends `YYYY-MM-DDTHH:MM:SS.mmm±HH:MM` for a UTC instant in milliseconds shown at
/// the given offset. Hot path of the synthetic generator: no allocation, no formatting
/// machinery.
pub fn write_rfc3339_millis(out: &mut Vec<u8>, utc_millis: i64, offset_seconds: i32) {
    let local_millis = utc_millis + i64::from(offset_seconds) * 1000;
    let days = local_millis.div_euclid(86_400_000);
    let millis_of_day = local_millis.rem_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    let secs = millis_of_day / 1000;
    let (hour, minute, second, milli) =
        (secs / 3600, secs / 60 % 60, secs % 60, millis_of_day % 1000);
    push_digits(out, year, 4);
    out.push(b'-');
    push_digits(out, i64::from(month), 2);
    out.push(b'-');
    push_digits(out, i64::from(day), 2);
    out.push(b'T');
    push_digits(out, hour, 2);
    out.push(b':');
    push_digits(out, minute, 2);
    out.push(b':');
    push_digits(out, second, 2);
    out.push(b'.');
    push_digits(out, milli, 3);
    if offset_seconds == 0 {
        out.push(b'Z');
    } else {
        out.push(if offset_seconds < 0 { b'-' } else { b'+' });
        let magnitude = i64::from(offset_seconds.unsigned_abs());
        push_digits(out, magnitude / 3600, 2);
        out.push(b':');
        push_digits(out, magnitude / 60 % 60, 2);
    }
}

fn push_digits(out: &mut Vec<u8>, value: i64, width: usize) {
    let mut buf = [b'0'; 8];
    let mut v = value.unsigned_abs();
    for slot in buf[..width].iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.extend_from_slice(&buf[..width]);
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), after Howard
/// Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn parses_offsets_fractions_and_zulu() {
        let t = parse_rfc3339("2025-09-30T12:34:56.789+08:00").unwrap();
        assert_eq!(t.to_rfc3339(), "2025-09-30T12:34:56.789+08:00");
        let z = parse_rfc3339("2025-09-30t04:34:56z").unwrap();
        assert_eq!(z.timestamp(), t.timestamp());
        assert!(parse_rfc3339("2025-09-30T12:34:56.123456789-05:30").is_some());
    }

    #[test]
    fn refuses_what_is_not_strict_rfc3339() {
        for bad in [
            "2025-09-30T12:34:56",             // no offset
            "2025-09-30 12:34:56+08:00",       // space separator
            "2025-02-30T12:34:56+08:00",       // no such day
            "2025-09-30T24:00:00+08:00",       // hour 24
            "2025-09-30T23:59:60Z",            // leap second
            "2025-09-30T12:34:56.+08:00",      // empty fraction
            "2025-09-30T12:34:56.1234567891Z", // 10 fraction digits
            "2025-09-30T12:34:56+0800",        // offset without colon
            "2025-09-30T12:34:56+24:00",       // offset hour 24
            "1759206896",                      // epoch seconds
            "",
        ] {
            assert!(parse_rfc3339(bad).is_none(), "accepted {bad:?}");
        }
    }

    proptest! {
        #[test]
        fn written_timestamps_parse_back(
            millis in -2_000_000_000_000i64..7_000_000_000_000,
            offset_minutes in -14 * 60i32..=14 * 60,
        ) {
            let offset = offset_minutes * 60;
            let mut out = Vec::new();
            write_rfc3339_millis(&mut out, millis, offset);
            let text = String::from_utf8(out).unwrap();
            let parsed = parse_rfc3339(&text).unwrap();
            prop_assert_eq!(parsed.timestamp_millis(), millis);
            prop_assert_eq!(parsed.offset().local_minus_utc(), offset);
            let expected = Utc.timestamp_millis_opt(millis).unwrap()
                .with_timezone(&FixedOffset::east_opt(offset).unwrap());
            prop_assert_eq!(parsed, expected);
        }
    }
}
