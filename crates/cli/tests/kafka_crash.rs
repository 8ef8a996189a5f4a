//! Workers killed with SIGKILL at every step of a flush, and a worker lost from a
//! group of three: the lake ends up exactly as an uninterrupted run leaves it.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// A pipeline file that lets the group notice a dead worker within seconds.
fn fast_group_config(dir: &Path) -> String {
    let path = dir.join("test-pipeline.toml");
    std::fs::write(
        &path,
        "[kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\"heartbeat.interval.ms\" = \"1000\"\n",
    )
    .unwrap();
    path.display().to_string()
}

fn worker_args(topic: &str, group: &str, lake: &Path, config: &str, extra: &[&str]) -> Vec<String> {
    let mut args = ingest_args(topic, group, lake);
    args.extend([
        "--config".into(),
        config.into(),
        "--max-records".into(),
        "1500".into(),
    ]);
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// Everything a reader sees, in a stable order.
fn contents(lake: &Path) -> (String, String) {
    (
        sql_table(
            lake,
            "SELECT kafka_partition, kafka_offset, operator_id, business_date, event_id, merchant_id, terminal_id, \
             kind, amount_fen, currency, occurred_at, utc_offset_seconds, channel, ref_event_id, payer_ref, \
             kafka_timestamp, kafka_timestamp_type, knowledge_source, kafka_topic FROM pos_events \
             ORDER BY kafka_partition, kafka_offset",
        ),
        // Knowledge times and receipt times are the workers' clocks at their commits and
        // reads, which differ between runs by design.
        sql_table(
            lake,
            "SELECT kafka_partition, kafka_offset, operator_id, reason, detail, payload, payload_bytes, \
             message_key, kafka_timestamp FROM dead_letters ORDER BY kafka_partition, kafka_offset",
        ),
    )
}

#[test]
fn killed_at_every_step_the_tables_match_an_uninterrupted_run() {
    let (_guard, dir) = workdir();
    let summary = generate(
        &dir,
        &[
            "--merchants",
            "12",
            "--days",
            "30",
            "--seed",
            "23",
            "--duplicate-rate",
            "0.01",
            "--late-rate",
            "0.01",
            "--malformed-rate",
            "0.01",
        ],
    );
    let topic = unique("crash");
    produce(&dir, &topic, 4);
    let config = fast_group_config(&dir);

    let reference = dir.join("reference-lake");
    let args = worker_args(
        &topic,
        &unique("ref"),
        &reference,
        &config,
        &["--exit-at-end"],
    );
    Worker::start(&dir, &args, &[]).wait(Duration::from_secs(300));

    let crashed = dir.join("crashed-lake");
    let group = unique("crash");
    let freeze_points = [
        "message_buffered:700",
        "dead_letter_files_written:2",
        "dead_letters_committed:2",
        "event_files_written:2",
        "events_committed:2",
        "group_offsets_committed:3",
        "event_files_written:1",
    ];
    for point in freeze_points {
        let args = worker_args(&topic, &group, &crashed, &config, &[]);
        let mut worker = Worker::start(&dir, &args, &[("STREETFLOW_FREEZE_AT", point)]);
        worker.wait_for("FROZEN AT", Duration::from_secs(180));
        worker.kill();
    }
    let args = worker_args(&topic, &group, &crashed, &config, &["--exit-at-end"]);
    let status = Worker::start(&dir, &args, &[]).wait(Duration::from_secs(300));
    assert!(status.success());

    let lines = summary["lines"].as_i64().unwrap();
    assert_eq!(
        row_count(&reference, "pos_events") + row_count(&reference, "dead_letters"),
        lines
    );
    let (want_events, want_dead) = contents(&reference);
    let (got_events, got_dead) = contents(&crashed);
    assert!(
        want_events == got_events,
        "pos_events differ after the crashes"
    );
    assert!(
        want_dead == got_dead,
        "dead_letters differ after the crashes"
    );
    // The crashes left Parquet files that no commit references; readers never see them.
    assert_eq!(
        row_count(&crashed, "pos_events") + row_count(&crashed, "dead_letters"),
        lines
    );
}

#[test]
fn a_group_of_three_loses_a_worker_and_nothing_is_lost_or_doubled() {
    let (_guard, dir) = workdir();
    let summary = generate_busy_district(&dir, "31");
    let lines = summary["lines"].as_i64().unwrap();
    let topic = unique("rebalance");
    produce(&dir, &topic, 6);
    let config = fast_group_config(&dir);
    let lake = dir.join("lake");
    let group = unique("three");
    let args = worker_args(&topic, &group, &lake, &config, &["--json"]);

    let mut first = Worker::start(&dir, &args, &[]);
    let mut doomed = Worker::start(
        &dir,
        &args,
        &[("STREETFLOW_FREEZE_AT", "events_committed:3")],
    );
    let mut third = Worker::start(&dir, &args, &[]);
    // The doomed worker dies mid-run, right after a commit, holding partitions.
    doomed.wait_for("FROZEN AT", Duration::from_secs(180));
    doomed.kill();

    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let stored = row_count(&lake, "pos_events") + row_count(&lake, "dead_letters");
        if stored >= lines {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {stored} of {lines} records after the loss of a worker; stored per \
             partition (events, then dead letters):\n{}\n{}\nthe survivors' logs:\n{}\n---\n{}",
            sql_table(
                &lake,
                "SELECT kafka_partition, count(*), min(kafka_offset), max(kafka_offset) \
                 FROM pos_events GROUP BY kafka_partition ORDER BY kafka_partition"
            ),
            sql_table(
                &lake,
                "SELECT kafka_partition, count(*), min(kafka_offset), max(kafka_offset) \
                 FROM dead_letters GROUP BY kafka_partition ORDER BY kafka_partition"
            ),
            first.log_digest(40),
            third.log_digest(40)
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    for worker in [first, third] {
        assert!(worker.terminate(Duration::from_secs(60)).success());
    }
    assert_each_record_stored_once(&lake, &summary);
}

/// Defect 0 of issue 20: a worker SIGKILLed a few times while it joins its group, then
/// started once more, must store the whole topic (it used to log `partitions=[]` and
/// wait forever in a group that no longer counted it).
#[test]
fn a_worker_killed_while_joining_and_started_again_stores_the_topic() {
    let (_guard, dir) = workdir();
    let summary = generate(&dir, &["--merchants", "8", "--days", "10", "--seed", "47"]);
    let lines = summary["lines"].as_i64().unwrap();
    let topic = unique("rejoin");
    produce(&dir, &topic, 4);
    let config = fast_group_config(&dir);
    let lake = dir.join("lake");
    let group = unique("rejoin");
    let args = worker_args(&topic, &group, &lake, &config, &["--exit-at-end", "--json"]);
    for delay_ms in [1_500, 600, 2_500, 900] {
        let worker = Worker::start(&dir, &args, &[]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        worker.kill();
    }
    let mut last = Worker::start(&dir, &args, &[]);
    let deadline = Instant::now() + Duration::from_secs(150);
    let status = loop {
        if let Some(status) = last.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted worker still runs after 150 s with {} of {lines} records stored:\n{}",
            row_count(&lake, "pos_events") + row_count(&lake, "dead_letters"),
            last.log_digest(30)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(status.success(), "{}", last.log_digest(30));
    assert_eq!(
        row_count(&lake, "pos_events") + row_count(&lake, "dead_letters"),
        lines
    );
}

/// A batch worker that reads none of the waiting records (another member holds the only
/// partition and, frozen at `freeze_at`, stores nothing more) must not end as if the
/// topic were stored: it says what it sees, rejoins, and after its stall timeout fails
/// with an error naming the group, instead of waiting silently.
fn a_batch_run_beside_a_frozen_member_fails_and_says_why(freeze_at: &str) {
    let (_guard, dir) = workdir();
    generate(
        &dir,
        &[
            "--merchants",
            "4",
            "--days",
            "5",
            "--seed",
            "48",
            "--malformed-rate",
            "0.05",
        ],
    );
    let topic = unique("stall");
    produce(&dir, &topic, 1);
    let lake = dir.join("lake");
    let group = unique("stall");
    let mut holder_args = ingest_args(&topic, &group, &lake);
    holder_args.push("--exit-at-end".into());
    // The holder takes the partition and stops moving: its session stays alive
    // (librdkafka heartbeats from its own thread), so it keeps the partition.
    let mut holder = Worker::start(&dir, &holder_args, &[("STREETFLOW_FREEZE_AT", freeze_at)]);
    holder.wait_for("FROZEN AT", Duration::from_secs(60));

    let mut waiting_args = holder_args.clone();
    waiting_args.extend(["--stall-timeout-secs".into(), "30".into()]);
    let mut command = streetflow();
    command.args(&waiting_args).current_dir(&dir);
    let output = output_within(&mut command, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a batch run whose records are not stored must fail:\n{stderr}"
    );
    assert!(
        stderr.contains("records wait in the topic and nothing stores them"),
        "the worker says what it sees before it gives up:\n{stderr}"
    );
    assert!(
        stderr.contains("stalled:") && stderr.contains(&group) && stderr.contains("waited"),
        "the error names the stall and the group:\n{stderr}"
    );
    assert_eq!(row_count(&lake, "pos_events"), 0);
    holder.kill();
}

#[test]
fn a_batch_worker_whose_records_nobody_stores_fails_and_says_why() {
    a_batch_run_beside_a_frozen_member_fails_and_says_why("message_buffered");
}

/// Defect 9 of issue 20: between a flush's dead-letter commit and its events commit the
/// dead-letter offsets run ahead; a batch run must not take them for a stored topic.
#[test]
fn a_flush_between_its_dead_letter_and_event_commits_is_not_a_stored_topic() {
    a_batch_run_beside_a_frozen_member_fails_and_says_why("dead_letters_committed");
}

/// splitmix64: the soak's kill schedule, reproducible from its seed.
struct KillSchedule(u64);

impl KillSchedule {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// Issue 20, kill soak: three streaming workers (silver kept fresh after each flush) are
/// SIGKILLed at random moments, one at a time, at least 20 times, each restarted at
/// once, so the group rebalances over and over; then three batch workers finish the
/// topic. Bronze, dead letters and silver equal those of one uninterrupted worker.
/// `STREETFLOW_SOAK_SEED` and `STREETFLOW_SOAK_KILLS` rerun a schedule or lengthen it.
#[test]
#[ignore = "7 minutes on 2 cores, beyond the suite's time budget; run with --ignored (issue 20)"]
fn workers_killed_at_random_twenty_times_leave_the_tables_of_an_uninterrupted_run() {
    let env_number = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let seed = env_number("STREETFLOW_SOAK_SEED", 20_261_202);
    let kills = env_number("STREETFLOW_SOAK_KILLS", 20);
    eprintln!("kill soak: seed {seed}, {kills} kills (STREETFLOW_SOAK_SEED reruns it)");
    let (_guard, dir) = workdir();
    let summary = generate(
        &dir,
        &[
            "--merchants",
            "24",
            "--days",
            "40",
            "--seed",
            "71",
            "--duplicate-rate",
            "0.01",
            "--late-rate",
            "0.01",
            "--malformed-rate",
            "0.005",
        ],
    );
    let lines = summary["lines"].as_i64().unwrap();
    let topic = unique("soak");
    produce(&dir, &topic, 6);
    let config = fast_group_config(&dir);
    let with_silver = |lake: &Path, group: &str, extra: &[&str]| {
        let mut args = ingest_args_with_silver(&topic, group, lake);
        args.extend(
            ["--config", &config, "--max-records", "400"]
                .iter()
                .chain(extra)
                .map(|s| (*s).to_owned()),
        );
        args
    };

    let reference = dir.join("reference-lake");
    let args = with_silver(&reference, &unique("ref"), &["--exit-at-end"]);
    // About 180 flushes with silver refreshed after each: some 300 s on 2 shared cores.
    let (status, _, log) =
        Worker::start(&dir, &args, &[]).wait_with_output(Duration::from_secs(900));
    assert!(status.success(), "the uninterrupted run failed:\n{log}");
    assert_each_record_stored_once(&reference, &summary);

    let soaked = dir.join("soaked-lake");
    let group = unique("soak");
    let streaming = with_silver(&soaked, &group, &[]);
    let mut schedule = KillSchedule(seed);
    let mut workers: Vec<Worker> = (0..3)
        .map(|_| Worker::start(&dir, &streaming, &[]))
        .collect();
    let mut mid_ingest = 0;
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(300 + schedule.below(2_700)));
        let slot = schedule.below(3) as usize;
        let stored = row_count(&soaked, "pos_events") + row_count(&soaked, "dead_letters");
        mid_ingest += u32::from(stored < lines);
        let mut victim =
            std::mem::replace(&mut workers[slot], Worker::start(&dir, &streaming, &[]));
        // A streaming worker never ends by itself: one that did failed.
        if let Ok(Some(status)) = victim.child.try_wait() {
            panic!(
                "a streaming worker exited ({status}) before its kill:\n{}",
                victim.log_digest(40)
            );
        }
        victim.kill();
    }
    // The last streaming workers die too; batch workers finish the topic.
    for worker in workers {
        worker.kill();
    }
    assert!(
        mid_ingest * 2 >= kills as u32,
        "only {mid_ingest} of {kills} kills hit a worker before the topic was stored"
    );
    let batch = with_silver(&soaked, &group, &["--exit-at-end"]);
    let finishers: Vec<Worker> = (0..3).map(|_| Worker::start(&dir, &batch, &[])).collect();
    let deadline = Instant::now() + Duration::from_secs(400);
    for worker in finishers {
        let (status, _, log) =
            worker.wait_with_output(deadline.saturating_duration_since(Instant::now()));
        assert!(
            status.success(),
            "a batch worker failed after the soak:\n{log}"
        );
    }

    assert_each_record_stored_once(&soaked, &summary);
    let (want_events, want_dead) = contents(&reference);
    let (got_events, got_dead) = contents(&soaked);
    assert!(
        want_events == got_events,
        "pos_events differ after the soak (seed {seed})"
    );
    assert!(
        want_dead == got_dead,
        "dead_letters differ after the soak (seed {seed})"
    );
    assert_eq!(
        silver_as_truth(&dir, &soaked),
        silver_as_truth(&dir, &reference),
        "merchant_daily differs after the soak (seed {seed})"
    );
}

/// A batch member without partitions must not take a broker's queried end for the end
/// of a partition it never read: Tansu 0.6 answers ListOffsets with the last record
/// batch's base offset + 1, below the records of that batch. Here the member holding
/// the only partition stored all but the last 100 records and froze; the other member
/// used to see "0 waiting" and end successfully with those records unstored. Now it
/// asks through the fetch path, finds them, and fails after its stall timeout.
#[test]
fn a_batch_member_without_partitions_never_ends_on_a_queried_end_below_unread_records() {
    let (_guard, dir) = workdir();
    let summary = generate(
        &dir,
        &[
            "--merchants",
            "6",
            "--days",
            "20",
            "--seed",
            "52",
            "--malformed-rate",
            "0",
        ],
    );
    let lines = summary["lines"].as_i64().unwrap();
    let topic = unique("lowend");
    produce(&dir, &topic, 1);
    let lake = dir.join("lake");
    let group = unique("lowend");
    let stored = lines - 100;
    let mut holder_args = ingest_args(&topic, &group, &lake);
    holder_args.extend([
        "--exit-at-end".into(),
        "--max-records".into(),
        stored.to_string(),
    ]);
    let mut holder = Worker::start(
        &dir,
        &holder_args,
        &[("STREETFLOW_FREEZE_AT", "events_committed:1")],
    );
    holder.wait_for("FROZEN AT", Duration::from_secs(120));
    assert_eq!(row_count(&lake, "pos_events"), stored);

    let mut waiting_args = holder_args.clone();
    waiting_args.extend(["--stall-timeout-secs".into(), "30".into()]);
    let mut command = streetflow();
    command.args(&waiting_args).current_dir(&dir);
    let output = output_within(&mut command, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a batch run ended with {} records of the topic unstored:\n{stderr}",
        lines - stored
    );
    assert!(stderr.contains("stalled:"), "{stderr}");
    assert_eq!(row_count(&lake, "pos_events"), stored);
    holder.kill();
}
