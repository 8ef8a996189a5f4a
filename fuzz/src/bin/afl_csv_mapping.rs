//! AFL++ entry point for the CSV mapping: `cargo afl fuzz -i fuzz/corpus/csv_mapping …`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        streetflow_fuzz::check_csv_mapping(data);
    });
}
