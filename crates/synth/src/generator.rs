//! The generation loop: day by day, merchant by merchant, into an arrival-ordered stream.
//!
//! Every merchant owns two random streams seeded from the district seed: one for its
//! business (volumes, tickets, times, payers, refunds) and one for delivery faults
//! (lateness, duplicates, malformed messages). Turning faults on therefore never changes
//! the underlying district. Events wait in a min-heap keyed by arrival time; after each
//! calendar day everything that arrived before the next local midnight is written, so
//! the file is in arrival order and late events appear days after their neighbours.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};
use std::io::{self, Write};

use chrono::{Datelike, Days, NaiveDate, Offset, TimeZone, Utc, Weekday};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal, Poisson};
use rand_pcg::Pcg64Mcg;
use streetflow_core::{BusinessCalendar, Channel, EventKind, MerchantRecord, ReasonCode};

use crate::config::GenConfig;
use crate::line::{MerchantText, Record, Reference, write_event, write_malformed};
use crate::output::{DayTruth, MerchantProfile, TruthRow};
use crate::profile::{Archetype, CHANNELS, Profile, seasonal_factor};

const MS_PER_DAY: i64 = 86_400_000;
const MS_PER_HOUR: i64 = 3_600_000;
const VOID_PROBABILITY: f64 = 0.004;
const CLOSED_DAY_PROBABILITY: f64 = 0.015;
const OUTAGE_PROBABILITY: f64 = 0.003;
const ORPHAN_REFUND_PROBABILITY: f64 = 0.003;
const ORPHAN_VOID_PROBABILITY: f64 = 0.0015;

/// Operator names for synthetic districts; more operators get numbered names.
const OPERATOR_NAMES: [&str; 6] = [
    "silverfish-lane",
    "jade-market",
    "lotus-street",
    "drum-tower-walk",
    "willow-arcade",
    "stone-bridge-bazaar",
];

const NAME_WORDS: [&str; 16] = [
    "Lantern",
    "Willow",
    "Jade",
    "Silverfish",
    "Lotus",
    "Red Door",
    "Old Well",
    "Drum Tower",
    "Plum",
    "Bamboo",
    "Stone Bridge",
    "Magpie",
    "Osmanthus",
    "Ginkgo",
    "Crane",
    "Tea Horse",
];

/// Archetype mix of a district, dealt in this order and then shuffled: each block of
/// 24 merchants has one declining and one pumping merchant, and the first eight cover
/// every archetype.
const ARCHETYPE_CYCLE: [Archetype; 24] = [
    Archetype::Cafe,
    Archetype::Restaurant,
    Archetype::ConvenienceStore,
    Archetype::Boutique,
    Archetype::NightBar,
    Archetype::TouristShop,
    Archetype::Declining,
    Archetype::Pumping,
    Archetype::Cafe,
    Archetype::Restaurant,
    Archetype::Restaurant,
    Archetype::ConvenienceStore,
    Archetype::Boutique,
    Archetype::Cafe,
    Archetype::TouristShop,
    Archetype::NightBar,
    Archetype::Restaurant,
    Archetype::Cafe,
    Archetype::ConvenienceStore,
    Archetype::Boutique,
    Archetype::Restaurant,
    Archetype::Cafe,
    Archetype::TouristShop,
    Archetype::Boutique,
];

/// SplitMix64: turns a seed into well-mixed bits (stream seeds, payer tokens).
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn stream(seed: u64, a: u64, b: u64) -> Pcg64Mcg {
    Pcg64Mcg::seed_from_u64(splitmix64(
        seed ^ splitmix64(a.wrapping_mul(0x100_0000_01B3) ^ b),
    ))
}

/// What the generator made, besides the events it wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenSummary {
    /// Lines written (events, duplicates and malformed messages).
    pub lines: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Distinct valid events (sales, refunds, voids).
    pub unique_events: u64,
    /// Sales among them.
    pub sales: u64,
    /// Refunds among them (including orphans).
    pub refunds: u64,
    /// Voids among them (including orphans).
    pub voids: u64,
    /// Refunds whose sale is not in the feed.
    pub orphan_refunds: u64,
    /// Voids whose sale is not in the feed.
    pub orphan_voids: u64,
    /// Extra deliveries of valid events.
    pub duplicates: u64,
    /// Valid events delivered 1–10 days after they occurred.
    pub late: u64,
    /// Malformed messages injected, by the reason the decoder must give.
    pub malformed: BTreeMap<ReasonCode, u64>,
}

impl GenSummary {
    /// Malformed messages in all.
    pub fn malformed_total(&self) -> u64 {
        self.malformed.values().sum()
    }
}

/// Everything a generation run knows.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Counts of what was written.
    pub summary: GenSummary,
    /// The merchant registry.
    pub registry: Vec<MerchantRecord>,
    /// Each merchant's archetype and story.
    pub profiles: Vec<MerchantProfile>,
    /// Exact expected daily figures per (operator, merchant, business date), sorted.
    pub truth: Vec<TruthRow>,
}

/// Generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// The settings are inconsistent; every problem is listed.
    #[error("invalid generator settings: {}", .0.join("; "))]
    InvalidConfig(Vec<String>),
    /// Writing the events failed.
    #[error("writing events: {0}")]
    Io(#[from] io::Error),
}

/// Per-day constants shared by all merchants.
struct DayContext {
    index: u32,
    date: NaiveDate,
    /// UTC ms of local midnight starting `date`.
    midnight_ms: i64,
    /// UTC offset in force from this midnight to the one two days later, if constant.
    offset_secs: Option<i32>,
    /// Business-day starts (UTC ms) of `date − 1 ..= date + 3`.
    business_starts: [(NaiveDate, i64); 5],
}

impl DayContext {
    fn new(calendar: &BusinessCalendar, index: u32, date: NaiveDate) -> Self {
        let tz = calendar.time_zone();
        let midnight = |d: NaiveDate| calendar_midnight_ms(calendar, d);
        let midnight_ms = midnight(date);
        let offset_at = |ms: i64| {
            let instant = Utc.timestamp_millis_opt(ms).single().unwrap_or_default();
            tz.offset_from_utc_datetime(&instant.naive_utc())
                .fix()
                .local_minus_utc()
        };
        let end_ms = midnight(date + Days::new(2)) - 1;
        let first = offset_at(midnight_ms);
        let offset_secs = (first == offset_at(end_ms)).then_some(first);
        let business_starts = std::array::from_fn(|i| {
            let d = date - Days::new(1) + Days::new(i as u64);
            (d, calendar.day_start(d).timestamp_millis())
        });
        Self {
            index,
            date,
            midnight_ms,
            offset_secs,
            business_starts,
        }
    }

    fn offset_at(&self, calendar: &BusinessCalendar, ms: i64) -> i32 {
        self.offset_secs.unwrap_or_else(|| offset_of(calendar, ms))
    }

    fn business_date(&self, calendar: &BusinessCalendar, ms: i64) -> NaiveDate {
        let starts = &self.business_starts;
        if ms >= starts[0].1
            && ms < starts[4].1
            && let Some((d, _)) = starts.iter().rev().find(|(_, start)| *start <= ms)
        {
            return *d;
        }
        business_date_of(calendar, ms)
    }
}

fn offset_of(calendar: &BusinessCalendar, ms: i64) -> i32 {
    let instant = Utc.timestamp_millis_opt(ms).single().unwrap_or_default();
    calendar
        .time_zone()
        .offset_from_utc_datetime(&instant.naive_utc())
        .fix()
        .local_minus_utc()
}

fn business_date_of(calendar: &BusinessCalendar, ms: i64) -> NaiveDate {
    let instant = Utc.timestamp_millis_opt(ms).single().unwrap_or_default();
    calendar.business_date(&instant)
}

/// UTC ms of the first instant of local calendar day `date` (not the business cutoff).
fn calendar_midnight_ms(calendar: &BusinessCalendar, date: NaiveDate) -> i64 {
    BusinessCalendar::new(calendar.time_zone(), chrono::NaiveTime::MIN)
        .day_start(date)
        .timestamp_millis()
}

/// A message waiting for its arrival time.
struct Pending {
    arrival_ms: i64,
    order: u64,
    record: Record,
    malformed: Option<ReasonCode>,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    // Reversed: BinaryHeap is a max-heap and we want the earliest arrival first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.arrival_ms, other.order).cmp(&(self.arrival_ms, self.order))
    }
}

/// Fault injection and the arrival-ordered writer.
struct Emitter<W: Write> {
    heap: BinaryHeap<Pending>,
    order: u64,
    out: W,
    line: Vec<u8>,
    texts: Vec<MerchantText>,
    duplicate_rate: f64,
    late_rate: f64,
    malformed_rate: f64,
    malformed_reasons: Vec<(ReasonCode, f64)>,
    malformed_weight: f64,
    summary: GenSummary,
}

impl<W: Write> Emitter<W> {
    fn push(&mut self, arrival_ms: i64, record: Record, malformed: Option<ReasonCode>) {
        self.order += 1;
        self.heap.push(Pending {
            arrival_ms,
            order: self.order,
            record,
            malformed,
        });
    }

    /// Queues a valid event and whatever faults the fault stream decides for it.
    fn offer(&mut self, record: Record, faults: &mut Pcg64Mcg) {
        self.summary.unique_events += 1;
        let arrival = if faults.random::<f64>() < self.late_rate {
            self.summary.late += 1;
            record.occurred_ms + faults.random_range(MS_PER_DAY..10 * MS_PER_DAY)
        } else {
            record.occurred_ms + faults.random_range(0..3_000)
        };
        self.push(arrival, record, None);
        if faults.random::<f64>() < self.duplicate_rate {
            self.summary.duplicates += 1;
            // Mostly POS retries within seconds, sometimes a replay days later.
            let delay = if faults.random::<f64>() < 0.8 {
                faults.random_range(1_000..120_000)
            } else {
                faults.random_range(MS_PER_DAY..7 * MS_PER_DAY)
            };
            self.push(arrival + delay, record, None);
        }
        if faults.random::<f64>() < self.malformed_rate {
            let mut pick = faults.random::<f64>() * self.malformed_weight;
            let reason = self
                .malformed_reasons
                .iter()
                .find(|(_, w)| {
                    pick -= w;
                    pick < 0.0
                })
                .or(self.malformed_reasons.last())
                .map_or(ReasonCode::InvalidJson, |(r, _)| *r);
            *self.summary.malformed.entry(reason).or_default() += 1;
            self.push(arrival + 1, record, Some(reason));
        }
    }

    /// Writes every message that arrived before `until_ms`.
    fn drain_before(&mut self, until_ms: i64) -> io::Result<()> {
        while self.heap.peek().is_some_and(|p| p.arrival_ms < until_ms) {
            if let Some(pending) = self.heap.pop() {
                self.write(&pending)?;
            }
        }
        Ok(())
    }

    fn write(&mut self, pending: &Pending) -> io::Result<()> {
        self.line.clear();
        let text = &self.texts[pending.record.merchant as usize];
        match pending.malformed {
            None => write_event(&mut self.line, text, &pending.record),
            Some(reason) => write_malformed(
                &mut self.line,
                text,
                &pending.record,
                reason,
                pending.arrival_ms,
            ),
        }
        self.out.write_all(&self.line)?;
        self.summary.lines += 1;
        self.summary.bytes += self.line.len() as u64;
        Ok(())
    }
}

/// One merchant's state.
struct Merchant {
    index: u32,
    operator: usize,
    archetype: Archetype,
    profile: Profile,
    rng: Pcg64Mcg,
    faults: Pcg64Mcg,
    hour_weights_total: f64,
    volume_scale: f64,
    ticket_log_median: f64,
    growth_per_day: f64,
    opened_day: i64,
    decline_from_day: Option<u32>,
    closes_day: Option<u32>,
    pumping_from_day: Option<u32>,
    closed_on_mondays: bool,
    terminals: u8,
    next_seq: u64,
    next_orphan: u64,
    /// Indexed by business date − (start − 1).
    truth: Vec<DayTruth>,
}

/// Context for a merchant's day: everything read-only.
struct District<'a> {
    config: &'a GenConfig,
    end: NaiveDate,
    outages: &'a [Vec<bool>],
    day_noise: LogNormal<f64>,
}

impl Merchant {
    fn truth_mut(&mut self, start: NaiveDate, date: NaiveDate) -> Option<&mut DayTruth> {
        let index = (date - (start - Days::new(1))).num_days();
        usize::try_from(index)
            .ok()
            .and_then(|i| self.truth.get_mut(i))
    }

    fn record(
        &mut self,
        kind: EventKind,
        amount_fen: i64,
        occurred_ms: i64,
        offset_secs: i32,
    ) -> Record {
        self.next_seq += 1;
        let channel = self.pick_channel();
        Record {
            merchant: self.index,
            seq: self.next_seq,
            kind,
            amount_fen,
            occurred_ms,
            offset_secs,
            channel,
            terminal: self.rng.random_range(1..=self.terminals),
            reference: Reference::None,
            payer: None,
        }
    }

    fn pick_channel(&mut self) -> Channel {
        let weights = self.profile.channel_weights;
        let mut pick = self.rng.random::<f64>() * weights.iter().sum::<f64>();
        for (channel, w) in CHANNELS.iter().zip(weights) {
            pick -= w;
            if pick < 0.0 {
                return *channel;
            }
        }
        Channel::Wechat
    }

    fn pick_payer(&mut self, channel: Channel) -> Option<u64> {
        if channel == Channel::Cash {
            return None;
        }
        if self.rng.random::<f64>() < self.profile.repeat_probability {
            // Regulars: a few come very often (u² skews towards low indices).
            let u: f64 = self.rng.random();
            let k = (u * u * self.profile.regular_payers as f64) as u64;
            Some((u64::from(self.index) << 24) | k)
        } else {
            Some(self.rng.random::<u64>() | (1 << 63))
        }
    }

    fn sample_time_ms(&mut self, day: &DayContext) -> i64 {
        let mut pick = self.rng.random::<f64>() * self.hour_weights_total;
        let segment = self
            .profile
            .hours
            .iter()
            .find(|(_, _, w)| {
                pick -= w;
                pick < 0.0
            })
            .or(self.profile.hours.last())
            .copied()
            .unwrap_or((12, 13, 1.0));
        let (from, to, _) = segment;
        let span_ms = i64::from(to - from) * MS_PER_HOUR;
        day.midnight_ms + i64::from(from) * MS_PER_HOUR + self.rng.random_range(0..span_ms)
    }

    fn sample_ticket_fen(&mut self) -> i64 {
        let normal: f64 = rand_distr::StandardNormal.sample(&mut self.rng);
        let raw = (self.ticket_log_median + self.profile.ticket_sigma * normal).exp();
        // Menu prices: mostly whole yuan, some half yuan, some exact after discounts.
        let step = match self.rng.random::<f64>() {
            u if u < 0.75 => 100.0,
            u if u < 0.9 => 50.0,
            _ => 1.0,
        };
        let fen = ((raw / step).round() * step) as i64;
        fen.clamp(100, streetflow_core::money::MAX_EVENT_AMOUNT_FEN)
    }

    fn generate_day<W: Write>(
        &mut self,
        district: &District<'_>,
        day: &DayContext,
        emitter: &mut Emitter<W>,
    ) {
        let d = day.index;
        if i64::from(d) < self.opened_day
            || self.closes_day.is_some_and(|c| d > c)
            || district.outages[self.operator][d as usize]
        {
            return;
        }
        let closed_today = self.rng.random::<f64>() < CLOSED_DAY_PROBABILITY
            || (self.closed_on_mondays && day.date.weekday() == Weekday::Mon);
        if !closed_today {
            let mut expected = self.profile.daily_transactions
                * self.volume_scale
                * seasonal_factor(self.archetype, &self.profile, day.date)
                * (self.growth_per_day * f64::from(d)).exp()
                * district.day_noise.sample(&mut self.rng);
            if let Some(from) = self.decline_from_day
                && d >= from
            {
                expected *= (-(f64::from(d - from)) / 45.0).exp();
            }
            let count = Poisson::new(expected.max(0.01))
                .map(|p| p.sample(&mut self.rng) as u64)
                .unwrap_or(0);
            for _ in 0..count {
                let occurred = self.sample_time_ms(day);
                let amount = self.sample_ticket_fen();
                self.sale(district, day, amount, occurred, None, emitter);
            }
            if let Some(from) = self.pumping_from_day
                && d >= from
            {
                self.pump(district, day, emitter);
            }
        }
        self.orphans(district, day, emitter);
    }

    /// Round-amount self-payments from the owner's own accounts.
    fn pump<W: Write>(
        &mut self,
        district: &District<'_>,
        day: &DayContext,
        emitter: &mut Emitter<W>,
    ) {
        const ROUND_AMOUNTS_FEN: [i64; 6] = [20_000, 50_000, 100_000, 200_000, 300_000, 500_000];
        let extra = Poisson::new(4.0)
            .map(|p| p.sample(&mut self.rng) as u64)
            .unwrap_or(0);
        for _ in 0..extra {
            let amount = ROUND_AMOUNTS_FEN[self.rng.random_range(0..ROUND_AMOUNTS_FEN.len())];
            // Often late at night, after the shop has closed.
            let occurred = if self.rng.random::<f64>() < 0.5 {
                day.midnight_ms + 23 * MS_PER_HOUR + self.rng.random_range(0..MS_PER_HOUR)
            } else {
                self.sample_time_ms(day)
            };
            let owner_account =
                (u64::from(self.index) << 24) | 0xFF_FF00 | self.rng.random_range(0..3);
            self.sale(
                district,
                day,
                amount,
                occurred,
                Some(owner_account),
                emitter,
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn sale<W: Write>(
        &mut self,
        district: &District<'_>,
        day: &DayContext,
        amount_fen: i64,
        occurred_ms: i64,
        owner_account: Option<u64>,
        emitter: &mut Emitter<W>,
    ) {
        let calendar = &district.config.calendar;
        let start = district.config.start;
        let offset = day.offset_at(calendar, occurred_ms);
        let mut sale = self.record(EventKind::Sale, amount_fen, occurred_ms, offset);
        if let Some(account) = owner_account {
            sale.channel = if self.rng.random::<f64>() < 0.5 {
                Channel::Wechat
            } else {
                Channel::Alipay
            };
            sale.payer = Some(account);
        } else {
            sale.payer = self.pick_payer(sale.channel);
        }
        let sale_date = day.business_date(calendar, occurred_ms);
        if let Some(t) = self.truth_mut(start, sale_date) {
            t.sales_count += 1;
            t.sales_fen += amount_fen;
        }
        emitter.summary.sales += 1;
        emitter.offer(sale, &mut self.faults);

        let u: f64 = self.rng.random();
        if u < VOID_PROBABILITY {
            let void_ms = occurred_ms + self.rng.random_range(30_000..600_000);
            let mut void = self.record(
                EventKind::Void,
                amount_fen,
                void_ms,
                day.offset_at(calendar, void_ms),
            );
            void.channel = sale.channel;
            void.terminal = sale.terminal;
            void.payer = sale.payer;
            void.reference = Reference::Sale(sale.seq);
            if let Some(t) = self.truth_mut(start, sale_date) {
                t.sales_count -= 1;
                t.sales_fen -= amount_fen;
                t.void_count += 1;
            }
            emitter.summary.voids += 1;
            emitter.offer(void, &mut self.faults);
        } else if u < VOID_PROBABILITY + self.profile.refund_probability {
            let refund_ms = occurred_ms
                + self.rng.random_range(1..=14) * MS_PER_DAY
                + self.rng.random_range(0..2 * MS_PER_HOUR);
            let partial = self.rng.random::<f64>() < 0.3;
            let refund_fen = if partial {
                // 20–90 % of the ticket, whole yuan, at least one fen.
                ((amount_fen * self.rng.random_range(20..=90) / 100) / 100 * 100).max(1)
            } else {
                amount_fen
            };
            let refund_date = business_date_of(calendar, refund_ms);
            let local_day = (refund_ms - day.midnight_ms).div_euclid(MS_PER_DAY);
            let refund_day = i64::from(day.index) + local_day;
            // Refunds after the data ends, on days the feed was down or after the shop
            // closed are never delivered, so they are not in the truth either.
            let delivered = refund_date < district.end
                && usize::try_from(refund_day)
                    .ok()
                    .and_then(|i| district.outages[self.operator].get(i))
                    .is_some_and(|down| !down)
                && self.closes_day.is_none_or(|c| refund_day <= i64::from(c));
            if delivered {
                let mut refund = self.record(
                    EventKind::Refund,
                    refund_fen,
                    refund_ms,
                    offset_of(calendar, refund_ms),
                );
                refund.channel = sale.channel;
                refund.payer = sale.payer;
                refund.reference = Reference::Sale(sale.seq);
                if let Some(t) = self.truth_mut(start, refund_date) {
                    t.refund_count += 1;
                    t.refund_fen += refund_fen;
                }
                emitter.summary.refunds += 1;
                emitter.offer(refund, &mut self.faults);
            }
        }
    }

    /// Refunds of sales from before the feed began, and voids of sales whose message was
    /// lost: kept and counted downstream, never matched.
    fn orphans<W: Write>(
        &mut self,
        district: &District<'_>,
        day: &DayContext,
        emitter: &mut Emitter<W>,
    ) {
        let calendar = &district.config.calendar;
        let start = district.config.start;
        for (kind, probability) in [
            (EventKind::Refund, ORPHAN_REFUND_PROBABILITY),
            (EventKind::Void, ORPHAN_VOID_PROBABILITY),
        ] {
            if self.rng.random::<f64>() >= probability {
                continue;
            }
            let occurred = self.sample_time_ms(day);
            let amount = self.sample_ticket_fen();
            let mut record = self.record(kind, amount, occurred, day.offset_at(calendar, occurred));
            record.payer = self.pick_payer(record.channel);
            self.next_orphan += 1;
            let orphan = self.next_orphan;
            let date = day.business_date(calendar, occurred);
            let truth = self.truth_mut(start, date);
            match kind {
                EventKind::Refund => {
                    record.reference = Reference::BeforeFeed(orphan);
                    if let Some(t) = truth {
                        t.refund_count += 1;
                        t.refund_fen += amount;
                        t.orphan_refund_count += 1;
                    }
                    emitter.summary.refunds += 1;
                    emitter.summary.orphan_refunds += 1;
                }
                _ => {
                    record.reference = Reference::Lost(orphan);
                    if let Some(t) = truth {
                        t.orphan_void_count += 1;
                    }
                    emitter.summary.voids += 1;
                    emitter.summary.orphan_voids += 1;
                }
            }
            emitter.offer(record, &mut self.faults);
        }
    }
}

/// Generates a district and writes its events, as JSON Lines in arrival order, to `out`.
pub fn generate<W: Write>(config: &GenConfig, out: W) -> Result<Generated, GenError> {
    config.validate().map_err(GenError::InvalidConfig)?;
    let calendar = config.calendar;
    let start = config.start;
    let end = start + Days::new(u64::from(config.days));

    let operator_ids: Vec<String> = (0..config.operators as usize)
        .map(|i| match OPERATOR_NAMES.get(i) {
            Some(name) => (*name).to_owned(),
            None => format!("district-{:02}", i + 1),
        })
        .collect();

    let mut setup = stream(config.seed, u64::MAX, 0);
    let mut archetypes: Vec<Archetype> = (0..config.merchants as usize)
        .map(|i| ARCHETYPE_CYCLE[i % ARCHETYPE_CYCLE.len()])
        .collect();
    // Shuffle (Fisher–Yates) so archetypes do not follow merchant numbers.
    for i in (1..archetypes.len()).rev() {
        archetypes.swap(i, setup.random_range(0..=i));
    }

    // Feed outages: whole days on which an operator delivered nothing.
    let outages: Vec<Vec<bool>> = (0..config.operators)
        .map(|op| {
            let mut rng = stream(config.seed, u64::MAX - 1, u64::from(op));
            let mut days = vec![false; config.days as usize + 16];
            let mut d = 0;
            while d < config.days as usize {
                if rng.random::<f64>() < OUTAGE_PROBABILITY {
                    let length = rng.random_range(1..=2);
                    for slot in days.iter_mut().skip(d).take(length) {
                        *slot = true;
                    }
                    d += length;
                }
                d += 1;
            }
            days
        })
        .collect();

    let mut merchants = Vec::with_capacity(config.merchants as usize);
    let mut texts = Vec::with_capacity(config.merchants as usize);
    let mut registry = Vec::with_capacity(config.merchants as usize);
    let mut profiles = Vec::with_capacity(config.merchants as usize);
    for (index, archetype) in archetypes.into_iter().enumerate() {
        let index = index as u32;
        let operator = (index % config.operators) as usize;
        let merchant_id = format!("m{:04}", index / config.operators + 1);
        let mut rng = stream(config.seed, u64::from(index), 1);
        let faults = stream(config.seed, u64::from(index), 2);
        let profile = archetype.profile();
        let days = config.days;
        let story_merchant = matches!(archetype, Archetype::Declining | Archetype::Pumping);
        // Most shops predate the data; some open during it (never the story merchants,
        // whose story needs history).
        let opened_day: i64 = if story_merchant || rng.random::<f64>() < 0.85 {
            -rng.random_range(200..3_000)
        } else {
            rng.random_range(0..=i64::from(days) * 6 / 10)
        };
        let (decline_from_day, closes_day) = if archetype == Archetype::Declining {
            let from = days * 35 / 100;
            let close = (from + 120)
                .min(days.saturating_sub((days / 10).max(7)))
                .max(from + 1);
            (Some(from), Some(close.min(days.saturating_sub(1))))
        } else {
            (None, None)
        };
        let pumping_from_day =
            (archetype == Archetype::Pumping).then(|| days.saturating_sub((days / 8).clamp(7, 45)));
        let log_normal_scale = |rng: &mut Pcg64Mcg, sigma: f64| {
            let n: f64 = rand_distr::StandardNormal.sample(rng);
            (sigma * n).exp()
        };
        let volume_scale = log_normal_scale(&mut rng, 0.35) * config.activity;
        let ticket_scale = log_normal_scale(&mut rng, 0.2);
        let growth_noise: f64 = rand_distr::StandardNormal.sample(&mut rng);
        let growth = 0.06 + 0.12 * growth_noise;
        let closed_on_mondays = archetype == Archetype::Boutique && rng.random::<f64>() < 0.3;
        let terminals = rng.random_range(1..=3);
        let opened_on = start + chrono::Duration::days(opened_day);
        let name = format!(
            "{} {} {}",
            NAME_WORDS[rng.random_range(0..NAME_WORDS.len())],
            profile.name_word,
            index + 1
        );
        let monthly_rent_fen = (rng.random::<f64>() < 0.8).then(|| {
            let yuan = profile.monthly_rent_yuan as f64 * rng.random_range(0.7..1.4);
            (yuan / 100.0).round() as i64 * 100 * 100
        });
        let lease_years = if rng.random::<f64>() < 0.5 { 3 } else { 5 };
        // Leases run in whole terms from the opening date; show the one in force at
        // the start of the data (or the first, for shops that open later).
        let term = chrono::Months::new(12 * lease_years);
        let mut lease_end = opened_on.checked_add_months(term).unwrap_or(end);
        while lease_end <= start {
            lease_end = lease_end.checked_add_months(term).unwrap_or(end);
        }
        let industry_code = (rng.random::<f64>() < 0.7).then(|| profile.industry_code.to_owned());
        let day_of = |d: u32| start + Days::new(u64::from(d));
        registry.push(MerchantRecord {
            operator_id: operator_ids[operator].clone(),
            merchant_id: merchant_id.clone(),
            name,
            mcc: profile.mcc.to_owned(),
            industry_code,
            opened_on,
            monthly_rent_fen,
            lease_end: Some(lease_end),
            valid_from: opened_on,
            recorded_at: None,
        });
        profiles.push(MerchantProfile {
            operator_id: operator_ids[operator].clone(),
            merchant_id: merchant_id.clone(),
            archetype: archetype.as_str(),
            opened_on,
            closes_on: closes_day.map(day_of),
            pumping_from: pumping_from_day.map(day_of),
        });
        texts.push(MerchantText::new(
            operator_ids[operator].clone(),
            merchant_id,
        ));
        merchants.push(Merchant {
            index,
            operator,
            archetype,
            hour_weights_total: profile.hours.iter().map(|(_, _, w)| w).sum(),
            ticket_log_median: (profile.ticket_median_fen * ticket_scale).ln(),
            profile,
            rng,
            faults,
            volume_scale,
            growth_per_day: growth / 365.0,
            opened_day,
            decline_from_day,
            closes_day,
            pumping_from_day,
            closed_on_mondays,
            terminals,
            next_seq: 0,
            next_orphan: 0,
            truth: vec![DayTruth::default(); config.days as usize + 2],
        });
    }

    let mut malformed_reasons: Vec<(ReasonCode, f64)> = ReasonCode::all()
        .into_iter()
        // Oversized messages are 70 KB each: keep them rare so files stay small.
        .map(|r| {
            (
                r,
                if r == ReasonCode::Oversized {
                    0.05
                } else {
                    1.0
                },
            )
        })
        .collect();
    malformed_reasons.sort_by_key(|(r, _)| *r);
    let mut emitter = Emitter {
        heap: BinaryHeap::new(),
        order: 0,
        out,
        line: Vec::with_capacity(512),
        texts,
        duplicate_rate: config.duplicate_rate,
        late_rate: config.late_rate,
        malformed_rate: config.malformed_rate,
        malformed_weight: malformed_reasons.iter().map(|(_, w)| w).sum(),
        malformed_reasons,
        summary: GenSummary::default(),
    };
    let district = District {
        config,
        end,
        outages: &outages,
        day_noise: LogNormal::new(0.0, 0.18)
            .map_err(|e| GenError::InvalidConfig(vec![e.to_string()]))?,
    };

    for index in 0..config.days {
        let date = start + Days::new(u64::from(index));
        let day = DayContext::new(&calendar, index, date);
        for merchant in &mut merchants {
            merchant.generate_day(&district, &day, &mut emitter);
        }
        // Nothing generated later can arrive before the next local midnight.
        emitter.drain_before(calendar_midnight_ms(&calendar, date + Days::new(1)))?;
    }
    emitter.drain_before(i64::MAX)?;
    emitter.out.flush()?;

    let mut truth = Vec::new();
    for merchant in &merchants {
        let text = &emitter.texts[merchant.index as usize];
        for (offset, day) in merchant.truth.iter().enumerate() {
            if !day.is_empty() {
                let date = start - Days::new(1) + Days::new(offset as u64);
                truth.push(TruthRow::new(
                    &text.operator_id,
                    &text.merchant_id,
                    date,
                    day,
                ));
            }
        }
    }
    truth.sort_by(|a, b| {
        (&a.operator_id, &a.merchant_id, a.business_date).cmp(&(
            &b.operator_id,
            &b.merchant_id,
            b.business_date,
        ))
    });

    Ok(Generated {
        summary: emitter.summary,
        registry,
        profiles,
        truth,
    })
}
