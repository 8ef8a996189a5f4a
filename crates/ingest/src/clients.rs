//! The one place every librdkafka client is configured: what each role needs, then the
//! pipeline's own `[kafka.properties]` (TLS, SASL, tuning) over it, so a setting a
//! pipeline gives applies to every client alike.

use rdkafka::config::ClientConfig;

/// What a client is for; each role brings the settings its code relies on.
#[derive(Debug, Clone, Copy)]
pub enum ClientRole<'a> {
    /// An ingest worker: a group member that stores no offsets in Kafka (the lake holds
    /// them), reports ends of partitions and statistics, and fetches in large batches.
    Worker {
        /// Consumer group.
        group: &'a str,
        /// Client id, named in the broker's group description.
        client_id: &'a str,
    },
    /// A consumer that only asks (metadata, watermarks): `doctor`.
    Inspector {
        /// Consumer group whose committed offsets it may read.
        group: &'a str,
    },
    /// A plain reader of a whole topic in large fetches (the benchmark's baseline).
    Reader {
        /// Consumer group.
        group: &'a str,
    },
    /// `produce`: batches for throughput; no idempotence (a test tool, re-run to retry).
    Producer,
    /// The dead-letter producer of a worker: acknowledged and never duplicated by its
    /// own retries (unless the pipeline chose `acks` or `enable.idempotence` itself).
    DeadLetters,
    /// Topic administration.
    Admin,
}

/// The configuration of a client of `role` for `brokers`, with `properties` applied last.
pub fn client_config<K, V>(
    brokers: &str,
    properties: impl IntoIterator<Item = (K, V)>,
    role: ClientRole<'_>,
) -> ClientConfig
where
    K: AsRef<str>,
    V: AsRef<str>,
{
    let properties: Vec<(K, V)> = properties.into_iter().collect();
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", brokers);
    match role {
        ClientRole::Worker { group, client_id } => {
            client
                .set("client.id", client_id)
                .set("group.id", group)
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("auto.offset.reset", "earliest")
                .set("enable.partition.eof", "true")
                .set("statistics.interval.ms", "5000");
            large_fetches(&mut client);
        }
        ClientRole::Inspector { group } => {
            client
                .set("group.id", group)
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "true");
        }
        ClientRole::Reader { group } => {
            client
                .set("group.id", group)
                .set("enable.auto.commit", "false");
            large_fetches(&mut client);
        }
        ClientRole::Producer => {
            client
                .set("linger.ms", "20")
                .set("batch.num.messages", "10000")
                .set("queue.buffering.max.messages", "500000")
                .set("enable.idempotence", "false");
        }
        ClientRole::DeadLetters => {
            // A flush commits its dead letters only after the DLQ topic has them.
            let chosen = |name: &str| properties.iter().any(|(k, _)| k.as_ref() == name);
            if !chosen("acks") && !chosen("enable.idempotence") {
                client.set("enable.idempotence", "true");
            }
            client.set("message.timeout.ms", "30000");
        }
        ClientRole::Admin => {}
    }
    for (key, value) in &properties {
        client.set(key.as_ref(), value.as_ref());
    }
    client
}

/// Larger fetches: measured ~2.5x the default throughput on the test broker.
fn large_fetches(client: &mut ClientConfig) {
    client
        .set("fetch.min.bytes", "1000000")
        .set("fetch.wait.max.ms", "200")
        .set("max.partition.fetch.bytes", "10485760");
}

#[cfg(test)]
mod tests {
    use super::{ClientRole, client_config};

    #[test]
    fn the_pipeline_properties_override_the_role() {
        let worker = client_config(
            "b:9092",
            [("fetch.wait.max.ms", "50"), ("security.protocol", "SSL")],
            ClientRole::Worker {
                group: "g",
                client_id: "w1",
            },
        );
        assert_eq!(worker.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(worker.get("enable.auto.commit"), Some("false"));
        assert_eq!(worker.get("fetch.wait.max.ms"), Some("50"));
        assert_eq!(worker.get("security.protocol"), Some("SSL"));
    }

    #[test]
    fn dead_letters_are_idempotent_unless_the_pipeline_chose_acks() {
        let none: [(&str, &str); 0] = [];
        let default = client_config("b", none, ClientRole::DeadLetters);
        assert_eq!(default.get("enable.idempotence"), Some("true"));
        let chosen = client_config("b", [("acks", "1")], ClientRole::DeadLetters);
        assert_eq!(chosen.get("enable.idempotence"), None);
        assert_eq!(chosen.get("acks"), Some("1"));
        let off = client_config(
            "b",
            [("enable.idempotence", "false")],
            ClientRole::DeadLetters,
        );
        assert_eq!(off.get("enable.idempotence"), Some("false"));
        assert_eq!(off.get("message.timeout.ms"), Some("30000"));
    }
}
