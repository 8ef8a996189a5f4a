#!/bin/sh
# The scheduler of the compose stack: the batch jobs of a day, then sleep until the next.
# Each job is idempotent, so a failed night is repaired by the next run. `--as-of today`
# is the business date in the operators' calendar (the container's clock is UTC: at
# 00:30 in Shanghai `date +%F` still says yesterday).
set -eu
while true; do
  streetflow aggregate --lake /lake
  streetflow features --lake /lake --as-of today --config /etc/streetflow/pipeline.toml
  streetflow decide --lake /lake --as-of today --config /etc/streetflow/pipeline.toml --policy /etc/streetflow/pipelines/policies/district-turnover-loan.toml
  streetflow decide --lake /lake --as-of today --config /etc/streetflow/pipeline.toml --policy /etc/streetflow/pipelines/policies/daily-takings-line.toml
  streetflow compact --lake /lake --table pos_events
  # merchant_daily keeps about one file per business date by itself: each refresh
  # rewrites the files of the days it touches.
  streetflow compact --lake /lake --table merchant_daily_history
  streetflow vacuum --lake /lake --retain-hours 168
  sleep 86400
done
