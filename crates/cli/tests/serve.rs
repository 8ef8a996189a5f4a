//! `streetflow serve` on a small generated lake: stored decisions with the features behind
//! their reasons, one-merchant evaluation equal to the batch decision, JSON errors,
//! health and metrics.

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chrono::{NaiveDate, Utc};
use common::*;
use serde_json::Value;

const PRODUCT: &str = "district-turnover-loan";

fn policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/policies")
}

/// The bearer tokens the test's server accepts (`STREETFLOW_SERVE_TOKENS`).
const TOKENS: &str = "first-token,second-token";

/// One HTTP/1.1 request with an accepted token; returns the status and the body.
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    http_as(addr, Some("second-token"), method, path, body)
}

/// One HTTP/1.1 request with `token` as bearer token (`None`: no Authorization header).
fn http_as(addr: &str, token: Option<&str>, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let authorization =
        token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         {authorization}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Asserts an error answer: the status and the JSON error code.
fn assert_error(answer: (u16, String), status: u16, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    assert_eq!(json_of(&answer.1)["error"]["code"], code, "{}", answer.1);
}

/// Rows of a query as JSON objects, through `streetflow sql --format json`.
fn rows(dir: &Path, lake: &str, query: &str) -> Vec<Value> {
    let output = run(dir, &["sql", "--lake", lake, "--format", "json", query]);
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(json_of)
        .collect()
}

#[test]
fn serves_decisions_evaluates_one_merchant_like_the_batch_and_answers_errors_in_json() {
    let (_guard, dir) = workdir();
    let work = dir.join("bench");
    let work_arg = work.display().to_string();
    run(
        &dir,
        &[
            "bench",
            "features",
            "--merchants",
            "12",
            "--days",
            "200",
            "--sales-per-day",
            "4",
            "--skip-duckdb",
            "--workdir",
            &work_arg,
        ],
    );
    let lake = work.join("lake").display().to_string();
    let policy = policies().join(format!("{PRODUCT}.toml"));
    // The batch jobs of one business day: features, then decisions.
    let features_and_decide = |as_of: &str| {
        run(&dir, &["features", "--lake", &lake, "--as-of", as_of]);
        run(
            &dir,
            &[
                "decide",
                "--lake",
                &lake,
                "--as-of",
                as_of,
                "--policy",
                policy.to_str().unwrap(),
            ],
        );
    };
    features_and_decide("2026-01-01");
    let stored = rows(
        &dir,
        &lake,
        "SELECT operator_id, merchant_id, decision, limit_fen, reasons FROM credit_decisions \
         ORDER BY cardinality(reasons) DESC, operator_id, merchant_id",
    );
    assert_eq!(stored.len(), 12);

    let policies_arg = policies().display().to_string();
    let mut server = Worker::start(
        &dir,
        &[
            "serve".into(),
            "--lake".into(),
            lake.clone(),
            "--addr".into(),
            "127.0.0.1:0".into(),
            "--policies".into(),
            policies_arg,
            // Cache the daily history of the lookback window of 2026-01-01 (the bench's
            // as-of date) so evaluations below take the in-memory path.
            "--refresh-seconds".into(),
            "1".into(),
            "--cache-days".into(),
            (Utc::now().date_naive() - NaiveDate::from_ymd_opt(2024, 9, 1).unwrap())
                .num_days()
                .to_string(),
        ],
        &[("RUST_LOG", "info"), ("STREETFLOW_SERVE_TOKENS", TOKENS)],
    );
    let lines = server.wait_for("listening on http://", Duration::from_secs(60));
    assert!(
        lines.iter().any(|l| l.contains("daily history cached")),
        "{lines:?}"
    );
    let line = lines.last().unwrap();
    let addr = line
        .split("listening on http://")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches('"')
        .to_owned();

    let (status, body) = http(&addr, "GET", "/healthz", "");
    assert_eq!(status, 200, "{body}");
    let health = json_of(&body);
    assert_eq!(health["status"], "ok");
    assert!(
        health["products"]
            .as_array()
            .unwrap()
            .contains(&PRODUCT.into())
    );

    // The stored decision with the most reasons, and the feature values behind them.
    let first = &stored[0];
    let (operator, merchant) = (
        first["operator_id"].as_str().unwrap(),
        first["merchant_id"].as_str().unwrap(),
    );
    // The merchant's latest decision through the API, and the body as text.
    let latest_decision = || {
        let (status, body) = http(
            &addr,
            "GET",
            &format!("/v1/merchants/{operator}/{merchant}/decision?product={PRODUCT}"),
            "",
        );
        assert_eq!(status, 200, "{body}");
        (json_of(&body), body)
    };
    let (decision, body) = latest_decision();
    assert_eq!(decision["decision"], first["decision"]);
    assert_eq!(decision["limit_fen"], first["limit_fen"]);
    assert_eq!(decision["as_of_date"], "2026-01-01");
    let reasons = decision["reasons"].as_array().unwrap();
    let codes: Vec<&Value> = reasons.iter().map(|r| &r["code"]).collect();
    let stored_codes: Vec<&Value> = first["reasons"].as_array().unwrap().iter().collect();
    assert_eq!(codes, stored_codes);
    assert!(!reasons.is_empty(), "{body}");
    let feature_row = &rows(
        &dir,
        &lake,
        &format!(
            "SELECT * FROM merchant_features WHERE operator_id = '{operator}' \
             AND merchant_id = '{merchant}'"
        ),
    )[0];
    let mut features_shown = 0;
    for reason in reasons {
        assert!(!reason["meaning"].as_str().unwrap().is_empty(), "{reason}");
        for (name, value) in reason["features"].as_object().unwrap() {
            assert_eq!(value, &feature_row[name], "{name} of {reason}");
            features_shown += 1;
        }
    }
    assert!(features_shown > 0, "{body}");

    // A decide run for a later date while the server runs: within a few refresh periods
    // the merchant's latest decision is that one, its reasons from that day's features.
    features_and_decide("2026-01-02");
    let later = rows(
        &dir,
        &lake,
        &format!(
            "SELECT decision, limit_fen FROM credit_decisions WHERE as_of_date = DATE '2026-01-02' \
             AND operator_id = '{operator}' AND merchant_id = '{merchant}'"
        ),
    );
    assert_eq!(later.len(), 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let newest = loop {
        let (decision, body) = latest_decision();
        if decision["as_of_date"] == "2026-01-02" {
            break decision;
        }
        assert!(
            Instant::now() < deadline,
            "still the old decision after 30 s: {body}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(newest["decision"], later[0]["decision"]);
    assert_eq!(newest["limit_fen"], later[0]["limit_fen"]);

    // One merchant evaluated on its own daily history decides as the batch did.
    for row in &stored {
        let request = serde_json::json!({
            "operator_id": row["operator_id"],
            "merchant_id": row["merchant_id"],
            "product": PRODUCT,
            "as_of_date": "2026-01-01",
        });
        let (status, body) = http(
            &addr,
            "POST",
            "/v1/decisions:evaluate",
            &request.to_string(),
        );
        assert_eq!(status, 200, "{body}");
        let answer = json_of(&body);
        assert_eq!(answer["decision"], row["decision"], "{body}");
        assert_eq!(answer["limit_fen"], row["limit_fen"], "{body}");
        let answer_codes: Vec<&Value> = answer["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| &r["code"])
            .collect();
        let row_codes: Vec<&Value> = row["reasons"].as_array().unwrap().iter().collect();
        assert_eq!(answer_codes, row_codes, "{body}");
        assert_eq!(answer["policy_version"], "2026.1");
    }

    // Errors the caller can fix: 4xx with a JSON body naming the problem.
    let decision_path = format!("/v1/merchants/{operator}/{merchant}/decision");
    assert_error(http(&addr, "GET", &decision_path, ""), 400, "bad_request");
    assert_error(
        http(
            &addr,
            "GET",
            &format!("{decision_path}?product=mortgage"),
            "",
        ),
        404,
        "unknown_product",
    );
    assert_error(
        http(
            &addr,
            "GET",
            &format!("{decision_path}?product={PRODUCT}&x=1"),
            "",
        ),
        400,
        "bad_request",
    );
    assert_error(
        http(
            &addr,
            "GET",
            &format!("/v1/merchants/{operator}/nobody/decision?product={PRODUCT}"),
            "",
        ),
        404,
        "no_decision",
    );
    // Merchant ids may be any script (the event contract allows it); one that looks
    // like SQL is only an id nobody has.
    for merchant_id in ["%E5%92%96%E5%95%A1%E9%A6%86", "x'%20OR%201=1"] {
        assert_error(
            http(
                &addr,
                "GET",
                &format!("/v1/merchants/{operator}/{merchant_id}/decision?product={PRODUCT}"),
                "",
            ),
            404,
            "no_decision",
        );
    }
    assert_error(
        http(
            &addr,
            "GET",
            &format!("/v1/merchants/Not%20An%20Operator/{merchant}/decision?product={PRODUCT}"),
            "",
        ),
        400,
        "bad_request",
    );
    let unicode = serde_json::json!({
        "operator_id": operator, "merchant_id": "咖啡馆", "product": PRODUCT,
        "as_of_date": "2026-01-01",
    });
    assert_error(
        http(
            &addr,
            "POST",
            "/v1/decisions:evaluate",
            &unicode.to_string(),
        ),
        404,
        "unknown_merchant",
    );

    // Limits: extreme dates, dates before the cached days, and large bodies are refused
    // with JSON errors.
    for (as_of_date, status, code) in [
        ("+262142-12-31", 400, "bad_request"),
        ("-262143-01-01", 400, "bad_request"),
        ("2000-01-01", 422, "outside_window"),
    ] {
        let request = format!(
            r#"{{"operator_id": "{operator}", "merchant_id": "{merchant}", "product": "{PRODUCT}", "as_of_date": "{as_of_date}"}}"#
        );
        assert_error(
            http(&addr, "POST", "/v1/decisions:evaluate", &request),
            status,
            code,
        );
    }
    let large = format!(r#"{{"operator_id": "{}"}}"#, "a".repeat(100_000));
    assert_error(
        http(&addr, "POST", "/v1/decisions:evaluate", &large),
        413,
        "body_too_large",
    );

    // Credentials: every /v1 route needs an accepted bearer token; health and metrics
    // stay open.
    let evaluate = serde_json::json!({
        "operator_id": operator, "merchant_id": merchant, "product": PRODUCT,
        "as_of_date": "2026-01-01",
    })
    .to_string();
    for token in [None, Some("wrong-token"), Some("")] {
        for (method, path, body) in [
            (
                "GET",
                format!("/v1/merchants/{operator}/{merchant}/decision?product={PRODUCT}"),
                "",
            ),
            (
                "POST",
                "/v1/decisions:evaluate".to_owned(),
                evaluate.as_str(),
            ),
        ] {
            assert_error(
                http_as(&addr, token, method, &path, body),
                401,
                "unauthorized",
            );
        }
    }
    let (status, body) = http_as(
        &addr,
        Some("first-token"),
        "POST",
        "/v1/decisions:evaluate",
        &evaluate,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(http_as(&addr, None, "GET", "/healthz", "").0, 200);
    let unknown = serde_json::json!({
        "operator_id": operator, "merchant_id": "nobody", "product": PRODUCT,
        "as_of_date": "2026-01-01",
    });
    assert_error(
        http(
            &addr,
            "POST",
            "/v1/decisions:evaluate",
            &unknown.to_string(),
        ),
        404,
        "unknown_merchant",
    );
    assert_error(
        http(&addr, "POST", "/v1/decisions:evaluate", "{not json"),
        400,
        "bad_request",
    );
    assert_error(
        http(
            &addr,
            "POST",
            "/v1/decisions:evaluate",
            r#"{"operator_id": "a", "merchant_id": "b", "product": "district-turnover-loan", "as_of_date": "yesterday"}"#,
        ),
        400,
        "bad_request",
    );
    assert_error(http(&addr, "GET", "/v2/anything", ""), 404, "not_found");

    let (status, metrics) = http(&addr, "GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("streetflow_http_requests_total")
            && metrics.contains("route=\"/v1/decisions:evaluate\""),
        "{metrics}"
    );
    assert!(server.terminate(Duration::from_secs(30)).success());
}
