//! Loading a pipeline: embedded defaults < pipeline file < `STREETFLOW__…` environment
//! variables < command-line flags.

use std::path::Path;

use anyhow::Context;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use streetflow_core::PipelineConfig;
use streetflow_core::config::DEFAULT_TOML;

/// Opens the lake at `url` with the `[lake.storage]` options of the pipeline file (the
/// defaults without one), for the commands that only read or maintain tables.
pub(crate) fn open_lake(url: &str, config: Option<&Path>) -> anyhow::Result<streetflow_lake::Lake> {
    let config = load_pipeline(config, serde_json::json!({}))?;
    Ok(streetflow_lake::Lake::new(url, &config.lake.storage)?)
}

/// Loads and validates a pipeline. `overrides` is a JSON object with only the keys the
/// command line set, e.g. `{"kafka": {"brokers": "…"}}`.
pub(crate) fn load_pipeline(
    file: Option<&Path>,
    overrides: serde_json::Value,
) -> anyhow::Result<PipelineConfig> {
    let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
    if let Some(path) = file {
        anyhow::ensure!(
            path.exists(),
            "pipeline file {} does not exist",
            path.display()
        );
        figment = figment.merge(Toml::file_exact(path));
    }
    let mut config: PipelineConfig = figment
        .merge(Env::prefixed("STREETFLOW__").split("__"))
        .merge(Serialized::defaults(overrides))
        .extract()
        .with_context(|| match file {
            Some(path) => format!("reading pipeline {}", path.display()),
            None => "reading pipeline settings".to_owned(),
        })?;
    config.kafka.properties = librdkafka_names(std::mem::take(&mut config.kafka.properties));
    if let Err(problems) = config.validate() {
        anyhow::bail!(
            "invalid pipeline settings:\n  - {}",
            problems.join("\n  - ")
        );
    }
    Ok(config)
}

/// Property names as librdkafka spells them. Environment variable names cannot hold dots,
/// so `STREETFLOW__KAFKA__PROPERTIES__SASL_PASSWORD` arrives as `sasl_password`;
/// librdkafka's names use dots and never underscores.
fn librdkafka_names(
    properties: std::collections::BTreeMap<String, String>,
) -> std::collections::BTreeMap<String, String> {
    properties
        .into_iter()
        .map(|(key, value)| (key.replace('_', "."), value))
        .collect()
}

/// Sets `value` at a dotted `path` of a JSON object when present.
pub(crate) fn set_override(
    target: &mut serde_json::Value,
    path: &str,
    value: Option<serde_json::Value>,
) {
    let Some(value) = value else { return };
    let mut node = target;
    let mut keys = path.split('.').peekable();
    while let Some(key) = keys.next() {
        if !node.is_object() {
            *node = serde_json::json!({});
        }
        let Some(map) = node.as_object_mut() else {
            return;
        };
        if keys.peek().is_none() {
            map.insert(key.to_owned(), value);
            return;
        }
        node = map
            .entry(key.to_owned())
            .or_insert_with(|| serde_json::json!({}));
    }
}

/// An `--as-of` date: a date, or `today` / `yesterday` in the operators' business
/// calendars (what a scheduled job means; a container's `date +%F` is the UTC date).
/// `today` is the latest date whose day before every operator has closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AsOfArg {
    /// This date.
    Date(chrono::NaiveDate),
    /// The business date in progress: every closed day is in the windows.
    Today,
    /// The day before it.
    Yesterday,
}

impl std::str::FromStr for AsOfArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "today" => Ok(Self::Today),
            "yesterday" => Ok(Self::Yesterday),
            _ => text
                .parse()
                .map(Self::Date)
                .map_err(|e| format!("{e}: give YYYY-MM-DD, `today` or `yesterday`")),
        }
    }
}

impl AsOfArg {
    /// The date, resolving `today` / `yesterday` in `config`'s calendars at `now`.
    pub(crate) fn resolve(
        self,
        config: &streetflow_core::PipelineConfig,
        now: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<chrono::NaiveDate> {
        let today = || anyhow::Ok(config.calendars()?.business_today(now));
        match self {
            Self::Date(date) => Ok(date),
            Self::Today => today(),
            Self::Yesterday => today()?
                .pred_opt()
                .context("no day before the first representable date"),
        }
    }
}

/// The reference data of a feature run: the pipeline's calendars and knowledge rules,
/// and the merchant registry file when one is given.
pub(crate) fn feature_inputs(
    config: &streetflow_core::PipelineConfig,
    registry: Option<&std::path::Path>,
) -> anyhow::Result<streetflow_features::FeatureInputs> {
    let silver = streetflow_features::SilverSettings::of(config)?;
    Ok(streetflow_features::FeatureInputs {
        calendars: silver.calendars,
        registry: match registry {
            Some(path) => streetflow_features::load_registry(path)?,
            None => Vec::new(),
        },
        knowledge: silver.knowledge,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_of_today_is_the_business_date_of_the_pipelines_calendar() {
        let config = load_pipeline(None, serde_json::json!({})).unwrap();
        // 00:30 on 2026-12-02 in Shanghai (the default calendar), still 12-01 in UTC.
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-01T16:30:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let date = |text: &str| text.parse::<chrono::NaiveDate>().unwrap();
        let resolve = |text: &str| {
            text.parse::<AsOfArg>()
                .unwrap()
                .resolve(&config, now)
                .unwrap()
        };
        assert_eq!(resolve("today"), date("2026-12-02"));
        assert_eq!(resolve("yesterday"), date("2026-12-01"));
        assert_eq!(resolve("2025-04-01"), date("2025-04-01"));
        let error = "tomorrow".parse::<AsOfArg>().unwrap_err();
        assert!(error.contains("today"), "{error}");
    }

    #[test]
    fn every_pipeline_file_parses_and_validates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                load_pipeline(Some(&path), serde_json::json!({}))
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 2, "found {seen} pipeline files");
    }

    #[test]
    fn property_names_from_the_environment_get_their_dots_back() {
        let from_env = [("sasl_password".to_owned(), "s3cret".to_owned())];
        let from_file = [("security.protocol".to_owned(), "SASL_SSL".to_owned())];
        let names = librdkafka_names(from_env.into_iter().chain(from_file).collect());
        assert_eq!(
            names.get("sasl.password").map(String::as_str),
            Some("s3cret")
        );
        assert_eq!(
            names.get("security.protocol").map(String::as_str),
            Some("SASL_SSL")
        );
    }

    #[test]
    fn flags_override_the_file_and_unknown_keys_fail() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(&file, "[kafka]\nbrokers = \"file:1\"\ntopic = \"t\"\n").unwrap();
        let mut overrides = serde_json::json!({});
        set_override(&mut overrides, "kafka.brokers", Some("flag:2".into()));
        set_override(&mut overrides, "flush.max_records", Some(5.into()));
        let config = load_pipeline(Some(&file), overrides).unwrap();
        assert_eq!(config.kafka.brokers, "flag:2");
        assert_eq!(config.kafka.topic, "t");
        assert_eq!(config.flush.max_records, 5);
        assert_eq!(config.flush.max_age_ms, 5000);

        std::fs::write(&file, "[kafka]\nbrokerz = \"x\"\n").unwrap();
        let err = format!(
            "{:#}",
            load_pipeline(Some(&file), serde_json::json!({})).unwrap_err()
        );
        assert!(err.contains("brokerz"), "{err}");
        std::fs::write(
            &file,
            "[flush]\nmax_records = 0\n[calendar]\ntime_zone = \"Mars/Base\"\n",
        )
        .unwrap();
        let err = format!(
            "{:#}",
            load_pipeline(Some(&file), serde_json::json!({})).unwrap_err()
        );
        assert!(
            err.contains("max_records") && err.contains("Mars/Base"),
            "{err}"
        );
    }
}
