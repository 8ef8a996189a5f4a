//! Generator settings.

use chrono::NaiveDate;
use streetflow_core::BusinessCalendar;

/// What district to generate. The same settings always give the same bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct GenConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Merchants across all operators.
    pub merchants: u32,
    /// Calendar days of turnover.
    pub days: u32,
    /// First calendar day (local to the calendar's zone).
    pub start: NaiveDate,
    /// District operators; merchants are dealt to them in turn.
    pub operators: u32,
    /// Probability that an event is delivered again (POS retry or replay).
    pub duplicate_rate: f64,
    /// Probability that an event arrives 1–10 days after it occurred.
    pub late_rate: f64,
    /// Probability that an event is followed by one malformed message (a mix of every
    /// reason code).
    pub malformed_rate: f64,
    /// Business calendar of every operator (zone and day cutoff).
    pub calendar: BusinessCalendar,
    /// Multiplies every merchant's typical daily sales (1.0: the archetypes' own figures;
    /// 0.03: a sparse feed of a few sales a day).
    pub activity: f64,
}

impl Default for GenConfig {
    fn default() -> Self {
        Self {
            seed: 7,
            merchants: 120,
            days: 365,
            start: NaiveDate::from_ymd_opt(2025, 1, 1).unwrap_or_default(),
            operators: 1,
            duplicate_rate: 0.0,
            late_rate: 0.0,
            malformed_rate: 0.0,
            calendar: BusinessCalendar::default(),
            activity: 1.0,
        }
    }
}

impl GenConfig {
    /// Checks every setting and reports all problems at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.merchants == 0 {
            problems.push("merchants must be at least 1".to_owned());
        }
        if self.days == 0 {
            problems.push("days must be at least 1".to_owned());
        }
        if self.operators == 0 {
            problems.push("operators must be at least 1".to_owned());
        }
        if self.operators > self.merchants {
            problems.push(format!(
                "operators ({}) must not exceed merchants ({})",
                self.operators, self.merchants
            ));
        }
        if !(self.activity > 0.0 && self.activity <= 100.0) {
            problems.push(format!(
                "activity must be above 0 and at most 100, got {}",
                self.activity
            ));
        }
        if self.merchants > 999_999 {
            problems.push("merchants must be at most 999999".to_owned());
        }
        for (name, rate) in [
            ("duplicate-rate", self.duplicate_rate),
            ("late-rate", self.late_rate),
            ("malformed-rate", self.malformed_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                problems.push(format!("{name} must be between 0 and 1, got {rate}"));
            }
        }
        if self
            .start
            .checked_add_days(chrono::Days::new(u64::from(self.days) + 2))
            .is_none()
        {
            problems.push("start + days is beyond the calendar".to_owned());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}
