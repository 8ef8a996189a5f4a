//! The async runtime the commands drive the lake (and the broker clients) from.

/// A multi-threaded Tokio runtime with two worker threads for I/O: the builders of silver
/// and features, the decoders and DataFusion's heavy operators start threads of their
/// own or run on these few, so more would only compete for the same cores.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("streetflow-io")
        .build()
}
