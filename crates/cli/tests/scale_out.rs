//! Scale-out: one worker and then three workers in one group ingest the same 12-partition
//! topic; both lakes hold every record once, and `bench ingest` reports the speed-up.
//! (The speed-up itself is measured by the benchmark on a release build, not asserted.)

#![allow(clippy::unwrap_used)] // test helpers may panic on broken fixtures

mod common;

use common::*;

#[test]
fn one_and_three_workers_store_every_record_and_the_speed_up_is_reported() {
    let (_guard, dir) = workdir();
    let work = dir.join("bench").display().to_string();
    let output = run(
        &dir,
        &[
            "bench",
            "ingest",
            "--events",
            "30000",
            "--brokers",
            broker(),
            "--partitions",
            "12",
            "--flush-records",
            "5000",
            "--scale-workers",
            "3",
            "--workdir",
            &work,
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    // The benchmark fails unless each run stored all 30,000 records.
    assert!(
        stdout.contains("full ingest (one worker, Kafka → Delta)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("full ingest (3 workers, one group, 12 partitions)"),
        "{stdout}"
    );
    let speed_up = stdout
        .lines()
        .find(|l| l.starts_with("speed-up of the workers over one worker"))
        .unwrap_or_else(|| panic!("no speed-up line in {stdout}"));
    assert!(speed_up.ends_with('%'), "{speed_up}");
}
