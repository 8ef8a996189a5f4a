//! Pipeline configuration: the TOML files under `pipelines/`.
//!
//! Defaults live in `pipelines/default.toml` (embedded as [`DEFAULT_TOML`]); a pipeline
//! file overrides them, environment variables `STREETFLOW__SECTION__KEY` override the
//! file, and command-line flags override everything. Loading and merging happen in the
//! binary; this module holds the types and the cross-field validation.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use crate::calendar::{BusinessCalendar, OperatorCalendars};
use crate::decode::DecodeOptions;
use crate::knowledge::KnowledgeRules;

/// The embedded defaults.
pub const DEFAULT_TOML: &str = include_str!("../../../pipelines/default.toml");

/// A whole pipeline file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Identity of the pipeline.
    pub pipeline: PipelineSection,
    /// Where events come from.
    pub kafka: KafkaSection,
    /// Where tables live.
    pub lake: LakeSection,
    /// When a worker writes a batch.
    pub flush: FlushSection,
    /// Decoder limits.
    pub decode: DecodeSection,
    /// Business calendars.
    pub calendar: CalendarSection,
    /// The daily cash-flow table.
    pub silver: SilverSection,
    /// When the lake's knowledge of an instant is settled.
    pub knowledge: KnowledgeSection,
    /// Observability.
    pub metrics: MetricsSection,
}

/// `[silver]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SilverSection {
    /// Workers bring `merchant_daily` up to date after each bronze commit.
    pub update_after_flush: bool,
}

/// `[knowledge]`: see [`crate::knowledge`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnowledgeSection {
    /// A knowledge time K may be read once this long has passed since K; writers make
    /// each commit visible within half of it of the stamp its rows carry.
    pub settle_ms: i64,
}

/// `[pipeline]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSection {
    /// Names the Delta `txn` application ids (`<name>-<partition>`): change it and the
    /// lake no longer knows how far the topic was ingested.
    pub name: String,
}

/// `[kafka]`
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSection {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    /// Topic of `pos_transaction/v1` events.
    pub topic: String,
    /// Consumer group of the workers.
    pub group: String,
    /// Optional topic that also receives dead letters, reason in headers.
    #[serde(default)]
    pub dlq_topic: Option<String>,
    /// Extra librdkafka properties (e.g. `security.protocol`); secrets belong in the
    /// environment, not in files.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// Whether a librdkafka property holds a secret (its value is never printed).
pub fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "secret", "token", "key.pem", "keystore"]
        .iter()
        .any(|word| name.contains(word))
}

impl std::fmt::Debug for KafkaSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let shown = if is_secret_property(k) {
                    "<redacted>"
                } else {
                    v
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaSection")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("dlq_topic", &self.dlq_topic)
            .field("properties", &properties)
            .finish()
    }
}

/// `[lake]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LakeSection {
    /// Lake root: a local path or an object-store URL (`s3://bucket/prefix`).
    pub url: String,
    /// object_store options (endpoint, region…); credentials from the environment.
    #[serde(default)]
    pub storage: BTreeMap<String, String>,
}

/// `[flush]`: a worker writes when the first of these limits is reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlushSection {
    /// Messages buffered.
    pub max_records: usize,
    /// Payload bytes buffered.
    pub max_bytes: usize,
    /// Age of the oldest buffered message.
    pub max_age_ms: u64,
}

/// `[decode]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeSection {
    /// Larger messages are `oversized`.
    pub max_message_bytes: usize,
    /// Allowed lead of `occurred_at` over the receiving worker's clock.
    pub max_future_skew_ms: i64,
    /// The earliest `occurred_at` accepted (RFC 3339); earlier ones are `bad_timestamp`.
    pub earliest_occurred_at: String,
}

/// `[calendar]`: the default business calendar and per-operator exceptions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalendarSection {
    /// IANA zone of operators without an entry.
    pub time_zone: String,
    /// Day cutoff (`HH:MM`) of operators without an entry.
    pub day_cutoff: String,
    /// Per-operator calendars, keyed by `operator_id`.
    #[serde(default)]
    pub operators: BTreeMap<String, OperatorCalendarSection>,
}

/// `[calendar.operators.<operator_id>]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorCalendarSection {
    /// IANA zone.
    pub time_zone: String,
    /// Day cutoff, `HH:MM`.
    pub day_cutoff: String,
}

/// `[metrics]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Prometheus endpoint address; empty to disable.
    #[serde(default)]
    pub addr: String,
}

impl PipelineConfig {
    /// The embedded defaults.
    pub fn defaults() -> Self {
        // The file is part of the binary and a test parses it; failing here is a build
        // defect, not bad input.
        toml::from_str(DEFAULT_TOML)
            .unwrap_or_else(|e| panic!("pipelines/default.toml is invalid: {e}"))
    }

    /// Parses a complete pipeline file (every section present), without defaults.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Checks every field and every cross-field rule; reports all problems at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.pipeline.name.trim().is_empty() {
            problems.push("pipeline.name must not be empty".to_owned());
        }
        for (key, value) in [
            ("kafka.brokers", &self.kafka.brokers),
            ("kafka.topic", &self.kafka.topic),
            ("kafka.group", &self.kafka.group),
            ("lake.url", &self.lake.url),
        ] {
            if value.trim().is_empty() {
                problems.push(format!("{key} must not be empty"));
            }
        }
        if self.kafka.dlq_topic.as_deref() == Some(self.kafka.topic.as_str()) {
            problems.push("kafka.dlq_topic must differ from kafka.topic".to_owned());
        }
        for key in self.kafka.properties.keys() {
            if matches!(
                key.as_str(),
                "group.id" | "bootstrap.servers" | "enable.auto.commit"
            ) {
                problems.push(format!(
                    "kafka.properties.{key} is set by streetflow; use the [kafka] keys"
                ));
            }
        }
        if self.flush.max_records == 0 {
            problems.push("flush.max_records must be at least 1".to_owned());
        }
        if self.flush.max_bytes == 0 {
            problems.push("flush.max_bytes must be at least 1".to_owned());
        }
        if self.flush.max_age_ms == 0 {
            problems.push("flush.max_age_ms must be at least 1".to_owned());
        }
        if self.decode.max_message_bytes == 0 {
            problems.push("decode.max_message_bytes must be at least 1".to_owned());
        }
        if self.knowledge.settle_ms < 1000 {
            problems.push(
                "knowledge.settle_ms must be at least 1000 (writers get half of it to commit)"
                    .to_owned(),
            );
        }
        if self.decode.max_future_skew_ms < 0 {
            problems.push("decode.max_future_skew_ms must not be negative".to_owned());
        }
        if DateTime::parse_from_rfc3339(&self.decode.earliest_occurred_at).is_err() {
            problems.push(format!(
                "decode.earliest_occurred_at {:?} is not an RFC 3339 time, e.g. 2000-01-01T00:00:00Z",
                self.decode.earliest_occurred_at
            ));
        }
        if let Err(e) = BusinessCalendar::parse(&self.calendar.time_zone, &self.calendar.day_cutoff)
        {
            problems.push(format!("calendar: {e}"));
        }
        for (operator, cal) in &self.calendar.operators {
            if let Err(e) = BusinessCalendar::parse(&cal.time_zone, &cal.day_cutoff) {
                problems.push(format!("calendar.operators.{operator}: {e}"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The business calendars of all operators.
    pub fn calendars(&self) -> Result<OperatorCalendars, crate::CalendarError> {
        let default = BusinessCalendar::parse(&self.calendar.time_zone, &self.calendar.day_cutoff)?;
        let mut calendars = OperatorCalendars::new(default);
        for (operator, cal) in &self.calendar.operators {
            calendars.insert(
                operator.clone(),
                BusinessCalendar::parse(&cal.time_zone, &cal.day_cutoff)?,
            );
        }
        Ok(calendars)
    }

    /// The knowledge-time rules writers and readers share.
    pub fn knowledge_rules(&self) -> KnowledgeRules {
        KnowledgeRules::new(Duration::milliseconds(self.knowledge.settle_ms))
    }

    /// Decoder limits.
    pub fn decode_options(&self) -> DecodeOptions {
        DecodeOptions {
            max_message_bytes: self.decode.max_message_bytes,
            max_future_skew: Duration::milliseconds(self.decode.max_future_skew_ms),
            // Checked by `validate`; an unchecked config falls back to the contract's.
            earliest_occurred_at: DateTime::parse_from_rfc3339(&self.decode.earliest_occurred_at)
                .map_or(DecodeOptions::default().earliest_occurred_at, |t| {
                    t.with_timezone(&Utc)
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_validate() {
        let config = PipelineConfig::defaults();
        config.validate().unwrap();
        assert_eq!(config.kafka.topic, "pos.transactions.v1");
        assert_eq!(
            config
                .calendars()
                .unwrap()
                .for_operator("anyone")
                .to_string(),
            "Asia/Shanghai cutoff 00:00"
        );
    }

    #[test]
    fn validation_reports_every_problem() {
        let mut config = PipelineConfig::defaults();
        config.kafka.brokers = String::new();
        config.flush.max_records = 0;
        config.calendar.day_cutoff = "25:00".to_owned();
        config
            .kafka
            .properties
            .insert("group.id".to_owned(), "x".to_owned());
        config.calendar.operators.insert(
            "night-market".to_owned(),
            OperatorCalendarSection {
                time_zone: "Nowhere/City".to_owned(),
                day_cutoff: "04:00".to_owned(),
            },
        );
        let problems = config.validate().unwrap_err();
        assert_eq!(problems.len(), 5, "{problems:#?}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = DEFAULT_TOML.replace("[flush]", "[flush]\nmax_recrods = 5");
        let err = PipelineConfig::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("max_recrods"), "{err}");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let mut config = PipelineConfig::defaults();
        for (key, value) in [
            ("sasl.password", "hunter2"),
            ("ssl.key.password", "pem-pass"),
            ("sasl.oauthbearer.client.secret", "oauth-secret"),
            ("security.protocol", "SASL_SSL"),
        ] {
            config
                .kafka
                .properties
                .insert(key.to_owned(), value.to_owned());
        }
        let shown = format!("{config:?}");
        for secret in ["hunter2", "pem-pass", "oauth-secret"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("SASL_SSL"));
    }
}
