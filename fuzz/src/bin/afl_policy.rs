//! AFL++ entry point for the policy parser: `cargo afl fuzz -i fuzz/corpus/policy …`
//! (build with `--features afl,policy`).
fn main() {
    let runtime = streetflow_fuzz::policy_runtime();
    afl::fuzz!(|data: &[u8]| {
        streetflow_fuzz::check_policy(&runtime, data);
    });
}
