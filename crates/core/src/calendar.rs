//! The business calendar: which business date an instant belongs to.
//!
//! A business date is the calendar date of the instant in the operator's time zone,
//! shifted by the operator's day cutoff: with a 04:00 cutoff a night market's 01:30 sale
//! belongs to the previous date. Business day `D` is the half-open interval
//! `[day_start(D), day_start(D + 1))`, where `day_start(D)` is the first instant whose
//! local wall time is `D` at the cutoff (the earlier one when clocks fall back, the end
//! of the gap when they spring forward). These intervals tile the timeline, so every
//! instant has exactly one business date, even across DST changes.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Days, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;

/// The time zone operators use unless configured otherwise.
pub const DEFAULT_TIME_ZONE: Tz = Tz::Asia__Shanghai;

/// Errors building a calendar from configuration text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalendarError {
    /// Not an IANA time zone name.
    #[error("unknown time zone {0:?} (expected an IANA name such as Asia/Shanghai)")]
    UnknownTimeZone(String),
    /// Not `HH:MM` within a day.
    #[error("bad day cutoff {0:?} (expected HH:MM, 00:00 to 23:59)")]
    BadCutoff(String),
}

/// An operator's business calendar: time zone plus day cutoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusinessCalendar {
    time_zone: Tz,
    cutoff: NaiveTime,
}

impl Default for BusinessCalendar {
    fn default() -> Self {
        Self::new(DEFAULT_TIME_ZONE, NaiveTime::MIN)
    }
}

impl fmt::Display for BusinessCalendar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cutoff {}",
            self.time_zone,
            self.cutoff.format("%H:%M")
        )
    }
}

impl BusinessCalendar {
    /// A calendar for `time_zone` whose business day starts at `cutoff` local time.
    pub fn new(time_zone: Tz, cutoff: NaiveTime) -> Self {
        Self { time_zone, cutoff }
    }

    /// Builds a calendar from configuration text: an IANA zone and an `HH:MM` cutoff.
    pub fn parse(time_zone: &str, cutoff: &str) -> Result<Self, CalendarError> {
        let tz = Tz::from_str(time_zone)
            .map_err(|_| CalendarError::UnknownTimeZone(time_zone.to_owned()))?;
        let cutoff = NaiveTime::parse_from_str(cutoff, "%H:%M")
            .map_err(|_| CalendarError::BadCutoff(cutoff.to_owned()))?;
        Ok(Self::new(tz, cutoff))
    }

    /// The operator's time zone.
    pub fn time_zone(&self) -> Tz {
        self.time_zone
    }

    /// Local wall time at which a business day starts.
    pub fn cutoff(&self) -> NaiveTime {
        self.cutoff
    }

    /// Wall-clock time of an instant in the operator's zone.
    pub fn local_time<T: TimeZone>(&self, instant: &DateTime<T>) -> NaiveDateTime {
        instant.with_timezone(&self.time_zone).naive_local()
    }

    /// The first instant of business date `date`.
    pub fn day_start(&self, date: NaiveDate) -> DateTime<Utc> {
        let wall = date.and_time(self.cutoff);
        match self.time_zone.from_local_datetime(&wall) {
            LocalResult::Single(t) => t.with_timezone(&Utc),
            LocalResult::Ambiguous(earlier, _) => earlier.with_timezone(&Utc),
            // The wall time falls into a gap (clocks sprang forward, or a zone skipped a
            // whole day): the day starts where local time resumes.
            LocalResult::None => {
                let resumed = (1..=48 * 60).find_map(|minutes| {
                    let later = wall + chrono::Duration::minutes(minutes);
                    self.time_zone.from_local_datetime(&later).earliest()
                });
                let Some(resumed) = resumed.map(|t| t.with_timezone(&Utc)) else {
                    return wall.and_utc();
                };
                // Minute steps may pass a transition that is not on a whole minute
                // (historic local mean time): take the first second whose wall time has
                // reached the cutoff.
                (1..=60)
                    .rev()
                    .map(|s| resumed - chrono::Duration::seconds(s))
                    .find(|t| self.local_time(t) >= wall)
                    .unwrap_or(resumed)
            }
        }
    }

    /// The business date of an instant.
    pub fn business_date<T: TimeZone>(&self, instant: &DateTime<T>) -> NaiveDate {
        let utc = instant.with_timezone(&Utc);
        let shifted = self.local_time(&utc) - (self.cutoff - NaiveTime::MIN);
        let guess = shifted.date();
        // The wall-clock guess is right except around DST changes near the cutoff;
        // the interval definition settles those.
        if utc < self.day_start(guess) {
            guess - Days::new(1)
        } else if let Some(next) = guess.checked_add_days(Days::new(1))
            && utc >= self.day_start(next)
        {
            next
        } else {
            guess
        }
    }
}

/// The calendars of every operator: a default plus configured exceptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorCalendars {
    default: BusinessCalendar,
    by_operator: std::collections::HashMap<String, BusinessCalendar>,
}

impl Default for OperatorCalendars {
    fn default() -> Self {
        Self::new(BusinessCalendar::default())
    }
}

impl OperatorCalendars {
    /// Every operator uses `default` until [`OperatorCalendars::insert`] says otherwise.
    pub fn new(default: BusinessCalendar) -> Self {
        Self {
            default,
            by_operator: std::collections::HashMap::new(),
        }
    }

    /// Sets one operator's calendar.
    pub fn insert(&mut self, operator_id: String, calendar: BusinessCalendar) {
        self.by_operator.insert(operator_id, calendar);
    }

    /// The calendar of `operator_id`.
    pub fn for_operator(&self, operator_id: &str) -> &BusinessCalendar {
        self.by_operator.get(operator_id).unwrap_or(&self.default)
    }

    /// The calendar of operators without an entry.
    pub fn default_calendar(&self) -> &BusinessCalendar {
        &self.default
    }

    /// The business date in progress at `now` for every operator: the latest as-of date
    /// whose windows every operator has closed (a daily job in a UTC container must not
    /// take the UTC date: at 00:30 in Shanghai it is still yesterday there). Where the
    /// calendars differ (a night market whose day starts at 04:00), the earliest of their
    /// dates: an operator already on the next day gets a complete, older as-of date,
    /// never one whose last day is still open.
    pub fn business_today(&self, now: DateTime<Utc>) -> NaiveDate {
        self.by_operator
            .values()
            .map(|calendar| calendar.business_date(&now))
            .fold(self.default.business_date(&now), NaiveDate::min)
    }
}

/// Business dates and local wall times for a stream of instants that are mostly in
/// order: remembers the last business day's interval (and its UTC offset, when constant)
/// so most lookups are a few comparisons instead of time-zone arithmetic.
#[derive(Debug, Clone)]
pub struct BusinessDateCache {
    calendar: BusinessCalendar,
    current: Option<CachedDay>,
}

#[derive(Debug, Clone, Copy)]
struct CachedDay {
    /// `[start, end)` in UTC microseconds.
    start: i64,
    end: i64,
    date: NaiveDate,
    /// UTC offset in force for the whole interval, if it does not change within it.
    offset_micros: Option<i64>,
}

/// Where an instant falls for an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalPlace {
    /// Business date.
    pub business_date: NaiveDate,
    /// Minutes since local midnight of the wall-clock time (0..1440), in the operator's zone.
    pub minute_of_day: u16,
}

const MICROS_PER_MINUTE: i64 = 60_000_000;
const MICROS_PER_DAY: i64 = 1_440 * MICROS_PER_MINUTE;

impl BusinessDateCache {
    /// A cache over `calendar`.
    pub fn new(calendar: BusinessCalendar) -> Self {
        Self {
            calendar,
            current: None,
        }
    }

    fn offset_micros(&self, utc_micros: i64) -> i64 {
        let instant = DateTime::from_timestamp_micros(utc_micros).unwrap_or_default();
        let local = self.calendar.local_time(&instant);
        (local - instant.naive_utc())
            .num_microseconds()
            .unwrap_or(0)
    }

    fn day_of(&mut self, utc_micros: i64) -> CachedDay {
        if let Some(day) = self.current
            && (day.start..day.end).contains(&utc_micros)
        {
            return day;
        }
        let instant = DateTime::from_timestamp_micros(utc_micros).unwrap_or_default();
        let date = self.calendar.business_date(&instant);
        let start = self.calendar.day_start(date).timestamp_micros();
        let end = date
            .checked_add_days(Days::new(1))
            .map_or(i64::MAX, |next| {
                self.calendar.day_start(next).timestamp_micros()
            });
        let first = self.offset_micros(start);
        let last = self.offset_micros(end.saturating_sub(1));
        let day = CachedDay {
            start,
            end,
            date,
            offset_micros: (first == last).then_some(first),
        };
        self.current = Some(day);
        day
    }

    /// The business date of an instant given in UTC microseconds.
    pub fn business_date(&mut self, utc_micros: i64) -> NaiveDate {
        self.day_of(utc_micros).date
    }

    /// Business date and local minute of day of an instant given in UTC microseconds.
    pub fn locate(&mut self, utc_micros: i64) -> LocalPlace {
        let day = self.day_of(utc_micros);
        let offset = day
            .offset_micros
            .unwrap_or_else(|| self.offset_micros(utc_micros));
        let local = utc_micros + offset;
        LocalPlace {
            business_date: day.date,
            minute_of_day: (local.rem_euclid(MICROS_PER_DAY) / MICROS_PER_MINUTE) as u16,
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, FixedOffset, Timelike};
    use proptest::prelude::*;

    use super::*;

    fn at(text: &str) -> DateTime<FixedOffset> {
        DateTime::parse_from_rfc3339(text).unwrap()
    }

    fn date(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
    }

    /// At 00:30 in Shanghai a UTC clock still says yesterday; the business date is today
    /// there, and yesterday for an operator whose day starts at 04:00.
    #[test]
    fn today_is_the_operators_business_date_not_the_utc_date() {
        let now = at("2026-12-01T16:30:00Z").with_timezone(&Utc); // 00:30 on 12-02 in Shanghai
        assert_eq!(now.date_naive(), date("2026-12-01"));
        let shanghai =
            OperatorCalendars::new(BusinessCalendar::parse("Asia/Shanghai", "00:00").unwrap());
        assert_eq!(shanghai.business_today(now), date("2026-12-02"));
        let mut late_start = shanghai.clone();
        late_start.insert(
            "night-market".into(),
            BusinessCalendar::parse("Asia/Shanghai", "04:00").unwrap(),
        );
        // The night market's 12-01 is still open: the date every operator has closed.
        assert_eq!(late_start.business_today(now), date("2026-12-01"));
        // Once its day has begun, all agree.
        let later = at("2026-12-01T20:00:00Z").with_timezone(&Utc);
        assert_eq!(late_start.business_today(later), date("2026-12-02"));
    }

    #[test]
    fn default_is_shanghai_midnight() {
        let cal = BusinessCalendar::default();
        assert_eq!(
            cal.business_date(&at("2025-09-30T23:59:59+08:00")),
            date("2025-09-30")
        );
        assert_eq!(
            cal.business_date(&at("2025-09-30T16:00:00Z")),
            date("2025-10-01")
        );
        assert_eq!(
            cal.day_start(date("2025-10-01")),
            at("2025-09-30T16:00:00Z")
        );
    }

    #[test]
    fn a_four_o_clock_cutoff_keeps_night_sales_on_the_previous_date() {
        let cal = BusinessCalendar::parse("Asia/Shanghai", "04:00").unwrap();
        assert_eq!(
            cal.business_date(&at("2025-10-02T01:30:00+08:00")),
            date("2025-10-01")
        );
        assert_eq!(
            cal.business_date(&at("2025-10-02T03:59:59+08:00")),
            date("2025-10-01")
        );
        assert_eq!(
            cal.business_date(&at("2025-10-02T04:00:00+08:00")),
            date("2025-10-02")
        );
        // The offset the POS reports does not matter, only the instant.
        assert_eq!(
            cal.business_date(&at("2025-10-01T17:30:00Z")),
            date("2025-10-01")
        );
    }

    #[test]
    fn bad_configuration_is_reported() {
        assert!(matches!(
            BusinessCalendar::parse("Mars/Olympus", "00:00"),
            Err(CalendarError::UnknownTimeZone(_))
        ));
        assert!(matches!(
            BusinessCalendar::parse("Asia/Shanghai", "25:00"),
            Err(CalendarError::BadCutoff(_))
        ));
    }

    #[test]
    fn a_skipped_calendar_day_is_empty() {
        // Samoa skipped 2011-12-30 when it moved across the date line.
        let cal = BusinessCalendar::parse("Pacific/Apia", "00:00").unwrap();
        assert_eq!(
            cal.day_start(date("2011-12-30")),
            cal.day_start(date("2011-12-31"))
        );
        let just_after = cal.day_start(date("2011-12-31")) + Duration::seconds(1);
        assert_eq!(cal.business_date(&just_after), date("2011-12-31"));
    }

    #[test]
    fn the_cache_agrees_with_the_calendar() {
        let cal = BusinessCalendar::parse("America/New_York", "02:30").unwrap();
        let mut cache = BusinessDateCache::new(cal);
        let start = at("2025-03-08T00:00:00Z").timestamp_micros();
        // Every 7 minutes over a DST change, forwards then backwards.
        let instants: Vec<i64> = (0..2_000).map(|i| start + i * 7 * 60 * 1_000_000).collect();
        for &t in instants.iter().chain(instants.iter().rev()) {
            let instant = DateTime::from_timestamp_micros(t).unwrap();
            let expected = cal.business_date(&instant);
            assert_eq!(cache.business_date(t), expected);
            let local = cal.local_time(&instant);
            let place = cache.locate(t);
            assert_eq!(place.business_date, expected);
            assert_eq!(
                u32::from(place.minute_of_day),
                local.hour() * 60 + local.minute(),
                "{instant}"
            );
        }
    }

    const ZONES: [&str; 7] = [
        "Asia/Shanghai",
        "America/New_York",
        "Europe/London",
        "Australia/Lord_Howe",
        "Pacific/Apia",
        "Asia/Kolkata",
        "America/Santiago",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The business days tile the timeline: the date found for an instant is the
        /// one whose interval contains it, and intervals never overlap.
        #[test]
        fn every_instant_has_exactly_one_business_date(
            seconds in 0i64..4_102_444_800, // 1970..2100
            zone in 0usize..ZONES.len(),
            cutoff_minutes in 0u32..24 * 60,
        ) {
            let cutoff = NaiveTime::from_hms_opt(cutoff_minutes / 60, cutoff_minutes % 60, 0).unwrap();
            let cal = BusinessCalendar::parse(ZONES[zone], "00:00").unwrap();
            let cal = BusinessCalendar::new(cal.time_zone(), cutoff);
            let instant = DateTime::from_timestamp(seconds, 0).unwrap();
            let d = cal.business_date(&instant);
            let start = cal.day_start(d);
            let end = cal.day_start(d + Days::new(1));
            prop_assert!(start <= instant && instant < end,
                "{instant} not in [{start}, {end}) of {d} ({cal})");
            prop_assert!(cal.day_start(d - Days::new(1)) <= start);
            // The local date is the business date or the one after (cutoff shifts back).
            let local_date = cal.local_time(&instant).date();
            // The cutoff only moves dates back: the local date is the business date or
            // the next one (two after, only where a zone skipped a day).
            let lag = (local_date - d).num_days();
            prop_assert!((0..=2).contains(&lag), "local {local_date} vs business {d}");
        }

        #[test]
        fn later_instants_never_get_earlier_dates(
            seconds in 0i64..4_102_444_800,
            step in 1i64..200_000,
            zone in 0usize..ZONES.len(),
            cutoff_minutes in 0u32..24 * 60,
        ) {
            let cutoff = NaiveTime::from_hms_opt(cutoff_minutes / 60, cutoff_minutes % 60, 0).unwrap();
            let cal = BusinessCalendar::new(BusinessCalendar::parse(ZONES[zone], "00:00").unwrap().time_zone(), cutoff);
            let a = DateTime::from_timestamp(seconds, 0).unwrap();
            let b = a + Duration::seconds(step);
            prop_assert!(cal.business_date(&a) <= cal.business_date(&b));
        }
    }
}
