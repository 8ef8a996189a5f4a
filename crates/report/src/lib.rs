//! A credit officer's page per merchant: the cash flow behind each stored decision, as
//! one self-contained HTML file with inline SVG charts.
//!
//! Entry point: [`write_report`] reads the stored decisions of a date
//! (`credit::stored_decisions`), picks the merchants to show, reads their feature rows
//! and daily cash flow (`features::stored_features`, `features::daily_cash_flow`), and
//! writes the page with each reason's meaning and the feature values behind it.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::Path;

use chrono::{Datelike, Duration, NaiveDate};
use plotters::prelude::*;
use serde_json::{Map, Value};
use streetflow_core::Channel;
use streetflow_core::money::grouped_yuan as yuan;
use streetflow_credit::Policy;
use streetflow_lake::{Lake, json_int as int, json_text as text};

/// Result with the report's [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The lake refused a read.
    #[error(transparent)]
    Lake(#[from] streetflow_lake::Error),
    /// Reading the stored decisions failed (or there are none for the date).
    #[error(transparent)]
    Credit(#[from] streetflow_credit::Error),
    /// Reading the feature rows or daily cash flow failed.
    #[error(transparent)]
    Features(#[from] streetflow_features::Error),
    /// A merchant asked for has no decision as of the date.
    #[error("no decision for merchant {0}")]
    NoDecision(String),
    /// A chart could not be drawn.
    #[error("drawing a chart: {0}")]
    Chart(String),
    /// The page could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

/// What a report holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportSummary {
    /// (operator, merchant) shown, in page order.
    pub merchants: Vec<(String, String)>,
}

/// One stored decision.
#[derive(Debug, Clone)]
struct DecisionRow {
    operator_id: String,
    merchant_id: String,
    product: String,
    policy_version: String,
    decision: String,
    limit_fen: i64,
    reasons: Vec<String>,
    subsidy_sector: Option<String>,
    subsidy_eligible: bool,
}

/// One merchant-day of silver (money in fen).
#[derive(Debug, Clone, Default)]
struct Day {
    net_fen: i64,
    channels: [i64; Channel::ALL.len()],
}

/// HTML-escapes text.
fn esc(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

async fn load_decisions(lake: &Lake, as_of: NaiveDate) -> Result<Vec<DecisionRow>> {
    Ok(streetflow_credit::stored_decisions(lake, as_of)
        .await?
        .into_iter()
        .map(|record| DecisionRow {
            operator_id: record.decision.operator_id,
            merchant_id: record.decision.merchant_id,
            product: record.product,
            policy_version: record.policy_version,
            decision: record.decision.decision.as_str().to_owned(),
            limit_fen: record.decision.limit_fen,
            reasons: record.decision.reasons,
            subsidy_sector: record.decision.subsidy_sector,
            subsidy_eligible: record.decision.subsidy_eligible,
        })
        .collect())
}

/// The merchants to show: those asked for, or a few of each outcome per product.
fn select(
    decisions: &[DecisionRow],
    asked: &[String],
    top: usize,
) -> Result<Vec<(String, String)>> {
    let mut chosen: Vec<(String, String)> = Vec::new();
    let mut push = |key: (String, String)| {
        if !chosen.contains(&key) {
            chosen.push(key);
        }
    };
    if !asked.is_empty() {
        for wanted in asked {
            let (operator, merchant) = match wanted.split_once('/') {
                Some((o, m)) => (Some(o), m),
                None => (None, wanted.as_str()),
            };
            let found = decisions
                .iter()
                .find(|d| d.merchant_id == merchant && operator.is_none_or(|o| d.operator_id == o));
            let found = found.ok_or_else(|| Error::NoDecision(wanted.clone()))?;
            push((found.operator_id.clone(), found.merchant_id.clone()));
        }
        return Ok(chosen);
    }
    let mut products: Vec<&str> = decisions.iter().map(|d| d.product.as_str()).collect();
    products.dedup();
    for product in products {
        for outcome in ["approve", "refer", "decline"] {
            let mut of: Vec<&DecisionRow> = decisions
                .iter()
                .filter(|d| d.product == product && d.decision == outcome)
                .collect();
            // Largest approvals first; the others in merchant order.
            of.sort_by_key(|d| std::cmp::Reverse(d.limit_fen));
            for d in of.into_iter().take(top) {
                push((d.operator_id.clone(), d.merchant_id.clone()));
            }
        }
    }
    Ok(chosen)
}

type Key = (String, String);

async fn load_features(
    lake: &Lake,
    as_of: NaiveDate,
    merchants: &[Key],
) -> Result<HashMap<Key, Map<String, Value>>> {
    Ok(streetflow_features::stored_features(lake, as_of, merchants)
        .await?
        .into_iter()
        .map(|row| ((text(&row, "operator_id"), text(&row, "merchant_id")), row))
        .collect())
}

async fn load_days(
    lake: &Lake,
    first: NaiveDate,
    as_of: NaiveDate,
    merchants: &[Key],
) -> Result<HashMap<Key, BTreeMap<NaiveDate, Day>>> {
    let mut days: HashMap<Key, BTreeMap<NaiveDate, Day>> = HashMap::new();
    for row in streetflow_features::daily_cash_flow(lake, first, as_of, merchants).await? {
        days.entry((row.operator_id, row.merchant_id))
            .or_default()
            .insert(
                row.business_date,
                Day {
                    net_fen: row.net_fen,
                    channels: row.channel_fen,
                },
            );
    }
    Ok(days)
}

fn plot_error<E: std::fmt::Debug>(error: E) -> Error {
    Error::Chart(format!("{error:?}"))
}

const CHART_FONT: &str = "sans-serif";

/// Daily net turnover of the 365 days before the as-of date, with its trailing 30-day
/// average (days without sales count as zero).
fn daily_chart(days: &BTreeMap<NaiveDate, Day>, as_of: NaiveDate) -> Result<String> {
    let first = as_of - Duration::days(365);
    let series: Vec<f64> = (0..365)
        .map(|i| {
            let date = first + Duration::days(i);
            days.get(&date).map_or(0.0, |d| d.net_fen as f64 / 100.0)
        })
        .collect();
    let average: Vec<(i32, f64)> = (0..series.len())
        .filter(|&i| i >= 29)
        .map(|i| (i as i32, series[i - 29..=i].iter().sum::<f64>() / 30.0))
        .collect();
    let low = series.iter().copied().fold(0.0_f64, f64::min);
    let high = series.iter().copied().fold(1.0_f64, f64::max) * 1.08;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (880, 260)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .caption(
                "Daily net turnover (yuan) and 30-day average",
                (CHART_FONT, 16),
            )
            .x_label_area_size(26)
            .y_label_area_size(64)
            .build_cartesian_2d(0_i32..365, low..high)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(12)
            .x_label_formatter(&|i| {
                (first + Duration::days(i64::from(*i)))
                    .format("%Y-%m")
                    .to_string()
            })
            .y_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series(series.iter().enumerate().map(|(i, v)| {
                let i = i as i32;
                Rectangle::new([(i, 0.0), (i + 1, *v)], RGBColor(92, 142, 200).filled())
            }))
            .map_err(plot_error)?;
        chart
            .draw_series(LineSeries::new(
                average,
                RGBColor(214, 96, 39).stroke_width(2),
            ))
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// Net turnover of the 12 months up to the as-of date's eve, each beside the same month a
/// year before, with the year-over-year change.
fn monthly_chart(days: &BTreeMap<NaiveDate, Day>, as_of: NaiveDate) -> Result<String> {
    let last_day = as_of - Duration::days(1);
    let month_key = |d: NaiveDate| d.year() * 12 + d.month0() as i32;
    let last = month_key(last_day);
    let mut totals: HashMap<i32, i64> = HashMap::new();
    for (date, day) in days {
        *totals.entry(month_key(*date)).or_default() += day.net_fen;
    }
    let months: Vec<i32> = (last - 11..=last).collect();
    let value = |m: i32| totals.get(&m).copied().unwrap_or(0) as f64 / 100.0;
    let high = months
        .iter()
        .flat_map(|&m| [value(m), value(m - 12)])
        .fold(1.0_f64, f64::max)
        * 1.18;
    let low = months
        .iter()
        .flat_map(|&m| [value(m), value(m - 12)])
        .fold(0.0_f64, f64::min);
    let label = |m: i32| format!("{}-{:02}", m.div_euclid(12), m.rem_euclid(12) + 1);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (880, 280)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .caption(
                "Monthly net turnover (yuan): this year (blue) vs a year before (grey)",
                (CHART_FONT, 16),
            )
            .x_label_area_size(26)
            .y_label_area_size(72)
            .build_cartesian_2d(0_i32..(months.len() as i32 * 3), low..high)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(months.len() * 3)
            .x_label_formatter(&|x| {
                if x.rem_euclid(3) == 1 {
                    months
                        .get((x / 3) as usize)
                        .map(|m| label(*m))
                        .unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series(months.iter().enumerate().flat_map(|(i, &m)| {
                let x = i as i32 * 3;
                [
                    Rectangle::new(
                        [(x, 0.0), (x + 1, value(m - 12))],
                        RGBColor(170, 170, 170).filled(),
                    ),
                    Rectangle::new(
                        [(x + 1, 0.0), (x + 2, value(m))],
                        RGBColor(92, 142, 200).filled(),
                    ),
                ]
            }))
            .map_err(plot_error)?;
        chart
            .draw_series(months.iter().enumerate().filter_map(|(i, &m)| {
                let before = value(m - 12);
                (before > 0.0).then(|| {
                    let change = (value(m) / before - 1.0) * 100.0;
                    Text::new(
                        format!("{change:+.0}%"),
                        (i as i32 * 3, value(m).max(before) + (high - low) * 0.04),
                        (CHART_FONT, 12).into_font().color(&if change < 0.0 {
                            RGBColor(190, 40, 40)
                        } else {
                            RGBColor(40, 130, 60)
                        }),
                    )
                })
            }))
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// Share of each payment channel in the 90 days before the as-of date.
fn channel_chart(days: &BTreeMap<NaiveDate, Day>, as_of: NaiveDate) -> Result<String> {
    let first = as_of - Duration::days(90);
    let mut sums = [0_i64; 6];
    for (_, day) in days.range(first..as_of) {
        for (sum, value) in sums.iter_mut().zip(day.channels) {
            *sum += value;
        }
    }
    let total: i64 = sums.iter().sum();
    let shares: Vec<f64> = sums
        .iter()
        .map(|s| {
            if total > 0 {
                *s as f64 * 100.0 / total as f64
            } else {
                0.0
            }
        })
        .collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (880, 220)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .margin(12)
            .caption(
                "Channel mix of sales, last 90 days (% of yuan)",
                (CHART_FONT, 16),
            )
            .x_label_area_size(24)
            .y_label_area_size(100)
            .build_cartesian_2d(0.0_f64..110.0, 0.0_f64..6.0)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(13)
            // One bar per channel in [i + 0.15, i + 0.85]; its name at the tick i + 0.5.
            .y_label_formatter(&|y| {
                let slot = y - 0.5;
                if (slot - slot.round()).abs() < 1e-6 && slot >= 0.0 {
                    Channel::ALL
                        .get(slot.round() as usize)
                        .map(|c| c.as_str().to_owned())
                        .unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .x_label_formatter(&|v| format!("{v:.0}%"))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series(shares.iter().enumerate().map(|(i, share)| {
                let y = i as f64;
                Rectangle::new(
                    [(0.0, y + 0.15), (*share, y + 0.85)],
                    RGBColor(92, 142, 200).filled(),
                )
            }))
            .map_err(plot_error)?;
        chart
            .draw_series(shares.iter().enumerate().map(|(i, share)| {
                Text::new(
                    format!("{share:.1}%  ({} yuan)", yuan(sums[i])),
                    (share + 1.0, i as f64 + 0.75),
                    (CHART_FONT, 12).into_font(),
                )
            }))
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// A feature value as a person reads it.
fn feature_text(value: Option<&Value>, name: &str) -> String {
    match value {
        None | Some(Value::Null) => "—".to_owned(),
        Some(Value::Number(n)) if name.ends_with("_fen") || name.contains("_fen_") => n
            .as_i64()
            .map_or_else(|| n.to_string(), |fen| format!("{} yuan", yuan(fen))),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.3}"),
            _ => n.to_string(),
        },
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Features every page shows, whatever the reasons.
const KEY_FEATURES: [&str; 12] = [
    "net_fen_30d",
    "net_fen_90d",
    "net_fen_365d",
    "active_day_ratio_90d",
    "daily_net_cv_90d",
    "growth_yoy_90d",
    "trend_slope_26w",
    "spike_ratio_30d_180d",
    "refund_ratio_90d",
    "top5_payer_share_90d",
    "months_on_book",
    "coverage_ratio_90d",
];

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:940px;color:#222}\
h1{font-size:22px;margin-bottom:4px}h2{font-size:19px;margin:0}.sub{color:#666;font-size:13px}\
section{border:1px solid #ddd;border-radius:8px;padding:16px 20px;margin:22px 0}\
.decisions{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}\
.card{border:1px solid #ddd;border-radius:6px;padding:10px 12px;flex:1;min-width:260px}\
.badge{display:inline-block;padding:2px 9px;border-radius:10px;color:#fff;font-weight:600;font-size:13px}\
.approve{background:#2e8540}.refer{background:#d08a00}.decline{background:#b3261e}\
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}\
td.num{text-align:right;font-variant-numeric:tabular-nums}ul{margin:6px 0 0 18px;padding:0}li{margin:3px 0}\
.feat{color:#555;font-size:12px}svg{display:block;max-width:100%;height:auto}nav a{margin-right:10px}";

fn decision_card(
    out: &mut String,
    decision: &DecisionRow,
    policies: &BTreeMap<String, Policy>,
    features: Option<&Map<String, Value>>,
) {
    let policy = policies.get(&decision.product);
    let meanings: BTreeMap<&str, &str> = policy
        .map(|p| p.reason_codes().into_iter().collect())
        .unwrap_or_default();
    let _ = write!(
        out,
        "<div class=\"card\"><div><b>{}</b> <span class=\"sub\">policy {}</span></div>\
         <div style=\"margin:6px 0\"><span class=\"badge {}\">{}</span> limit <b>{} yuan</b>{}</div>",
        esc(&decision.product),
        esc(&decision.policy_version),
        esc(&decision.decision),
        esc(&decision.decision),
        yuan(decision.limit_fen),
        match (&decision.subsidy_sector, decision.subsidy_eligible) {
            (Some(sector), true) => format!(" · subsidy sector <b>{}</b> (eligible)", esc(sector)),
            (Some(sector), false) => format!(" · sector {} (not eligible)", esc(sector)),
            (None, _) => String::new(),
        }
    );
    if decision.reasons.is_empty() {
        out.push_str("<div class=\"sub\">no reasons: every rule passed</div>");
    } else {
        out.push_str("<ul>");
        for code in &decision.reasons {
            let behind: Vec<String> = policy
                .map(|p| p.features_of(code))
                .unwrap_or_default()
                .iter()
                .map(|name| {
                    format!(
                        "{} = {}",
                        esc(name),
                        esc(&feature_text(features.and_then(|f| f.get(name)), name))
                    )
                })
                .collect();
            let _ = write!(
                out,
                "<li><code>{}</code> {}{}</li>",
                esc(code),
                esc(meanings.get(code.as_str()).copied().unwrap_or("")),
                if behind.is_empty() {
                    String::new()
                } else {
                    format!("<div class=\"feat\">{}</div>", behind.join(" · "))
                }
            );
        }
        out.push_str("</ul>");
    }
    out.push_str("</div>");
}

/// Writes the report page; returns the merchants it shows.
pub async fn write_report(
    lake: &Lake,
    as_of: NaiveDate,
    asked: &[String],
    top: usize,
    policies: &BTreeMap<String, Policy>,
    out: &Path,
) -> Result<ReportSummary> {
    let decisions = load_decisions(lake, as_of).await?;
    let merchants = select(&decisions, asked, top)?;
    let features = load_features(lake, as_of, &merchants).await?;
    let days = load_days(lake, as_of - Duration::days(800), as_of, &merchants).await?;

    let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for d in &decisions {
        *counts.entry((&d.product, &d.decision)).or_default() += 1;
    }
    let mut html = String::with_capacity(1 << 20);
    let _ = write!(
        html,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>streetflow credit report as of {as_of}</title><style>{STYLE}</style></head><body>\
         <h1>Credit report as of {as_of}</h1>\
         <div class=\"sub\">Decisions from <code>credit_decisions</code>, features from \
         <code>merchant_features</code> as of {as_of}, cash flow from <code>merchant_daily</code> \
         as the lake holds it now. Amounts in yuan.</div>"
    );
    html.push_str("<table style=\"margin-top:12px\"><tr><th>product</th><th>decision</th><th>merchants</th></tr>");
    for ((product, decision), n) in &counts {
        let _ = write!(
            html,
            "<tr><td>{}</td><td><span class=\"badge {}\">{}</span></td><td class=\"num\">{n}</td></tr>",
            esc(product),
            esc(decision),
            esc(decision)
        );
    }
    html.push_str("</table><nav style=\"margin-top:12px\">");
    for (operator, merchant) in &merchants {
        let _ = write!(
            html,
            "<a href=\"#{}-{}\">{}</a>",
            esc(operator),
            esc(merchant),
            esc(merchant)
        );
    }
    html.push_str("</nav>");

    let empty = BTreeMap::new();
    for key in &merchants {
        let (operator, merchant) = key;
        let feature_row = features.get(key);
        let merchant_days = days.get(key).unwrap_or(&empty);
        let _ = write!(
            html,
            "<section id=\"{}-{}\"><h2>{}</h2><div class=\"sub\">operator {} · MCC {} · {} months on book · last sale {} days before the as-of date</div>",
            esc(operator),
            esc(merchant),
            esc(merchant),
            esc(operator),
            esc(&feature_row.map(|f| text(f, "mcc")).unwrap_or_default()),
            feature_row.map_or(0, |f| int(f, "months_on_book")),
            feature_row.map_or_else(|| "—".to_owned(), |f| text(f, "days_since_last_sale")),
        );
        html.push_str("<div class=\"decisions\">");
        for decision in decisions
            .iter()
            .filter(|d| &d.operator_id == operator && &d.merchant_id == merchant)
        {
            decision_card(&mut html, decision, policies, feature_row);
        }
        html.push_str("</div>");
        html.push_str(&daily_chart(merchant_days, as_of)?);
        html.push_str(&monthly_chart(merchant_days, as_of)?);
        html.push_str(&channel_chart(merchant_days, as_of)?);
        html.push_str("<table><tr><th>feature</th><th>value</th></tr>");
        for name in KEY_FEATURES {
            let _ = write!(
                html,
                "<tr><td><code>{name}</code></td><td class=\"num\">{}</td></tr>",
                esc(&feature_text(feature_row.and_then(|f| f.get(name)), name))
            );
        }
        html.push_str("</table></section>");
    }
    html.push_str("</body></html>\n");
    std::fs::write(out, html).map_err(|source| Error::Write {
        path: out.display().to_string(),
        source,
    })?;
    Ok(ReportSummary { merchants })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn days(values: &[(NaiveDate, i64)]) -> BTreeMap<NaiveDate, Day> {
        values
            .iter()
            .map(|(d, net)| {
                (
                    *d,
                    Day {
                        net_fen: *net,
                        channels: [*net, 0, 0, 0, 0, 0],
                    },
                )
            })
            .collect()
    }

    #[test]
    fn charts_are_svg_with_the_year_over_year_change() {
        let as_of = NaiveDate::from_ymd_opt(2026, 3, 1).unwrap_or_default();
        let history = days(&[
            (
                NaiveDate::from_ymd_opt(2025, 2, 10).unwrap_or_default(),
                10_000,
            ),
            (
                NaiveDate::from_ymd_opt(2026, 2, 10).unwrap_or_default(),
                15_000,
            ),
        ]);
        let monthly = monthly_chart(&history, as_of).expect("chart");
        assert!(monthly.starts_with("<svg"), "{monthly}");
        // February 2026 against February 2025: 150 vs 100 yuan.
        assert!(monthly.contains("+50%"), "{monthly}");
        assert!(monthly.contains("2026-02"));
        let channels = channel_chart(&history, as_of).expect("chart");
        assert!(channels.contains("100.0%  (150 yuan)"), "{channels}");
        let daily = daily_chart(&history, as_of).expect("chart");
        assert!(daily.contains("<polyline") || daily.contains("<path"));
    }

    #[test]
    fn text_is_escaped_and_money_reads_as_yuan() {
        assert_eq!(esc("<a href='x'>&"), "&lt;a href=&#39;x&#39;&gt;&amp;");
        assert_eq!(
            feature_text(Some(&Value::from(1_234_500)), "net_fen_90d"),
            "12,345 yuan"
        );
        assert_eq!(
            feature_text(Some(&serde_json::json!(0.12345)), "daily_net_cv_90d"),
            "0.123"
        );
        assert_eq!(feature_text(Some(&Value::Null), "x"), "—");
    }
}
