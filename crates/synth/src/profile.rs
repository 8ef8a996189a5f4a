//! Merchant archetypes: what a café, a night bar or a souvenir shop in a Chinese
//! shopping district sells, when, through which channels, and how the year moves it.
//!
//! Figures are plausible round numbers for a busy pedestrian district (tickets in fen,
//! daily transactions at a typical day), not measurements of any real merchant.

use chrono::{Datelike, NaiveDate};
use streetflow_core::Channel;

/// The kinds of merchant a synthetic district contains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Archetype {
    /// Coffee and pastries, steady all day, weekend peak.
    Cafe,
    /// Lunch and dinner peaks, larger tickets.
    Restaurant,
    /// Many small tickets from early to late.
    ConvenienceStore,
    /// Few, large tickets; weekend and pre-festival shopping.
    Boutique,
    /// Evening to 03:00: sales after midnight belong to the next calendar date.
    NightBar,
    /// Souvenirs: summer, Golden Week and Spring Festival tourism.
    TouristShop,
    /// A restaurant whose turnover decays until it closes within the data.
    Declining,
    /// A boutique that pumps its turnover with round-amount self-payments in the weeks
    /// before it applies for credit.
    Pumping,
}

/// Time-of-day segment: local hours `[from, to)` counted from the calendar day's midnight
/// (24–27 are the small hours of the next day), with a relative weight.
pub(crate) type HourSegment = (u32, u32, f64);

/// The numbers that shape an archetype's turnover.
#[derive(Debug, Clone)]
pub(crate) struct Profile {
    pub(crate) mcc: &'static str,
    pub(crate) industry_code: &'static str,
    pub(crate) ticket_median_fen: f64,
    pub(crate) ticket_sigma: f64,
    pub(crate) daily_transactions: f64,
    pub(crate) hours: &'static [HourSegment],
    /// Monday to Sunday multipliers.
    pub(crate) weekday: [f64; 7],
    /// wechat, alipay, unionpay_qr, bank_card, cash, other.
    pub(crate) channel_weights: [f64; 6],
    pub(crate) monthly_rent_yuan: i64,
    pub(crate) regular_payers: u64,
    pub(crate) repeat_probability: f64,
    pub(crate) refund_probability: f64,
    pub(crate) name_word: &'static str,
}

impl Archetype {
    /// Every archetype, in a fixed order.
    pub const ALL: [Archetype; 8] = [
        Archetype::Cafe,
        Archetype::Restaurant,
        Archetype::ConvenienceStore,
        Archetype::Boutique,
        Archetype::NightBar,
        Archetype::TouristShop,
        Archetype::Declining,
        Archetype::Pumping,
    ];

    /// Stable lowercase name, used in the profiles file.
    pub const fn as_str(self) -> &'static str {
        match self {
            Archetype::Cafe => "cafe",
            Archetype::Restaurant => "restaurant",
            Archetype::ConvenienceStore => "convenience_store",
            Archetype::Boutique => "boutique",
            Archetype::NightBar => "night_bar",
            Archetype::TouristShop => "tourist_shop",
            Archetype::Declining => "declining",
            Archetype::Pumping => "pumping",
        }
    }

    pub(crate) fn profile(self) -> Profile {
        match self {
            Archetype::Cafe => Profile {
                mcc: "5814",
                industry_code: "6232",
                ticket_median_fen: 3_800.0,
                ticket_sigma: 0.35,
                daily_transactions: 110.0,
                hours: &[(8, 11, 3.0), (11, 14, 2.5), (14, 18, 3.0), (18, 21, 1.2)],
                weekday: [0.9, 0.9, 0.95, 0.95, 1.05, 1.35, 1.3],
                channel_weights: [55.0, 33.0, 3.0, 3.0, 4.0, 2.0],
                monthly_rent_yuan: 18_000,
                regular_payers: 300,
                repeat_probability: 0.45,
                refund_probability: 0.005,
                name_word: "Café",
            },
            Archetype::Restaurant | Archetype::Declining => Profile {
                mcc: "5812",
                industry_code: "6210",
                ticket_median_fen: 12_000.0,
                ticket_sigma: 0.6,
                daily_transactions: 70.0,
                hours: &[(11, 14, 5.0), (14, 17, 0.8), (17, 21, 5.0), (21, 22, 0.7)],
                weekday: [0.85, 0.9, 0.9, 0.95, 1.15, 1.3, 1.2],
                channel_weights: [50.0, 35.0, 4.0, 6.0, 4.0, 1.0],
                monthly_rent_yuan: 35_000,
                regular_payers: 250,
                repeat_probability: 0.3,
                refund_probability: 0.008,
                name_word: "Kitchen",
            },
            Archetype::ConvenienceStore => Profile {
                mcc: "5499",
                industry_code: "5213",
                ticket_median_fen: 2_200.0,
                ticket_sigma: 0.7,
                daily_transactions: 220.0,
                hours: &[(7, 10, 2.5), (10, 17, 3.5), (17, 21, 3.0), (21, 23, 1.3)],
                weekday: [1.0, 1.0, 1.0, 1.0, 1.05, 1.1, 1.05],
                channel_weights: [50.0, 38.0, 3.0, 2.0, 6.0, 1.0],
                monthly_rent_yuan: 12_000,
                regular_payers: 500,
                repeat_probability: 0.55,
                refund_probability: 0.003,
                name_word: "Mart",
            },
            Archetype::Boutique | Archetype::Pumping => Profile {
                mcc: "5651",
                industry_code: "5232",
                ticket_median_fen: 42_000.0,
                ticket_sigma: 0.55,
                daily_transactions: 14.0,
                hours: &[(10, 13, 1.5), (13, 18, 3.0), (18, 21, 2.5)],
                weekday: [0.7, 0.8, 0.8, 0.9, 1.1, 1.6, 1.5],
                channel_weights: [40.0, 35.0, 5.0, 15.0, 3.0, 2.0],
                monthly_rent_yuan: 30_000,
                regular_payers: 120,
                repeat_probability: 0.2,
                refund_probability: 0.04,
                name_word: "Atelier",
            },
            Archetype::NightBar => Profile {
                mcc: "5813",
                industry_code: "6233",
                ticket_median_fen: 16_000.0,
                ticket_sigma: 0.5,
                daily_transactions: 45.0,
                hours: &[(19, 22, 2.0), (22, 24, 3.5), (24, 27, 2.5)],
                weekday: [0.6, 0.7, 0.8, 0.9, 1.5, 1.7, 0.9],
                channel_weights: [48.0, 35.0, 3.0, 8.0, 4.0, 2.0],
                monthly_rent_yuan: 28_000,
                regular_payers: 150,
                repeat_probability: 0.35,
                refund_probability: 0.005,
                name_word: "Tavern",
            },
            Archetype::TouristShop => Profile {
                mcc: "5947",
                industry_code: "5246",
                ticket_median_fen: 8_500.0,
                ticket_sigma: 0.7,
                daily_transactions: 35.0,
                hours: &[(9, 12, 2.5), (12, 17, 4.0), (17, 20, 2.0)],
                weekday: [0.8, 0.8, 0.8, 0.85, 1.0, 1.6, 1.5],
                channel_weights: [45.0, 40.0, 6.0, 5.0, 3.0, 1.0],
                monthly_rent_yuan: 20_000,
                regular_payers: 40,
                repeat_probability: 0.05,
                refund_probability: 0.02,
                name_word: "Souvenirs",
            },
        }
    }
}

/// Channels in the order of [`Profile::channel_weights`].
pub(crate) const CHANNELS: [Channel; 6] = [
    Channel::Wechat,
    Channel::Alipay,
    Channel::UnionpayQr,
    Channel::BankCard,
    Channel::Cash,
    Channel::Other,
];

/// First day of the lunar new year (Spring Festival), 2020–2035.
const SPRING_FESTIVAL: [(i32, u32, u32); 16] = [
    (2020, 1, 25),
    (2021, 2, 12),
    (2022, 2, 1),
    (2023, 1, 22),
    (2024, 2, 10),
    (2025, 1, 29),
    (2026, 2, 17),
    (2027, 2, 6),
    (2028, 1, 26),
    (2029, 2, 13),
    (2030, 2, 3),
    (2031, 1, 23),
    (2032, 2, 11),
    (2033, 1, 31),
    (2034, 2, 19),
    (2035, 2, 8),
];

/// Days from the nearest Spring Festival of the date's year, if the year is known.
fn days_from_spring_festival(date: NaiveDate) -> Option<i64> {
    SPRING_FESTIVAL
        .iter()
        .filter_map(|&(y, m, d)| NaiveDate::from_ymd_opt(y, m, d))
        .map(|festival| (date - festival).num_days())
        .min_by_key(|delta| delta.abs())
        .filter(|delta| delta.abs() <= 60)
}

/// Multiplier of expected turnover on `date` from the week and the year.
pub(crate) fn seasonal_factor(archetype: Archetype, profile: &Profile, date: NaiveDate) -> f64 {
    let weekday = profile.weekday[date.weekday().num_days_from_monday() as usize];
    let tourist = archetype == Archetype::TouristShop;
    let mut annual = 1.0;
    let (month, day) = (date.month(), date.day());
    if month == 7 || month == 8 {
        annual *= match archetype {
            Archetype::TouristShop => 2.2,
            Archetype::NightBar => 1.25,
            Archetype::Cafe => 1.2,
            _ => 1.1,
        };
    }
    if month == 10 && day <= 7 {
        annual *= if tourist { 2.5 } else { 1.3 };
    }
    if tourist && (month == 12 || month <= 2) {
        annual *= 0.6;
    }
    match days_from_spring_festival(date) {
        // Most shops close or run short hours over the festival; tourists still come.
        Some(-2..=6) => {
            annual *= match archetype {
                Archetype::TouristShop => 1.6,
                Archetype::ConvenienceStore => 0.6,
                _ => 0.25,
            }
        }
        // New-year shopping.
        Some(-12..=-3) => {
            annual *= match archetype {
                Archetype::Boutique | Archetype::Pumping => 1.4,
                _ => 1.1,
            }
        }
        _ => {}
    }
    weekday * annual
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    #[test]
    fn spring_festival_dips_and_tourism_peaks() {
        let cafe = Archetype::Cafe.profile();
        let shop = Archetype::TouristShop.profile();
        // 2025-01-29 is the first day of the Year of the Snake.
        let festival = seasonal_factor(Archetype::Cafe, &cafe, date(2025, 1, 30));
        let ordinary = seasonal_factor(Archetype::Cafe, &cafe, date(2025, 3, 13));
        assert!(festival < ordinary * 0.5, "{festival} vs {ordinary}");
        let summer = seasonal_factor(Archetype::TouristShop, &shop, date(2025, 7, 16));
        let spring = seasonal_factor(Archetype::TouristShop, &shop, date(2025, 4, 16));
        assert!(summer > spring * 2.0);
    }

    #[test]
    fn channel_mix_is_dominated_by_wechat_and_alipay() {
        for archetype in Archetype::ALL {
            let w = archetype.profile().channel_weights;
            let total: f64 = w.iter().sum();
            assert!((w[0] + w[1]) / total > 0.7, "{archetype:?}");
        }
    }
}
