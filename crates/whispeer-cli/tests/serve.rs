//! The real `whispeer` binary: `serve` on an ephemeral port, driven by `pub`, `sub` and the SDK.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use whispeer_client::engines::{Encryption, Keyring};
use whispeer_client::{Client, ClientError, ClientOptions, StartAt, SubscribeOptions};

mod common;

use common::{BIN, Reaped, Server, http_get, output_of, publish, publish_with, sample, subscriber};

#[test]
fn sub_prints_what_pub_sends_like_mosquitto_sub_v() {
    let server = Server::start(&[]);
    let sub = subscriber(&["sensor/#", "-v", "--count", "3", "--server", &server.addr], &[]);
    let out = publish(&["sensor/k1/temperature", "21.5", "--server", &server.addr], None);
    assert!(out.status.success(), "{out:?}");
    let out = publish(
        &["sensor/k2/log", "--ack", "--server", &server.addr],
        Some("line one\nline two\n"),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        output_of(sub),
        "sensor/k1/temperature 21.5\nsensor/k2/log line one\nsensor/k2/log line two\n"
    );
}

#[test]
fn api_keys_from_the_environment_are_enforced() {
    let server = Server::start(&[("WHISPEER_API_KEYS", r#"["cli-secret"]"#)]);
    let refused = publish(&["t", "x", "--server", &server.addr], None);
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("API key"), "{stderr}");
    let wrong = publish(&["t", "x", "--server", &server.addr, "--api-key", "nope"], None);
    assert_eq!(wrong.status.code(), Some(1));
    let sub = subscriber(
        &["t", "--count", "1", "--server", &server.addr, "--api-key", "cli-secret"],
        &[],
    );
    let still_refused = publish(&["t", "hello", "--server", &server.addr], None).status;
    assert!(!still_refused.success(), "still refused without a key");
    let ok = publish(&["t", "hello", "--server", &server.addr, "--api-key", "cli-secret"], None);
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(output_of(sub), "hello\n");
}

#[test]
fn acked_group_subscribers_catch_up_and_idempotent_publishes_arrive_once() {
    let server = Server::start(&[("WHISPEER_DELIVERY__GROUP_LINGER_MS", "60000")]);
    let group = ["jobs", "--ack", "--group", "w", "--server", &server.addr];
    let first = subscriber(&[&group[..], &["--count", "1"]].concat(), &[]);
    let send = |args: &[&str]| {
        let out = publish(&[&["jobs"], args, &["--ack", "--server", &server.addr]].concat(), None);
        assert!(out.status.success(), "{out:?}");
    };
    send(&["one"]);
    assert_eq!(output_of(first), "one\n");
    // Nobody is subscribed now; the group keeps what comes meanwhile.
    send(&["two", "--idempotency-key", "k2"]);
    send(&["two again", "--idempotency-key", "k2"]);
    send(&["three", "--ttl-ms", "60000"]);
    let back = subscriber(&[&group[..], &["--count", "2"]].concat(), &[]);
    assert_eq!(output_of(back), "two\nthree\n");
}

#[test]
fn sub_from_earliest_or_an_offset_replays_retained_history() {
    let rules = r#"[{filter="log/#",max_messages=3}]"#;
    let server = Server::start(&[("WHISPEER_RETENTION", rules)]);
    for line in ["one", "two", "three", "four"] {
        let out = publish(&["log/app", line, "--ack", "--server", &server.addr], None);
        assert!(out.status.success(), "{out:?}");
    }
    let all = subscriber(
        &["log/app", "--from", "earliest", "--count", "3", "--server", &server.addr],
        &[],
    );
    assert_eq!(output_of(all), "two\nthree\nfour\n");
    let tail =
        subscriber(&["log/app", "--from", "4", "--count", "1", "--server", &server.addr], &[]);
    assert_eq!(output_of(tail), "four\n");
    let evicted = Command::new(BIN)
        .args(["sub", "log/app", "--from", "1", "--server", &server.addr])
        .output()
        .unwrap();
    assert_eq!(evicted.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&evicted.stderr);
    assert!(stderr.contains("history begins at offset 2"), "{stderr}");

    let replay = |extra: &[&str]| {
        let base = ["replay", "log/app", "--idle-ms", "300", "--server", &server.addr];
        Command::new(BIN).args(base).args(extra).output().unwrap()
    };
    let printed = replay(&["-v"]);
    assert!(printed.status.success(), "{printed:?}");
    let stdout = String::from_utf8_lossy(&printed.stdout);
    assert_eq!(stdout, "2 log/app two\n3 log/app three\n4 log/app four\n");
    let copy = subscriber(&["copy/app", "--count", "2", "--server", &server.addr], &[]);
    assert!(replay(&["--from", "3", "--republish", "copy/app"]).status.success());
    assert_eq!(output_of(copy), "three\nfour\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_of_all_topics_keeps_to_max_history_bytes_and_the_metrics_say_so() {
    // Room for ten 744-byte messages (each weighs 1,000 with its 256), where each topic's
    // rule would keep a hundred.
    let rules = r#"[{filter="log/#",max_messages=100}]"#;
    let envs = [("WHISPEER_RETENTION", rules), ("WHISPEER_MAX_HISTORY_BYTES", "10000")];
    let server = Server::start_with(&["--admin-listen", "127.0.0.1:0"], &envs);
    let client = Client::connect(server.addr.clone()).await.unwrap();
    for n in 0..30u8 {
        let topic = if n % 2 == 0 { "log/even" } else { "log/odd" };
        client.publish_acked_bytes(topic, vec![n; 744]).await.unwrap();
    }
    let admin = server.admin.as_deref().unwrap();
    let (_, metrics) = http_get(admin, "/metrics");
    let held = sample(&metrics, "whispeer_history_bytes");
    let evicted = sample(&metrics, "whispeer_history_evicted_total");
    assert!(held <= 10_000.0 && evicted >= 20.0, "{held} bytes held, {evicted} evicted");
    assert_eq!(held / 1_000.0 + evicted, 30.0, "each message held or evicted");
    // The oldest went first: what is left is the last ones published, of both topics.
    let options = SubscribeOptions::new("log/#").start(StartAt::Earliest);
    let mut all = client.messages(options).await.unwrap();
    let left = (held / 1_000.0) as u8;
    for n in 30 - left..30 {
        let got = tokio::time::timeout(Duration::from_secs(20), all.recv()).await.unwrap();
        assert_eq!(got.unwrap().payload()[0], n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_topic_without_a_retention_rule_replays_everything_it_stored() {
    let dir = std::env::temp_dir().join(format!("whispeer-durable-all-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_text = dir.to_string_lossy().into_owned();
    let server = Server::start(&[
        ("WHISPEER_STORAGE__DIR", dir_text.as_str()),
        ("WHISPEER_STORAGE__DURABLE", r#"["hist/#"]"#),
        ("WHISPEER_STORAGE__FSYNC", "never"),
    ]);
    let client = Client::connect(server.addr.clone()).await.unwrap();
    // More than the 10,000 messages a durable topic keeps in memory by default.
    let total = 12_345u32;
    for n in 0..total - 1 {
        client.publish("hist/all", &n).await.unwrap();
    }
    client.publish_acked("hist/all", &(total - 1)).await.unwrap();
    let options = SubscribeOptions::new("hist/all")
        .start(StartAt::Earliest)
        .qos(whispeer_client::Qos::AtLeastOnce)
        .prefetch(512);
    let mut all = client.subscribe::<u32>(options).await.unwrap();
    for n in 0..total {
        let got = tokio::time::timeout(Duration::from_secs(20), all.recv()).await.unwrap();
        assert_eq!(got, Some(n), "a subscriber that asked for everything gets everything");
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unknown_whispeer_variables_are_warned_about_not_fatal() {
    let mut child = Reaped::new(
        Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("WHISPEER_BIN", "/usr/local/bin/whispeer")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("whispeer: listening on"), "{line:?}");
    let _ = child.kill();
    let out = child.into_inner().wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("WHISPEER_BIN") && stderr.contains("ignored"), "{stderr}");
}

#[test]
fn non_loopback_without_keys_is_refused() {
    let out = Command::new(BIN).args(["serve", "--listen", "0.0.0.0:0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("without api_keys"));
    // The admin port likewise, without an admin token.
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "0.0.0.0:0"])
        .env_remove("WHISPEER_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("without admin_token"), "{out:?}");
}

#[test]
fn bad_configuration_names_the_key_and_exits_2() {
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("WHISPEER_MAX_CONNECTIONS", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.to_lowercase().contains("max_connections"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_and_cli_share_sealed_messages_through_the_binary() {
    let server = Server::start(&[]);
    let keyring = Keyring::generate().unwrap();
    let key_text = keyring.to_text().to_string();
    let options =
        ClientOptions::new(server.addr.clone()).encryption(Encryption::with_keyring(keyring));
    let client = Client::connect_with(options).await.unwrap();
    let mut sealed = client.messages("secure/#").await.unwrap();

    // The CLI seals with the key from WHISPEER_KEY; the SDK opens it.
    let out = publish(&["secure/a", "for your eyes only", "--server", &server.addr], None);
    assert!(out.status.success());
    let env_key = [("WHISPEER_KEY", key_text.trim())];
    let mut cli = Command::new(BIN)
        .args(["pub", "secure/b", "sealed by the cli", "--server", &server.addr])
        .envs(env_key)
        .spawn()
        .unwrap();
    assert!(cli.wait().unwrap().success());
    let first =
        tokio::time::timeout(Duration::from_secs(10), sealed.recv()).await.unwrap().unwrap();
    assert_eq!(&first.plaintext().unwrap()[..], b"for your eyes only");
    let second =
        tokio::time::timeout(Duration::from_secs(10), sealed.recv()).await.unwrap().unwrap();
    assert!(!second.payload().windows(6).any(|w| w == b"sealed"), "travelled encrypted");
    assert_eq!(&second.plaintext().unwrap()[..], b"sealed by the cli");

    // The SDK seals; a CLI subscriber with the key prints the plaintext.
    let sub = subscriber(&["secure/c", "--count", "1", "--server", &server.addr], &env_key);
    client.publish_acked_bytes("secure/c", &b"from the sdk"[..]).await.unwrap();
    assert_eq!(
        tokio::task::spawn_blocking(move || output_of(sub)).await.unwrap(),
        "from the sdk\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_cleanly_and_tells_clients() {
    let server = Server::start(&[]);
    let options = ClientOptions::new(server.addr.clone()).reconnect(false);
    let client = Client::connect_with(options).await.unwrap();
    let mut sub = client.subscribe::<String>("x").await.unwrap();
    let status = tokio::task::spawn_blocking(move || server.terminate()).await.unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), sub.recv()).await.unwrap(), None);
    let err = client.flush().await.unwrap_err();
    assert!(matches!(err, ClientError::Closed | ClientError::Disconnected), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_accepts_websocket_clients_when_asked() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use whispeer_client::proto::{Body, Frame, Limits};

    let mut child = Reaped::new(
        Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--ws-listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let tcp = lines.next().unwrap().unwrap();
    let ws = lines.next().unwrap().unwrap();
    assert!(tcp.starts_with("whispeer: listening on 127.0.0.1:"), "{tcp}");
    let url = ws
        .strip_prefix("whispeer: websocket listening on ")
        .unwrap_or_else(|| panic!("{ws}"))
        .to_string();
    assert!(url.starts_with("ws://127.0.0.1:") && url.ends_with("/ws"), "{url}");

    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut out = bytes::BytesMut::new();
    Frame::new(1, Body::Hello { version: 1, capabilities: 0, name: "cli-test".into() })
        .encode(&mut out, usize::MAX)
        .unwrap();
    socket.send(Message::Binary(out.freeze())).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let mut buf = bytes::BytesMut::from(&reply.into_data()[..]);
    let welcome = Frame::decode(&mut buf, &Limits::default()).unwrap().unwrap();
    assert!(matches!(welcome.body, Body::Welcome { .. }), "{welcome:?}");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn tls_from_the_config_file_with_pub_and_sub_over_tls() {
    let dir = std::env::temp_dir().join(format!("whispeer-tls-{}", std::process::id()));
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    // The development CA helper writes what the server and the clients need.
    let made = Command::new(BIN)
        .args(["cert", "--out", &path(""), "--host", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    for file in ["ca.pem", "ca-key.pem", "cert.pem", "key.pem"] {
        assert!(dir.join(file).exists(), "{file} missing");
    }
    std::fs::write(
        path("whispeer.toml"),
        format!("[tls]\ncert = {:?}\nkey = {:?}\n", path("cert.pem"), path("key.pem")),
    )
    .unwrap();

    let mut child = Reaped::new(
        Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--config", &path("whispeer.toml")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("whispeer: listening on ").unwrap().to_string();
    assert!(addr.starts_with("tls://"), "{addr}");
    let ca = path("ca.pem");
    let sub = subscriber(&["t", "--count", "1", "--server", &addr, "--ca-file", &ca], &[]);
    let out = publish(&["t", "encrypted in transit", "--server", &addr, "--ca-file", &ca], None);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(output_of(sub), "encrypted in transit\n");
    // Without the CA (the platform's roots do not hold it) the client refuses to talk.
    let refused = publish_with(&["t", "x", "--server", &addr], &[("SSL_CERT_FILE", "")]);
    assert_eq!(refused.status.code(), Some(1));
    // The platform's roots are trusted with no flag: here SSL_CERT_FILE names the CA, as a
    // system store holding a public CA would.
    let sub = subscriber(&["t", "--count", "1", "--server", &addr], &[("SSL_CERT_FILE", &ca)]);
    let out = publish_with(&["t", "platform roots", "--server", &addr], &[("SSL_CERT_FILE", &ca)]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(output_of(sub), "platform roots\n");
    // A plain client at the TLS port is told what to do.
    let plain = addr.replace("tls://", "tcp://");
    let out = publish(&["t", "x", "--server", &plain], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("this server speaks TLS: use tls://"), "{stderr}");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_reports_health_and_metrics_that_match_the_workload() {
    let mut child = Reaped::new(
        Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env("WHISPEER_HEARTBEAT_MS", "500")
            .env("WHISPEER_ADMIN_TOKEN", "admin-t0ken")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = |prefix: &str| {
        let line = lines.next().unwrap().unwrap();
        line.strip_prefix(prefix).unwrap_or_else(|| panic!("{line:?}")).to_string()
    };
    let addr = next("whispeer: listening on ");
    let admin = next("whispeer: admin listening on http://");
    assert_eq!(http_get(&admin, "/healthz").0, "HTTP/1.1 200 OK");
    // Ready once the store is open and the listeners accept: shortly after the port opens.
    let ready = (0..100).any(|_| {
        let ok = http_get(&admin, "/readyz").0 == "HTTP/1.1 200 OK";
        if !ok {
            std::thread::sleep(Duration::from_millis(20));
        }
        ok
    });
    assert!(ready, "/readyz never said ready");

    let client = Client::connect(addr).await.unwrap();
    let mut a = client.subscribe::<u32>("work/+").await.unwrap();
    let mut b = client.subscribe::<u32>("work/#").await.unwrap();
    for n in 0..10u32 {
        client.publish_acked("work/x", &n).await.unwrap();
    }
    client.publish_acked("nobody/listens", &0u32).await.unwrap();
    for n in 0..10u32 {
        assert_eq!((a.recv().await, b.recv().await), (Some(n), Some(n)));
    }
    let (status, metrics) = http_get(&admin, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(sample(&metrics, "whispeer_messages_published_total"), 11.0);
    assert_eq!(sample(&metrics, "whispeer_deliveries_total"), 20.0);
    assert_eq!(sample(&metrics, "whispeer_messages_unrouted_total"), 1.0);
    assert_eq!(sample(&metrics, "whispeer_subscriptions"), 2.0);
    assert_eq!(sample(&metrics, "whispeer_auth_failures_total"), 0.0);
    assert!(metrics.contains(r#"whispeer_drops_total{reason="drop_oldest"} 0"#), "{metrics}");
    // Per topic class (the first segment): in as published, out as delivered, bytes alike.
    assert_eq!(sample(&metrics, r#"whispeer_messages_in_total{class="work"}"#), 10.0);
    assert_eq!(sample(&metrics, r#"whispeer_messages_out_total{class="work"}"#), 20.0);
    assert_eq!(sample(&metrics, r#"whispeer_messages_in_total{class="nobody"}"#), 1.0);
    let bytes_in = sample(&metrics, r#"whispeer_bytes_in_total{class="work"}"#);
    assert_eq!(bytes_in, 10.0, "0..10 as postcard varints: a byte each");
    assert_eq!(sample(&metrics, r#"whispeer_bytes_out_total{class="work"}"#), 2.0 * bytes_in);
    assert_eq!(sample(&metrics, "whispeer_queued_messages"), 0.0);
    assert_eq!(sample(&metrics, "whispeer_unacked_messages"), 0.0);

    // The admin API needs the token; `whispeer inspect` shows it as a table or JSON.
    assert_eq!(http_get(&admin, "/api/subscriptions").0, "HTTP/1.1 401 Unauthorized");
    let inspect = |extra: &[&str]| {
        let base = ["inspect", extra[0], "--admin"];
        let url = format!("http://{admin}");
        let out = Command::new(BIN)
            .args(base)
            .arg(&url)
            .args(["--token", "admin-t0ken"])
            .args(&extra[1..])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let table = inspect(&["subscriptions"]);
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].starts_with("FILTER"), "{table}");
    assert!(rows[1].starts_with("work/#") && rows[2].starts_with("work/+"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&inspect(&["subscribers", "--json"])).unwrap();
    assert_eq!(json[0]["received"], 10, "{json}");
    let topics: serde_json::Value = serde_json::from_str(&inspect(&["topics", "--json"])).unwrap();
    let work = topics.as_array().unwrap().iter().find(|t| t["topic"] == "work/x").unwrap();
    let counts = ["subscribers", "messages_in", "messages_out"].map(|k| work[k].as_u64());
    assert_eq!(counts, [Some(2), Some(10), Some(20)], "{topics}");
    let table = inspect(&["topics"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().take(3).collect();
    assert_eq!(header, ["TOPIC", "SUBSCRIBERS", "IN/S"], "{table}");

    // The connection list, and disconnecting the client: it reconnects as a new connection.
    let list = |url: &str| -> serde_json::Value {
        let out = Command::new(BIN)
            .args(["inspect", "connections", "--admin", url, "--token", "admin-t0ken", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let url = format!("http://{admin}");
    let before = list(&url);
    assert_eq!(before.as_array().unwrap().len(), 1, "{before}");
    assert_eq!(
        (before[0]["principal"].as_str(), before[0]["subscriptions"].as_u64()),
        (Some("anonymous"), Some(2))
    );
    assert_eq!(before[0]["filters"], serde_json::json!(["work/+", "work/#"]), "{before}");
    let counts = ["published", "delivered"].map(|k| before[0][k].as_u64());
    assert_eq!(counts, [Some(11), Some(20)], "{before}");
    let id = before[0]["id"].as_u64().unwrap().to_string();
    let kicked = Command::new(BIN)
        .args([
            "inspect",
            "connections",
            "--admin",
            &url,
            "--token",
            "admin-t0ken",
            "--disconnect",
            &id,
        ])
        .status()
        .unwrap();
    assert!(kicked.success());
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    client.publish_acked("work/x", &99u32).await.expect("the client reconnected");
    let after = list(&url);
    assert_ne!(after[0]["id"].as_u64().unwrap().to_string(), id, "{after}");
    let _ = child.kill();
    let _ = child.wait();
}

/// One connection with more durable QoS 1 publishes in flight than its confirmation queue holds
/// (16,384): past it the connection reads nothing more until the log catches up
/// (back-pressure), and every publish is still acknowledged, and stored once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_far_ahead_of_the_disk_gets_every_puback_and_the_log_holds_each_in_order() {
    let dir = std::env::temp_dir().join(format!("whispeer-far-ahead-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_text = dir.to_string_lossy().to_string();
    let server = Server::start(&[
        ("WHISPEER_STORAGE__DIR", dir_text.as_str()),
        ("WHISPEER_STORAGE__DURABLE", r#"["orders/#"]"#),
        ("WHISPEER_RETENTION", r#"[{filter="orders/#",max_messages=1000000}]"#),
    ]);
    let client = Client::connect(server.addr.clone()).await.expect("connects");
    const MESSAGES: u32 = 40_000;
    let mut pending = Vec::with_capacity(MESSAGES as usize);
    for n in 0..MESSAGES {
        let payload = bytes::Bytes::copy_from_slice(&n.to_be_bytes());
        pending.push(client.publish_acked_bytes_deferred("orders/x", payload).await.expect("sent"));
    }
    for (n, acked) in pending.into_iter().enumerate() {
        let acked = tokio::time::timeout(Duration::from_secs(60), acked).await;
        acked.unwrap_or_else(|_| panic!("no PUBACK for publish {n}")).expect("acknowledged");
    }
    let options = SubscribeOptions::new("orders/x")
        .start(StartAt::Earliest)
        .qos(whispeer_client::Qos::AtLeastOnce)
        .prefetch(1024);
    let mut log = client.messages(options).await.expect("subscribes");
    for n in 0..MESSAGES {
        let next = tokio::time::timeout(Duration::from_secs(20), log.recv()).await;
        let message = next.expect("the log goes on").expect("a message");
        assert_eq!(message.payload().as_ref(), n.to_be_bytes(), "message {n} of the log");
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
