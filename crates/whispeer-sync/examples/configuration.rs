//! The seed's "Configuration" and "Topic Derivation" examples, as written (crate name adapted).

use whispeer_sync::{TransportConfig, TransportMode, derive_topic};

fn main() {
    // Hyperswarm (default)
    let config = TransportConfig {
        mode: TransportMode::Hyperswarm,
        relay_url: None,
        timeout_ms: 30000,
        encryption: true,
    };
    assert_eq!(config, TransportConfig::default());

    // Relay with custom server
    let config = TransportConfig {
        mode: TransportMode::Relay,
        relay_url: Some("wss://my-relay.example.com".to_string()),
        timeout_ms: 30000,
        encryption: true,
    };
    assert_eq!(config.mode, TransportMode::Relay);

    // Disabled (local-only)
    let config = TransportConfig { mode: TransportMode::Disabled, ..Default::default() };
    assert_eq!(config.mode, TransportMode::Disabled);

    let db_id = "my-database";
    let topic = derive_topic(db_id);
    // topic is now a 32-byte BLAKE2b-256 hash

    // Same database ID always produces same topic
    assert_eq!(derive_topic(db_id), derive_topic(db_id));
    println!("{db_id}: {}", topic.iter().map(|b| format!("{b:02x}")).collect::<String>());
}
