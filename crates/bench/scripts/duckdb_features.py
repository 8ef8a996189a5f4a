# DuckDB's side of `streetflow bench features`: the shipped feature SQL over the same
# Parquet files of merchant_daily_history, timed in the process.
# Usage (the benchmark runs it): python3 duckdb_features.py WORKDIR THREADS
import glob, json, os, sys, time
import duckdb

work, threads = sys.argv[1], int(sys.argv[2])
def text(name):
    with open(f"{work}/sql/{name}.sql") as f:
        return f.read()

started = time.perf_counter()
con = duckdb.connect()
con.execute(f"SET threads = {threads}")
# merchant_features.sql divides integers as integers (DataFusion's and SQL's rule).
con.execute("SET integer_division = true")
with open(f"{work}/history_files.txt") as f:
    files = [line.strip() for line in f if line.strip()]
con.execute(
    "CREATE VIEW merchant_daily_history AS SELECT * FROM read_parquet("
    f"{files!r}, hive_partitioning = true, hive_types = {{'business_month': DATE}})")
for path in sorted(glob.glob(f"{work}/reference/*.parquet")):
    name = os.path.basename(path)[: -len(".parquet")]
    con.execute(f"CREATE TABLE {name} AS SELECT * FROM read_parquet('{path}')")
# The relations in streetflow's order, each a view or a table as streetflow keeps it.
with open(f"{work}/sql/steps.txt") as f:
    for line in f:
        name, kind = line.split()
        con.execute(f"CREATE {kind} {name} AS " + text(name))
seconds = time.perf_counter() - started
rows = con.execute("SELECT count(*) FROM features").fetchone()[0]
# Sums of BIGINT are HUGEINT in DuckDB; store them as BIGINT for the comparison.
columns = [
    f'CAST("{name}" AS BIGINT) AS "{name}"' if kind == "HUGEINT" else f'"{name}"'
    for name, kind in con.execute("SELECT column_name, column_type FROM (DESCRIBE features)").fetchall()
]
con.execute(f"COPY (SELECT {', '.join(columns)} FROM features) TO '{work}/duckdb_features.parquet' (FORMAT parquet)")
# VmHWM, not ru_maxrss: the latter starts at the parent's peak after fork and exec.
with open("/proc/self/status") as f:
    peak = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "rows": rows, "version": duckdb.__version__, "peak_rss": peak}))
