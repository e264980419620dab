//! Loading the configuration: defaults, file, environment, and the example file.

use figment::Jail;

use super::*;

#[test]
fn defaults_need_no_file() {
    Jail::expect_with(|_jail| {
        let config = Config::load(Path::new("whispeer.toml"), false).unwrap().0;
        assert_eq!(config, Config::default());
        assert_eq!(config.listen, DEFAULT_LISTEN);
        Ok(())
    });
}

#[test]
fn file_then_environment_override_defaults() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "whispeer.toml",
            r#"
            listen = "127.0.0.1:9000"
            api_keys = ["one"]
            [limits]
            max_message_bytes = 4096
            [queues]
            slow_consumer = "drop-newest"
            [delivery]
            ack_timeout_ms = 500
            max_attempts = 3
            [[delivery.ttl]]
            filter = "quotes/#"
            ttl_ms = 2000
            [[retention]]
            filter = "log/#"
            max_messages = 500
            max_age_ms = 60000
            "#,
        )?;
        jail.set_env("WHISPEER_LISTEN", "127.0.0.1:9001");
        jail.set_env("WHISPEER_LIMITS__MAX_TOPIC_DEPTH", "8");
        jail.set_env("WHISPEER_KEY", "1:not-a-config-key");
        let config = Config::load(Path::new("whispeer.toml"), false).unwrap().0;
        assert_eq!(config.listen, "127.0.0.1:9001");
        assert_eq!(config.api_keys, ["one"]);
        assert_eq!(config.limits.max_message_bytes, 4096);
        assert_eq!(config.limits.max_topic_depth, 8);
        jail.set_env("WHISPEER_DELIVERY__GROUP_LINGER_MS", "0");
        let config = Config::load(Path::new("whispeer.toml"), false).unwrap().0;
        let options = config.broker_options().unwrap();
        assert_eq!(options.slow_consumer, SlowConsumer::DropNewest);
        assert_eq!(options.redelivery.ack_timeout, Duration::from_millis(500));
        assert_eq!(options.redelivery.max_attempts, 3);
        assert_eq!(options.group_linger, Duration::ZERO);
        assert_eq!(options.topic_ttl[0].0.as_str(), "quotes/#");
        let retention = options.retention[0].1;
        assert_eq!((retention.max_messages, retention.max_bytes), (500, usize::MAX));
        assert_eq!(retention.max_age, Some(Duration::from_secs(60)));
        assert_eq!(options.back_pressure_timeout, Duration::from_secs(10));
        jail.set_env("WHISPEER_QUEUES__SLOW_CONSUMER", "back-pressure");
        jail.set_env("WHISPEER_QUEUES__BACK_PRESSURE_TIMEOUT_MS", "2500");
        let options = Config::load(Path::new("whispeer.toml"), false).unwrap().0.broker_options();
        let options = options.unwrap();
        assert_eq!(options.slow_consumer, SlowConsumer::BackPressure);
        assert_eq!(options.back_pressure_timeout, Duration::from_millis(2500));
        jail.set_env("WHISPEER_DELIVERY__JITTER", "2");
        let config = Config::load(Path::new("whispeer.toml"), false).unwrap().0;
        assert!(config.broker_options().is_err(), "jitter above 1");
        Ok(())
    });
}

#[test]
fn users_get_their_own_keys_and_permissions() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "whispeer.toml",
            r#"
            api_keys = ["ops"]
            [[users]]
            name = "alice"
            api_key = "alice-secret"
            publish = ["chat/+"]
            subscribe = ["chat/#"]
            deny_subscribe = ["chat/admin"]
            groups = ["chat-*"]
            "#,
        )?;
        let config = Config::load(Path::new("whispeer.toml"), false).unwrap().0;
        let server = config.server_config().unwrap();
        let alice = server.api_keys.principal(b"alice-secret").unwrap();
        assert_eq!(alice.name, "alice");
        assert!(alice.permissions.may_publish(&whispeer::Topic::parse("chat/x").unwrap()));
        assert!(!alice.permissions.may_publish(&whispeer::Topic::parse("news").unwrap()));
        assert!(alice.permissions.may_join("alice", "chat-readers"));
        assert!(!alice.permissions.may_join("alice", "billing"));
        assert_eq!(
            server.api_keys.principal(b"ops").unwrap().permissions,
            whispeer::server::Permissions::everything()
        );
        jail.create_file(
            "bad.toml",
            "[[users]]\nname = \"bob\"\napi_key = \"k\"\npublish = [\"a/#/b\"]",
        )?;
        let bad = Config::load(Path::new("bad.toml"), true).unwrap().0;
        let err = format!("{:#}", bad.server_config().unwrap_err());
        assert!(err.contains("users[bob].publish"), "{err}");
        Ok(())
    });
}

#[test]
fn unknown_variables_are_ignored_and_reported_but_file_typos_stay_errors() {
    Jail::expect_with(|jail| {
        jail.set_env("WHISPEER_BIN", "/opt/whispeer/bin/whispeer");
        jail.set_env("WHISPEER_LIMITS__NOT_A_LIMIT", "1");
        jail.set_env("WHISPEER_KEY", "1:not-a-config-key");
        jail.set_env("WHISPEER_SERVER", "127.0.0.1:1");
        // Keys whose default is empty are keys all the same.
        jail.set_env("WHISPEER_STORAGE__DIR", "data");
        jail.set_env("WHISPEER_TLS__CLIENT_CA", "ca.pem");
        jail.set_env("WHISPEER_AUTH_TIMEOUT_MS", "750");
        let (config, ignored) = Config::load(Path::new("whispeer.toml"), false).unwrap();
        assert_eq!(ignored, ["WHISPEER_BIN", "WHISPEER_LIMITS__NOT_A_LIMIT"]);
        assert_eq!(config.storage.dir, Some("data".into()));
        assert_eq!(config.tls.client_ca, Some("ca.pem".into()));
        assert_eq!(config.server_config().unwrap().auth_timeout, Duration::from_millis(750));
        jail.create_file("typo.toml", "[storage]\ndirr = \"data\"")?;
        let err = Config::load(Path::new("typo.toml"), true).unwrap_err().to_string();
        assert!(err.contains("dirr"), "{err}");
        Ok(())
    });
}

#[test]
fn the_example_file_has_every_key_at_its_default() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../whispeer.example.toml");
    let text = std::fs::read_to_string(example).unwrap();
    Jail::expect_with(|jail| {
        jail.create_file("example.toml", &text)?;
        let (config, ignored) = Config::load(Path::new("example.toml"), true).unwrap();
        assert!(ignored.is_empty());
        assert_eq!(config, Config::default());
        // Every key is in it, set or commented out with an example value.
        let defaults = Figment::from(Serialized::defaults(Config::default()));
        for path in key_paths(&defaults) {
            let leaf = path.rsplit('.').next().unwrap();
            let section = format!("[{path}]");
            assert!(
                text.contains(&format!("{leaf} =")) || text.contains(&section),
                "{path} is not in the example"
            );
        }
        for section in ["[[users]]", "[[retention]]", "[[delivery.ttl]]", "[jwt]", "[tls]"] {
            assert!(text.contains(section), "{section} is not in the example");
        }
        Ok(())
    });
}

#[test]
fn bad_values_name_the_key_and_the_source() {
    Jail::expect_with(|jail| {
        jail.set_env("WHISPEER_LIMITS__MAX_MESSAGE_BYTES", "lots");
        let err = Config::load(Path::new("whispeer.toml"), false).unwrap_err().to_string();
        // figment names the key (upper-cased, as in the variable) and the provider.
        let lower = err.to_lowercase();
        assert!(lower.contains("limits.max_message_bytes") && err.contains("WHISPEER_"), "{err}");
        Ok(())
    });
    Jail::expect_with(|jail| {
        jail.create_file("custom.toml", "lisen = \"typo\"")?;
        let err = Config::load(Path::new("custom.toml"), true).unwrap_err().to_string();
        assert!(err.contains("lisen") && err.contains("custom.toml"), "{err}");
        Ok(())
    });
    Jail::expect_with(|_jail| {
        assert!(
            Config::load(Path::new("missing.toml"), true).is_err(),
            "an explicit file must exist"
        );
        Ok(())
    });
}

#[test]
fn in_a_cluster_durable_topics_live_in_the_engine_and_a_local_store_is_refused() {
    Jail::expect_with(|jail| {
        jail.set_env("WHISPEER_CLUSTER__URLS", r#"["nats://127.0.0.1:4222"]"#);
        jail.set_env("WHISPEER_STORAGE__DURABLE", r#"["orders/#"]"#);
        let config = Config::load(Path::new("whispeer.toml"), false).unwrap().0;
        let options = config.broker_options().unwrap();
        let durability = options.durability.expect("durable topics");
        assert!(matches!(durability.store, PersistenceType::Memory), "{durability:?}");
        assert_eq!(durability.topics, [Filter::parse("orders/#").unwrap()]);
        jail.set_env("WHISPEER_STORAGE__DIR", "data");
        let config = Config::load(Path::new("whispeer.toml"), false).unwrap().0;
        let err = config.broker_options().unwrap_err().to_string();
        assert!(err.contains("storage.dir") && err.contains("engine"), "{err}");
        Ok(())
    });
}

#[test]
fn chat_runs_on_a_cluster_node_without_a_directory_of_its_own() {
    Jail::expect_with(|jail| {
        jail.set_env("WHISPEER_CLUSTER__URLS", r#"["nats://127.0.0.1:4222"]"#);
        jail.set_env("WHISPEER_CHAT__LISTEN", "127.0.0.1:3030");
        let config = Config::load(Path::new("whispeer.toml"), false).unwrap().0;
        let chat = config.chat_settings(config.server_config().unwrap()).unwrap().unwrap();
        assert_eq!(chat.dir, None, "the engine keeps chat's state");
        for (key, name) in
            [("WHISPEER_CHAT__DIR", "chat.dir"), ("WHISPEER_STORAGE__DIR", "storage.dir")]
        {
            jail.clear_env();
            jail.set_env("WHISPEER_CLUSTER__URLS", r#"["nats://127.0.0.1:4222"]"#);
            jail.set_env("WHISPEER_CHAT__LISTEN", "127.0.0.1:3030");
            jail.set_env(key, "data");
            let config = Config::load(Path::new("whispeer.toml"), false).unwrap().0;
            let err = config.chat_settings(config.server_config().unwrap()).unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
        }
        Ok(())
    });
}

#[test]
fn in_a_cluster_the_engine_keeps_as_much_durable_history_as_the_retention_rules() {
    Jail::expect_with(|jail| {
        jail.create_file(
            "whispeer.toml",
            r#"
            [storage]
            durable = ["orders/#"]
            [cluster]
            urls = ["nats://127.0.0.1:4222"]
            [[retention]]
            filter = "orders/#"
            max_messages = 50000
            max_age_ms = 3600000
            [[retention]]
            filter = "logs/#"
            max_messages = 900000
            "#,
        )?;
        let config = Config::load(Path::new("whispeer.toml"), true).unwrap().0;
        let settings = config.cluster_settings().unwrap().expect("a cluster");
        assert_eq!(settings.history_messages, 50_000, "the rule reaching durable topics");
        assert_eq!(settings.history_max_age, Some(Duration::from_secs(3600)));
        jail.set_env("WHISPEER_STORAGE__DURABLE", r#"["orders/#", "audit/#"]"#);
        let config = Config::load(Path::new("whispeer.toml"), true).unwrap().0;
        let settings = config.cluster_settings().unwrap().expect("a cluster");
        assert_eq!(settings.history_max_age, None, "audit/# has no age limit");
        Ok(())
    });
}

#[test]
fn relay_bounds_too_small_to_work_are_refused_by_name() {
    let mut relay = super::relay::Relay::default();
    assert!(relay.settings().unwrap().is_none(), "off by default");
    relay.enabled = true;
    assert!(relay.settings().unwrap().is_some(), "the defaults work");
    relay.max_message_bytes = 1000;
    let err = relay.settings().unwrap_err().to_string();
    assert!(err.contains("relay.max_message_bytes = 1000") && err.contains("65544"), "{err}");
    relay.max_message_bytes = 81920;
    relay.max_peers_per_topic = 1;
    assert!(relay.settings().unwrap_err().to_string().contains("relay.max_peers_per_topic"));
}
