//! The shipped term-loan policy on the synthetic district: the merchant that pumps its
//! turnover before applying and the one whose trade is dying are not approved, with the
//! reasons named; re-running gives identical rows.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

use chrono::{Days, Duration, Utc};
use streetflow_core::OperatorCalendars;
use streetflow_core::tables::{CREDIT_DECISIONS, DEAD_LETTERS, POS_EVENTS};
use streetflow_credit::{Outcome, Policy, decide};
use streetflow_features::{AsOf, FeatureInputs, write_features};
use streetflow_ingest::{DeadLetterRows, EventRows, Origin, RowAppender};
use streetflow_lake::arrow::util::pretty::pretty_format_batches;
use streetflow_lake::{Lake, OffsetWriter};
use streetflow_synth::{GenConfig, generate};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pumping_and_declining_merchants_are_not_approved() {
    // 24 merchants: one block of the archetype cycle, with one pumping and one declining.
    let config = GenConfig {
        merchants: 24,
        days: 200,
        ..GenConfig::default()
    };
    let mut events = Vec::new();
    let generated = generate(&config, &mut events).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::new(dir.path().to_str().unwrap(), &Default::default()).unwrap();

    // Bronze, as a batch load would write it (the ingest path's decoder and rows).
    let started = std::time::Instant::now();
    let mut timings = Vec::new();
    // Loaded a day ago (asserted), so that an hour later is settled knowledge.
    let loaded_at = Utc::now() - Duration::days(1);
    let mut appender = RowAppender::new(Default::default(), OperatorCalendars::default());
    let (mut rows, mut dead) = (EventRows::default(), DeadLetterRows::default());
    let mut table = OffsetWriter::new(&lake, &POS_EVENTS, "test").await.unwrap();
    for (i, line) in events.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let origin = Origin::File {
            path: "district.jsonl",
            line: i as i64 + 1,
        };
        appender.append(
            &mut rows,
            &mut dead,
            Some(line),
            None,
            loaded_at,
            streetflow_core::Knowledge::Asserted(loaded_at),
            origin,
            false,
        );
        if rows.len() >= 200_000 {
            table
                .write(rows.finish(chrono::Utc::now()).unwrap())
                .await
                .unwrap();
        }
    }
    assert!(dead.is_empty(), "a clean district has no rejects");
    table
        .write(rows.finish(chrono::Utc::now()).unwrap())
        .await
        .unwrap();
    let staged = table.stage().await.unwrap();
    table.commit(&staged, &[]).await.unwrap();
    OffsetWriter::new(&lake, &DEAD_LETTERS, "test")
        .await
        .unwrap();

    streetflow_features::refresh_silver(
        &lake,
        streetflow_features::SilverMode::Full,
        &Default::default(),
    )
    .await
    .unwrap();
    timings.push(("bronze", started.elapsed()));
    let as_of = config.start + Days::new(u64::from(config.days));
    write_features(
        &lake,
        &AsOf {
            date: as_of,
            knowledge_time: Some(loaded_at + Duration::hours(1)),
        },
        &FeatureInputs {
            calendars: OperatorCalendars::default(),
            registry: generated.registry.clone(),
            ..FeatureInputs::default()
        },
    )
    .await
    .unwrap();

    timings.push(("features", started.elapsed()));
    let policy = Policy::load(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../pipelines/policies/district-turnover-loan.toml"),
    )
    .await
    .unwrap();
    let (decisions, summary) = decide(&lake, as_of, &policy).await.unwrap();
    timings.push(("decide", started.elapsed()));
    assert_eq!(summary.merchants, 24);
    let story = |archetype: &str| {
        let profile = generated
            .profiles
            .iter()
            .find(|p| p.archetype == archetype)
            .unwrap();
        decisions
            .iter()
            .find(|d| d.merchant_id == profile.merchant_id)
            .unwrap()
            .clone()
    };
    let table_text = pretty_format_batches(
        &lake
            .query(
                "SELECT merchant_id, decision, limit_fen, reasons FROM credit_decisions ORDER BY merchant_id",
            )
            .await
            .unwrap(),
    )
    .unwrap()
    .to_string();

    let pumping = story("pumping");
    let pumping_features = pretty_format_batches(
        &lake
            .query(&format!(
                "SELECT net_fen_30d, net_fen_180d, spike_ratio_30d_180d, round_amount_share_90d, \
                 top5_payer_share_90d, refund_ratio_90d, daily_net_cv_90d, sales_count_90d \
                 FROM merchant_features WHERE merchant_id = '{}'",
                pumping.merchant_id
            ))
            .await
            .unwrap(),
    )
    .unwrap()
    .to_string();
    eprintln!("timings: {timings:?}");
    assert_ne!(
        pumping.decision,
        Outcome::Approve,
        "{table_text}\n{pumping_features}"
    );
    assert!(
        pumping.reasons.iter().any(|r| r == "ROUND_AMOUNTS"),
        "pumping: {:?}\n{table_text}",
        pumping.reasons
    );
    let declining = story("declining");
    assert_eq!(declining.decision, Outcome::Decline, "{table_text}");
    assert!(
        declining.reasons.iter().any(|r| r == "NO_RECENT_SALES"),
        "declining: {:?}\n{table_text}",
        declining.reasons
    );
    // Ordinary shops with 200 days on book get credit.
    let approved = summary
        .by_decision
        .get(&Outcome::Approve)
        .copied()
        .unwrap_or(0);
    assert!(approved >= 12, "only {approved} approved\n{table_text}");

    // Deciding again replaces the date's rows with identical ones.
    let all = "SELECT * FROM credit_decisions ORDER BY operator_id, merchant_id";
    let first = pretty_format_batches(&lake.query(all).await.unwrap())
        .unwrap()
        .to_string();
    decide(&lake, as_of, &policy).await.unwrap();
    let second = pretty_format_batches(&lake.query(all).await.unwrap())
        .unwrap()
        .to_string();
    assert_eq!(first, second);
    assert!(first.contains(&policy.content_hash));

    // Decisions made on newer features (a run that overtook this one) are never
    // replaced by a run on older ones: the run fails and names why.
    let mut decisions_table = OffsetWriter::new(&lake, &CREDIT_DECISIONS, "credit_decisions")
        .await
        .unwrap();
    let decided_on = format!("decided-{as_of}-{}", policy.product.id);
    let recorded = decisions_table.app_version(&decided_on).await.unwrap();
    assert!(recorded.is_some(), "decide records the feature version");
    let newer = recorded.unwrap() + 5;
    decisions_table
        .commit_appended(
            &Default::default(),
            &[streetflow_lake::AppProgress {
                app_id: decided_on,
                expected: recorded,
                version: newer,
            }],
        )
        .await
        .unwrap();
    let error = decide(&lake, as_of, &policy).await.unwrap_err().to_string();
    assert!(error.contains("newer"), "{error}");
    let third = pretty_format_batches(&lake.query(all).await.unwrap())
        .unwrap()
        .to_string();
    assert_eq!(first, third, "older decisions replaced newer ones");
}
