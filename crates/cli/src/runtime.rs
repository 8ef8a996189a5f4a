//! The async runtime every command runs its library calls on.

use anyhow::Context;

/// A multi-threaded Tokio runtime with two worker threads (this machine class has two
/// cores; the builders of silver and features start threads of their own).
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("streetflow-io")
        .build()
        .context("starting the async runtime")
}
