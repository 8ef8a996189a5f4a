//! `streetflow doctor`: checks a pipeline's brokers, topic, lake and tables, and says in
//! plain words what is wrong.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde_json::json;
use streetflow_core::PipelineConfig;
use streetflow_core::tables::{
    CREDIT_DECISIONS, DEAD_LETTERS, MERCHANT_DAILY, MERCHANT_DAILY_HISTORY, MERCHANT_FEATURES,
    POS_EVENTS, TableDef,
};
use streetflow_features::BRONZE_APP_ID;
use streetflow_lake::Lake;

use crate::output::{table, thousands};
use crate::runtime::runtime;
use crate::settings::{load_pipeline, set_override};

/// Options of `streetflow doctor`.
#[derive(Debug, Args)]
pub(crate) struct DoctorArgs {
    /// Pipeline file to check (flags override it, as for `ingest`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers.
    #[arg(long)]
    brokers: Option<String>,
    /// Topic of pos_transaction/v1 events.
    #[arg(long)]
    topic: Option<String>,
    /// Lake root.
    #[arg(long)]
    lake: Option<String>,
    /// How long to wait for the brokers.
    #[arg(long, default_value_t = 10)]
    timeout_seconds: u64,
    /// Print the checks as JSON.
    #[arg(long)]
    json: bool,
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warning",
            Status::Fail => "PROBLEM",
        }
    }
}

#[derive(Debug, Clone)]
struct Check {
    name: String,
    status: Status,
    detail: String,
}

#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn add(&mut self, name: impl Into<String>, status: Status, detail: impl Into<String>) {
        self.0.push(Check {
            name: name.into(),
            status,
            detail: detail.into(),
        });
    }
}

/// Keeps librdkafka's own connection errors off the terminal: the doctor reports what
/// failed in one line of its own.
struct Quiet;

impl ClientContext for Quiet {
    fn log(&self, _level: RDKafkaLogLevel, _fac: &str, _log_message: &str) {}
    fn error(&self, _error: KafkaError, _reason: &str) {}
}

impl ConsumerContext for Quiet {}

/// What the broker says about the topic.
struct TopicEnds {
    consumer: BaseConsumer<Quiet>,
    topic: String,
    /// (partition, high watermark)
    ends: Vec<(i32, i64)>,
    timeout: Duration,
}

impl TopicEnds {
    /// The highest offset the broker returns when reading `partition` from `from`, or
    /// `None` when it returns nothing. Some brokers (Tansu 0.6) report the last record
    /// batch's base offset + 1 as the end, so the end alone cannot prove records are gone.
    fn highest_readable(&self, partition: i32, from: i64) -> Option<i64> {
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&self.topic, partition, Offset::Offset(from.max(0)))
            .ok()?;
        self.consumer.assign(&assignment).ok()?;
        let deadline = Instant::now() + self.timeout;
        let mut highest = None;
        while Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => highest = highest.max(Some(message.offset())),
                Some(Err(_)) => break,
                None if highest.is_some() => break,
                None => {}
            }
        }
        let _ = self.consumer.unassign();
        highest
    }
}

/// Checks the brokers and the topic; returns the end offset of each partition.
fn check_kafka(
    config: &PipelineConfig,
    timeout: Duration,
    checks: &mut Checks,
) -> Option<TopicEnds> {
    let kafka = &config.kafka;
    let client = streetflow_ingest::client_config(
        &kafka.brokers,
        &kafka.properties,
        streetflow_ingest::ClientRole::Inspector {
            group: &kafka.group,
        },
    );
    let consumer: BaseConsumer<Quiet> = match client.create_with_context(Quiet) {
        Ok(consumer) => consumer,
        Err(error) => {
            checks.add(
                "kafka settings",
                Status::Fail,
                format!("librdkafka refuses the [kafka] settings: {error}"),
            );
            return None;
        }
    };
    let metadata = match consumer.fetch_metadata(None, timeout) {
        Ok(metadata) => metadata,
        Err(error) => {
            checks.add(
                "brokers",
                Status::Fail,
                format!(
                    "cannot reach the Kafka brokers at {} within {} s ({error}). Check kafka.brokers, \
                     the network path, and security.protocol / sasl.* under [kafka.properties]",
                    kafka.brokers,
                    timeout.as_secs()
                ),
            );
            return None;
        }
    };
    checks.add(
        "brokers",
        Status::Ok,
        format!(
            "{} broker(s) answered at {}",
            metadata.brokers().len(),
            kafka.brokers
        ),
    );
    let Some(topic) = metadata
        .topics()
        .iter()
        .find(|t| t.name() == kafka.topic && !t.partitions().is_empty())
    else {
        checks.add(
            "topic",
            Status::Fail,
            format!(
                "topic {} does not exist on the cluster: create it with as many partitions as you \
                 want workers (e.g. kafka-topics.sh --create --topic {} --partitions 12)",
                kafka.topic, kafka.topic
            ),
        );
        return None;
    };
    let leaderless: Vec<i32> = topic
        .partitions()
        .iter()
        .filter(|p| p.leader() < 0)
        .map(|p| p.id())
        .collect();
    if leaderless.is_empty() {
        checks.add(
            "topic",
            Status::Ok,
            format!(
                "{}: {} partitions, so at most {} workers share the work",
                kafka.topic,
                topic.partitions().len(),
                topic.partitions().len()
            ),
        );
    } else {
        checks.add(
            "topic",
            Status::Warn,
            format!(
                "{}: partitions {leaderless:?} have no leader; their records cannot be read until the cluster elects one",
                kafka.topic
            ),
        );
    }
    if let Some(dlq) = &kafka.dlq_topic
        && !metadata
            .topics()
            .iter()
            .any(|t| t.name() == dlq.as_str() && !t.partitions().is_empty())
    {
        checks.add(
            "dead-letter topic",
            Status::Warn,
            format!("{dlq} does not exist: dead letters still go to the lake, but publishing them will fail unless the cluster creates topics automatically"),
        );
    }
    let mut ends = Vec::new();
    for partition in topic.partitions() {
        match consumer.fetch_watermarks(&kafka.topic, partition.id(), timeout) {
            Ok((_, high)) => ends.push((partition.id(), high)),
            Err(error) => checks.add(
                "topic",
                Status::Warn,
                format!(
                    "cannot read the end of partition {}: {error}",
                    partition.id()
                ),
            ),
        }
    }
    Some(TopicEnds {
        consumer,
        topic: kafka.topic.clone(),
        ends,
        timeout,
    })
}

/// The lake's tables, each with what creates it.
fn tables() -> [(&'static TableDef, &'static str); 6] {
    [
        (
            &POS_EVENTS,
            "run `streetflow ingest` or `streetflow backfill`",
        ),
        (&DEAD_LETTERS, "created with pos_events"),
        (&MERCHANT_DAILY, "run `streetflow aggregate`"),
        (&MERCHANT_DAILY_HISTORY, "run `streetflow aggregate`"),
        (&MERCHANT_FEATURES, "run `streetflow features --as-of DATE`"),
        (&CREDIT_DECISIONS, "run `streetflow decide`"),
    ]
}

async fn check_lake(
    config: &PipelineConfig,
    ends: Option<&TopicEnds>,
    checks: &mut Checks,
) -> anyhow::Result<()> {
    let lake = match Lake::new(&config.lake.url, &config.lake.storage) {
        Ok(lake) => lake,
        Err(error) => {
            checks.add(
                "lake",
                Status::Fail,
                format!("{}: {error}", config.lake.url),
            );
            return Ok(());
        }
    };
    checks.add("lake", Status::Ok, lake.root().to_string());
    let mut bronze_version = None;
    for (def, hint) in tables() {
        let name = format!("table {}", def.name);
        match lake.inspect(def).await {
            Ok(None) => checks.add(name, Status::Warn, format!("not created yet ({hint})")),
            Ok(Some(state)) => {
                if def.name == POS_EVENTS.name {
                    bronze_version = Some(state.version);
                }
                match state.schema_problem {
                    Some(problem) => checks.add(
                        name,
                        Status::Fail,
                        format!(
                            "{problem}: this table does not match the columns this streetflow writes \
                             (written by another version, or another tool)"
                        ),
                    ),
                    None => checks.add(
                        name,
                        Status::Ok,
                        format!("version {}, {} data files", state.version, thousands(state.files as u64)),
                    ),
                }
            }
            Err(error) => checks.add(name, Status::Fail, format!("cannot be read: {error}")),
        }
        // Damage at rest (a truncated file, a torn commit) named file by file.
        let files = format!("files of {}", def.name);
        match lake.find_damage(def.name).await {
            Ok(damage) if damage.is_empty() => {}
            Ok(damage) => {
                const SHOWN: usize = 5;
                let mut detail = damage
                    .iter()
                    .take(SHOWN)
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                if damage.len() > SHOWN {
                    detail.push_str(&format!("; and {} more", damage.len() - SHOWN));
                }
                checks.add(
                    files,
                    Status::Fail,
                    format!(
                        "{} damaged: {detail} (restore them from a backup, or remove them from the table with a Delta tool, then rebuild what reads them)",
                        damage.len()
                    ),
                );
            }
            Err(error) => checks.add(files, Status::Fail, format!("cannot be checked: {error}")),
        }
    }

    if let (Some(ends), Some(_)) = (ends, bronze_version) {
        let mut behind = 0_i64;
        let mut beyond = Vec::new();
        for &(partition, end) in &ends.ends {
            let app_id = format!("{}-{partition}", config.pipeline.name);
            let stored = lake.app_version(POS_EVENTS.name, &app_id).await?;
            let next = stored.map_or(0, |offset| offset + 1);
            if next <= end {
                behind += end - next;
                continue;
            }
            // Past the reported end: make sure the records the lake holds are really
            // gone before calling it a recreated topic.
            match ends.highest_readable(partition, end - 1) {
                Some(highest) if highest + 1 >= next => {}
                highest => beyond.push(format!(
                    "partition {partition}: lake at offset {next}, topic ends at {}",
                    highest.map_or(end, |h| h + 1)
                )),
            }
        }
        if beyond.is_empty() {
            checks.add(
                "ingest progress",
                Status::Ok,
                format!(
                    "pipeline {} is {} records behind the end of {}",
                    config.pipeline.name,
                    thousands(behind as u64),
                    config.kafka.topic
                ),
            );
        } else {
            checks.add(
                "ingest progress",
                Status::Fail,
                format!(
                    "the lake records offsets past the end of the topic ({}): was the topic deleted and \
                     recreated? Workers would skip its new records. Use a new [pipeline] name for a new topic",
                    beyond.join("; ")
                ),
            );
        }
    }
    if let Some(version) = bronze_version {
        let reflected = lake.app_version(MERCHANT_DAILY.name, BRONZE_APP_ID).await?;
        match reflected {
            Some(v) if v == version => checks.add(
                "silver freshness",
                Status::Ok,
                format!("merchant_daily reflects the newest pos_events version ({version})"),
            ),
            Some(v) => checks.add(
                "silver freshness",
                Status::Warn,
                format!("merchant_daily reflects pos_events version {v} of {version}: workers catch up after their next flush, or run `streetflow aggregate`"),
            ),
            None => checks.add(
                "silver freshness",
                Status::Warn,
                "merchant_daily has not been built: run `streetflow aggregate`",
            ),
        }
    }
    Ok(())
}

pub(crate) fn run(args: &DoctorArgs) -> anyhow::Result<()> {
    let mut overrides = json!({});
    for (path, value) in [
        ("kafka.brokers", args.brokers.clone()),
        ("kafka.topic", args.topic.clone()),
        ("lake.url", args.lake.clone()),
    ] {
        set_override(&mut overrides, path, value.map(Into::into));
    }
    let mut checks = Checks::default();
    let config = match load_pipeline(args.config.as_deref(), overrides) {
        Ok(config) => {
            checks.add(
                "pipeline",
                Status::Ok,
                format!(
                    "{} (pipeline {}, topic {}, lake {})",
                    args.config.as_ref().map_or_else(
                        || "built-in defaults".to_owned(),
                        |p| p.display().to_string()
                    ),
                    config.pipeline.name,
                    config.kafka.topic,
                    config.lake.url
                ),
            );
            Some(config)
        }
        Err(error) => {
            checks.add("pipeline", Status::Fail, format!("{error:#}"));
            None
        }
    };
    if let Some(config) = &config {
        let ends = check_kafka(
            config,
            Duration::from_secs(args.timeout_seconds),
            &mut checks,
        );
        runtime()?.block_on(check_lake(config, ends.as_ref(), &mut checks))?;
    }

    let problems = checks.0.iter().filter(|c| c.status == Status::Fail).count();
    if args.json {
        println!(
            "{}",
            json!({
                "problems": problems,
                "checks": checks.0.iter().map(|c| json!({
                    "check": c.name, "status": c.status.as_str(), "detail": c.detail,
                })).collect::<Vec<_>>(),
            })
        );
    } else {
        let mut t = table(&["check", "status", "detail"]);
        for c in &checks.0 {
            t.add_row(vec![
                c.name.clone(),
                c.status.as_str().to_owned(),
                c.detail.clone(),
            ]);
        }
        println!("{t}");
    }
    anyhow::ensure!(problems == 0, "{problems} problem(s) found");
    Ok(())
}
