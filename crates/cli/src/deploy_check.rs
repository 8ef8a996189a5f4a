//! The deployment files under `deploy/` checked against this binary: no Docker engine or
//! cluster runs here, so every `streetflow …` command line they contain must parse with
//! the current CLI, every pipeline file they mount must load, and every repository file
//! they refer to inside the image must exist.

use std::path::{Path, PathBuf};

use clap::Parser;
use yaml_rust2::{Yaml, YamlLoader};

use crate::Cli;
use crate::settings::load_pipeline;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo().join(relative))
        .unwrap_or_else(|e| panic!("reading {relative}: {e}"))
}

fn yaml_documents(relative: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(relative))
        .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"))
}

fn strings(node: &Yaml) -> Vec<String> {
    node.as_vec()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Splits a shell command into words (double and single quotes; no expansions).
fn shell_words(command: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in command.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// The `streetflow` invocations of a shell script, with `$today` / `$(date +%F)` given a
/// date.
fn invocations_in_script(script: &str) -> Vec<Vec<String>> {
    script
        .replace("$(date +%F)", "2026-01-01")
        .replace("$today", "2026-01-01")
        .split(['\n', ';'])
        .flat_map(|line| line.split("&&"))
        .map(str::trim)
        .filter(|segment| segment.starts_with("streetflow "))
        .map(shell_words)
        .collect()
}

/// Command lines of the Kubernetes containers in a document (image entrypoint:
/// `streetflow`).
fn kubernetes_invocations(node: &Yaml, found: &mut Vec<Vec<String>>) {
    match node {
        Yaml::Hash(map) => {
            for (key, value) in map {
                if key.as_str() == Some("containers") {
                    for container in value.as_vec().into_iter().flatten() {
                        let command = strings(&container["command"]);
                        let args = strings(&container["args"]);
                        match command.as_slice() {
                            [] => {
                                let mut argv = vec!["streetflow".to_owned()];
                                argv.extend(args);
                                found.push(argv);
                            }
                            [shell, flag] if shell.ends_with("sh") && flag == "-c" => {
                                for script in &args {
                                    found.extend(invocations_in_script(script));
                                }
                            }
                            other => panic!("unexpected container command {other:?}"),
                        }
                    }
                } else {
                    kubernetes_invocations(value, found);
                }
            }
        }
        Yaml::Array(items) => items.iter().for_each(|i| kubernetes_invocations(i, found)),
        _ => {}
    }
}

/// Paths inside the image that come from the repository.
fn repository_file(in_image: &str) -> Option<PathBuf> {
    in_image
        .strip_prefix("/etc/streetflow/pipelines/")
        .map(|rest| repo().join("pipelines").join(rest))
}

fn check_invocation(argv: &[String], source: &str) {
    if let Err(error) = Cli::try_parse_from(argv) {
        panic!(
            "{source}: `{}` is refused by the CLI:\n{error}",
            argv.join(" ")
        );
    }
    for word in argv {
        if let Some(file) = repository_file(word) {
            assert!(
                file.exists(),
                "{source}: {word} is not in the image ({} missing)",
                file.display()
            );
        }
    }
}

fn check_pipeline_text(text: &str, source: &str) -> streetflow_core::PipelineConfig {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pipeline.toml");
    std::fs::write(&path, text).expect("write pipeline");
    load_pipeline(Some(&path), serde_json::json!({}))
        .unwrap_or_else(|e| panic!("{source}: the mounted pipeline does not load: {e:#}"))
}

#[test]
fn every_kubernetes_command_parses_and_every_mounted_config_loads() {
    let mut invocations = Vec::new();
    let mut pipeline = None;
    let mut grace_seconds = None;
    for file in [
        "configmap.yaml",
        "lake-pvc.yaml",
        "ingest.yaml",
        "serve.yaml",
        "cronjobs.yaml",
    ] {
        let relative = format!("deploy/kubernetes/{file}");
        for document in yaml_documents(&relative) {
            kubernetes_invocations(&document, &mut invocations);
            if let Some(text) = document["data"]["pipeline.toml"].as_str() {
                pipeline = Some(check_pipeline_text(text, &relative));
            }
            if document["metadata"]["name"].as_str() == Some("streetflow-ingest") {
                grace_seconds =
                    document["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_i64();
                let annotations = &document["spec"]["template"]["metadata"]["annotations"];
                assert_eq!(annotations["prometheus.io/scrape"].as_str(), Some("true"));
                let probe =
                    &document["spec"]["template"]["spec"]["containers"][0]["readinessProbe"];
                assert_eq!(probe["httpGet"]["path"].as_str(), Some("/healthz"));
            }
        }
    }
    // Deployments, the Service and three CronJobs with five jobs between them.
    assert!(invocations.len() >= 8, "{invocations:?}");
    for argv in &invocations {
        check_invocation(argv, "deploy/kubernetes");
    }
    let pipeline = pipeline.expect("the ConfigMap holds pipeline.toml");
    // Enough time after SIGTERM for a flush of the oldest buffered record and a commit.
    let grace = grace_seconds.expect("ingest sets terminationGracePeriodSeconds");
    assert!(
        grace * 1000 >= 5 * pipeline.flush.max_age_ms as i64,
        "{grace} s"
    );
    // No secret values in the ConfigMap: they come from the Secret.
    for key in pipeline.kafka.properties.keys() {
        assert!(!streetflow_core::config::is_secret_property(key), "{key}");
    }
    let kustomization = read("deploy/kubernetes/kustomization.yaml");
    for file in [
        "configmap.yaml",
        "lake-pvc.yaml",
        "ingest.yaml",
        "serve.yaml",
        "cronjobs.yaml",
    ] {
        assert!(
            kustomization.contains(file),
            "{file} not in kustomization.yaml"
        );
    }
}

#[test]
fn every_compose_command_parses_and_every_mounted_config_loads() {
    let documents = yaml_documents("deploy/compose.yaml");
    let services = documents[0]["services"]
        .as_hash()
        .expect("compose.yaml has services");
    let mut invocations = 0;
    let mut workers = 0;
    for (name, service) in services {
        let name = name.as_str().unwrap_or_default();
        // `<<: *streetflow` merges the shared settings (aliases arrive resolved).
        let shared = &service["<<"];
        let image = service["image"]
            .as_str()
            .or_else(|| shared["image"].as_str())
            .unwrap_or_default();
        if !image.starts_with("streetflow") {
            continue;
        }
        let volumes = if service["volumes"].is_badvalue() {
            strings(&shared["volumes"])
        } else {
            strings(&service["volumes"])
        };
        for volume in &volumes {
            if let Some(host) = volume.strip_prefix("./") {
                let host = host.split(':').next().unwrap_or_default();
                let path = format!("deploy/{host}");
                if host.ends_with(".toml") {
                    check_pipeline_text(&read(&path), &path);
                } else {
                    assert!(repo().join(&path).exists(), "{name} mounts missing {path}");
                }
            }
        }
        let command = strings(&service["command"]);
        let entrypoint = strings(&service["entrypoint"]);
        if entrypoint.is_empty() {
            let mut argv = vec!["streetflow".to_owned()];
            argv.extend(command.iter().cloned());
            check_invocation(&argv, name);
            invocations += 1;
            if command.first().map(String::as_str) == Some("ingest") {
                workers += 1;
            }
        } else {
            // A script mounted from deploy/compose/.
            let script = command.first().expect("a script to run");
            let host = volumes
                .iter()
                .find_map(|v| {
                    let (host, inside) = v.split_once(':')?;
                    inside
                        .starts_with(script.as_str())
                        .then(|| host.trim_start_matches("./"))
                })
                .unwrap_or_else(|| panic!("{name} runs {script}, which it does not mount"));
            for argv in invocations_in_script(&read(&format!("deploy/{host}"))) {
                check_invocation(&argv, name);
                invocations += 1;
            }
        }
    }
    assert_eq!(workers, 2, "two ingest workers");
    assert!(invocations >= 9, "{invocations} command lines");
    // The topic has at least as many partitions as there are workers.
    let topics = strings(&services[&Yaml::from_str("topics")]["command"]).join(" ");
    assert!(topics.contains("--partitions 12"), "{topics}");
}

#[test]
fn the_image_is_multi_stage_slim_and_not_root() {
    let dockerfile = read("deploy/Dockerfile");
    let stages: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(stages.len(), 2, "{stages:?}");
    assert!(
        stages[0].contains("rust:1.95"),
        "the build stage uses the project's toolchain"
    );
    assert!(stages[1].contains("slim"));
    assert!(dockerfile.contains("cargo build --release --locked -p streetflow"));
    let user = dockerfile
        .lines()
        .rfind(|l| l.starts_with("USER "))
        .expect("a USER line");
    assert!(!user.contains("root") && !user.ends_with(" 0"), "{user}");
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/bin/tini\", \"--\", \"streetflow\"]"));
}

#[test]
fn shell_scripts_are_split_into_streetflow_command_lines() {
    let found = invocations_in_script(
        "today=\"$(date +%F)\" &&\n  streetflow features --lake /lake --as-of \"$today\" && streetflow vacuum --lake '/my lake'",
    );
    assert_eq!(
        found,
        vec![
            vec![
                "streetflow",
                "features",
                "--lake",
                "/lake",
                "--as-of",
                "2026-01-01"
            ],
            vec!["streetflow", "vacuum", "--lake", "/my lake"],
        ]
    );
}
