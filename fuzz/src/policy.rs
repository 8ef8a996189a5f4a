//! The policy parser's check (feature `policy`): a risk team's TOML with SQL expressions,
//! planned by DataFusion.

use streetflow_credit::Policy;

/// The runtime [`check_policy`] parses on: one thread, like a single fuzzing process.
pub fn policy_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread Tokio runtime builds")
}

/// Parses one policy text and checks the parser's promise: a policy, or every problem
/// with a location and a message; the same answer twice. `true` when it was accepted;
/// panics when a promise is broken (which is what a fuzzer reports).
pub fn check_policy(runtime: &tokio::runtime::Runtime, data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let first = runtime.block_on(Policy::parse(text, "fuzz.toml"));
    let again = runtime.block_on(Policy::parse(text, "fuzz.toml"));
    match (&first, &again) {
        (Ok(a), Ok(b)) => {
            assert_eq!(
                a.reason_codes(),
                b.reason_codes(),
                "parsing is not deterministic"
            );
            for (code, _) in a.reason_codes() {
                assert!(
                    !code.is_empty(),
                    "an accepted policy has an empty reason code"
                );
            }
            true
        }
        (Err(a), Err(b)) => {
            assert!(!a.problems.is_empty(), "a policy refused without a problem");
            assert_eq!(
                a.problems.len(),
                b.problems.len(),
                "parsing is not deterministic"
            );
            for problem in &a.problems {
                assert!(
                    !problem.location.trim().is_empty() && !problem.message.trim().is_empty(),
                    "a problem without a location or message: {problem:?}"
                );
            }
            false
        }
        _ => panic!("the same text parsed once and was refused once"),
    }
}
