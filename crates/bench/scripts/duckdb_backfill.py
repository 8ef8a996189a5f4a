# DuckDB's side of `streetflow bench backfill`: reads the same JSON Lines export and
# writes the same daily totals, timed in the process.
# Usage (the benchmark runs it): python3 duckdb_backfill.py EVENTS WORKDIR THREADS
import json, sys, time
import duckdb

events, work, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
def text(name):
    with open(f"{work}/sql/{name}.sql") as f:
        return f.read()

started = time.perf_counter()
con = duckdb.connect(f"{work}/duck.db")
con.execute(f"SET threads = {threads}")
con.execute(f"SET temp_directory = '{work}/duck.tmp'")
# The generator writes every occurred_at in +08:00 (Asia/Shanghai, no daylight saving),
# so the business date and local minute are read off the text; streetflow places each
# event on its operator's calendar instead (a little more work, kept on DuckDB's side).
con.execute(f"""
CREATE TABLE events AS
SELECT
  operator_id,
  CAST(substr(occurred_at, 1, 10) AS DATE) AS business_date,
  event_id, merchant_id, terminal_id, kind, amount_fen, currency,
  CAST(occurred_at AS TIMESTAMPTZ) AS occurred_at,
  28800 AS utc_offset_seconds,
  CAST(substr(occurred_at, 12, 2) AS INTEGER) * 60 + CAST(substr(occurred_at, 15, 2) AS INTEGER)
    AS local_minute_of_day,
  channel, ref_event_id, payer_ref,
  TIMESTAMPTZ '2026-01-01 00:00:00+00' AS knowledge_time,
  CAST(NULL AS VARCHAR) AS kafka_topic, CAST(NULL AS INTEGER) AS kafka_partition,
  CAST(NULL AS BIGINT) AS kafka_offset,
  'events.jsonl' AS source_file, row_number() OVER () AS source_line
FROM read_json('{events}', format = 'newline_delimited', columns = {{
  'event_id': 'VARCHAR', 'operator_id': 'VARCHAR', 'merchant_id': 'VARCHAR',
  'terminal_id': 'VARCHAR', 'kind': 'VARCHAR', 'amount_fen': 'BIGINT', 'currency': 'VARCHAR',
  'occurred_at': 'VARCHAR', 'channel': 'VARCHAR', 'ref_event_id': 'VARCHAR',
  'payer_ref': 'VARCHAR'}})
""")
with open(f"{work}/sql/steps.txt") as f:
    for line in f:
        name, kind = line.split()
        con.execute(f"CREATE {kind} {name} AS " + text(name))
columns = [
    f'CAST("{name}" AS BIGINT) AS "{name}"' if kind == "HUGEINT" else f'"{name}"'
    for name, kind in con.execute("SELECT column_name, column_type FROM (DESCRIBE daily)").fetchall()
]
con.execute(f"COPY (SELECT {', '.join(columns)} FROM daily) TO '{work}/duckdb_daily.parquet' (FORMAT parquet)")
seconds = time.perf_counter() - started
days, sales, net, refunds = con.execute(
    "SELECT count(*), sum(sales_count), sum(net_fen), sum(refund_fen) FROM daily").fetchone()
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "version": duckdb.__version__, "peak_rss": peak,
                  "totals": {"days": days, "sales_count": int(sales), "net_fen": int(net),
                             "refund_fen": int(refunds)}}))
