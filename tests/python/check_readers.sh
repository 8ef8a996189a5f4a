#!/usr/bin/env bash
# Builds a small lake through the real path (gen → Kafka → ingest → silver → features →
# decisions)
# and opens it from Python with `deltalake` and polars (check_readers.py).
# Needs: the debug binary, STREETFLOW_TEST_BROKERS, and python3 with deltalake + polars.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${CARGO_TARGET_DIR:-$here/../../target}/debug/streetflow"
brokers="${STREETFLOW_TEST_BROKERS:?set STREETFLOW_TEST_BROKERS to a Kafka-protocol broker}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"

"$bin" gen --merchants 6 --days 60 --seed 23 --start 2025-01-01 --truth truth.csv \
  --registry merchants.csv --duplicate-rate 0.02 --late-rate 0.02 --malformed-rate 0.002 >/dev/null
topic="readers-$$-$RANDOM"
"$bin" produce --brokers "$brokers" --topic "$topic" --input events.jsonl --partitions 2 >/dev/null
# The lake learns the district when the workers commit it (today): knowledge settles
# after a second here (one machine), then features ask what the lake knows by then.
export STREETFLOW__KNOWLEDGE__SETTLE_MS=1000
"$bin" ingest --brokers "$brokers" --topic "$topic" --group "$topic" --lake lake --exit-at-end \
  --max-records 20000 >/dev/null
sleep 2
"$bin" aggregate --lake lake >/dev/null
# The generated days are 2025-01-01 … 2025-03-01: features as of the day after, with the
# latest settled knowledge (after every commit of the workers).
"$bin" features --lake lake --as-of 2025-03-02 --knowledge-time latest \
  --registry merchants.csv >/dev/null
"$bin" decide --lake lake --as-of 2025-03-02 \
  --policy "$here/../../pipelines/policies/district-turnover-loan.toml" >/dev/null
python3 "$here/check_readers.py" lake truth.csv 2025-03-02
