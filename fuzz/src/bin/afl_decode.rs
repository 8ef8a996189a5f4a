//! AFL++ entry point for the event decoder: `cargo afl fuzz -i fuzz/corpus/decode …`.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        streetflow_fuzz::check_decode(data);
    });
}
