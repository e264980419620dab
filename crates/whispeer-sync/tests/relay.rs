//! The relay transport against a real relay (a broker serving WebSocket with `/relay`), through
//! real sockets; a recording proxy between a peer and the relay shows what the relay saw.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use whispeer::{Broker, BrokerOptions};
use whispeer_server::{Relay, RelayConfig, ServerConfig, WebSocket};
use whispeer_sync::{
    Connection, PeerOptions, RelayTransport, Transport, TransportConfig, TransportMode,
    create_transport_with, derive_topic,
};

const WAIT: Duration = Duration::from_secs(10);

/// A broker whose WebSocket listener serves the relay; its address.
fn relay_server(config: RelayConfig) -> (Broker, Arc<Relay>, String) {
    let relay = Arc::new(Relay::new(config));
    let mut server = ServerConfig::default();
    server.relay = Some(Arc::clone(&relay));
    let broker = Broker::builder(BrokerOptions::default())
        .with(WebSocket::new("127.0.0.1:0").config(server))
        .build();
    let addr = broker.local_addrs()[0];
    (broker, relay, format!("ws://{addr}"))
}

fn transport(url: &str, encryption: bool) -> Box<dyn Transport> {
    let config = TransportConfig {
        mode: TransportMode::Relay,
        relay_url: Some(url.to_string()),
        timeout_ms: 5_000,
        encryption,
    };
    create_transport_with(config, PeerOptions::default()).expect("relay transport")
}

async fn next(rx: &mut tokio::sync::mpsc::Receiver<Box<dyn Connection>>) -> Box<dyn Connection> {
    tokio::time::timeout(WAIT, rx.recv()).await.expect("a connection in time").expect("open")
}

async fn receive(conn: &mut Box<dyn Connection>) -> Option<Vec<u8>> {
    tokio::time::timeout(WAIT, conn.receive()).await.expect("a message in time").expect("opens")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_meet_on_a_topic_and_talk_both_ways() {
    let (_broker, relay, url) = relay_server(RelayConfig::default());
    let topic = derive_topic("my-app-database");
    let (mut a, mut b) = (transport(&url, true), transport(&url, true));
    let mut a_in = a.connect(topic).await.expect("a connects");
    let mut b_in = b.connect(topic).await.expect("b connects");
    let (mut ab, mut ba) = (next(&mut a_in).await, next(&mut b_in).await);
    assert_ne!(ab.peer_id(), ba.peer_id());
    assert_eq!(ab.peer_id().len(), 64, "an id is a Noise static key in hex");

    ab.send(b"Hello from A!").await.expect("send");
    assert_eq!(receive(&mut ba).await.as_deref(), Some(&b"Hello from A!"[..]));
    // A message larger than one Noise message (64 KiB) arrives whole; so does an empty one.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    ba.send(&big).await.expect("send big");
    ba.send(b"").await.expect("send empty");
    assert_eq!(receive(&mut ab).await, Some(big));
    assert_eq!(receive(&mut ab).await, Some(Vec::new()));

    // Lookups list the others, not oneself.
    let seen = b.lookup(topic).await.expect("lookup");
    assert_eq!(seen.iter().map(|p| p.peer_id.as_str()).collect::<Vec<_>>(), [ba.peer_id()]);
    assert!(a.lookup(derive_topic("nobody-here")).await.expect("lookup").is_empty());
    assert!(relay.stats.messages.load(std::sync::atomic::Ordering::Relaxed) >= 3);

    // A closed connection ends the other side's.
    drop(ab);
    assert_eq!(receive(&mut ba).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_peers_each_get_a_connection_to_both_others() {
    let (_broker, _relay, url) = relay_server(RelayConfig::default());
    let topic = derive_topic("mesh of three");
    let mut peers = [transport(&url, true), transport(&url, true), transport(&url, true)];
    let mut incoming = Vec::new();
    for peer in &mut peers {
        incoming.push(peer.connect(topic).await.expect("connects"));
    }
    for rx in &mut incoming {
        let (mut one, mut two) = (next(rx).await, next(rx).await);
        assert_ne!(one.peer_id(), two.peer_id());
        one.send(b"x").await.expect("send");
        two.send(b"y").await.expect("send");
    }
}

/// A TCP proxy that records every byte both ways.
async fn recording_proxy(target: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(&target).await.expect("relay up");
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut from, mut to) in [(cr, sw), (sr, cw)]
                .map(|(r, w)| (Box::new(r) as Box<dyn tokio::io::AsyncRead + Unpin + Send>, w))
            {
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = from.read(&mut buf).await {
                        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        record.lock().expect("lock").extend_from_slice(&buf[..n]);
                    }
                });
            }
        }
    });
    (format!("ws://{addr}"), seen)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_forwards_only_ciphertext() {
    let (_broker, _relay, url) = relay_server(RelayConfig::default());
    let secret = b"the plaintext the relay must never see";
    for encryption in [true, false] {
        let (proxied, seen) = recording_proxy(url.trim_start_matches("ws://").to_string()).await;
        let topic = derive_topic(&format!("secret talk {encryption}"));
        let (mut a, mut b) = (transport(&proxied, encryption), transport(&url, encryption));
        let mut a_in = a.connect(topic).await.expect("a connects");
        let mut b_in = b.connect(topic).await.expect("b connects");
        let (mut ab, mut ba) = (next(&mut a_in).await, next(&mut b_in).await);
        ab.send(secret).await.expect("send");
        ba.send(secret).await.expect("send back");
        assert_eq!(receive(&mut ba).await.as_deref(), Some(&secret[..]));
        assert_eq!(receive(&mut ab).await.as_deref(), Some(&secret[..]));
        let seen = seen.lock().expect("lock").clone();
        assert!(seen.len() > 2 * secret.len(), "the proxy saw the traffic");
        // Without encryption the proxy reads the plaintext (so the check below can fail).
        assert_eq!(contains(&seen, secret), !encryption, "encryption {encryption}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_topic_is_refused_with_the_reason() {
    let (_broker, relay, url) =
        relay_server(RelayConfig { max_peers_per_topic: 2, ..RelayConfig::default() });
    let topic = derive_topic("small room");
    let (mut a, mut b, mut c) =
        (transport(&url, true), transport(&url, true), transport(&url, true));
    a.announce(topic).await.expect("first");
    b.announce(topic).await.expect("second");
    let err = c.announce(topic).await.expect_err("third refused");
    assert!(err.to_string().contains("topic full"), "{err}");
    assert_eq!(relay.stats.refused.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_relay_is_an_error_within_the_timeout() {
    let port =
        TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr").port();
    let config = TransportConfig {
        mode: TransportMode::Relay,
        relay_url: Some(format!("ws://127.0.0.1:{port}")),
        timeout_ms: 500,
        encryption: true,
    };
    let mut t = create_transport_with(config, PeerOptions::default()).expect("transport");
    let started = std::time::Instant::now();
    let err = t.announce(derive_topic("x")).await.expect_err("no relay");
    assert!(started.elapsed() < Duration::from_secs(3), "no hang past the timeout");
    assert!(err.to_string().contains("not reachable"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_keeps_its_id_across_restarts_with_a_key_file() {
    let dir = std::env::temp_dir().join(format!("whispeer-sync-key-{}", std::process::id()));
    let file = dir.join("peer.key");
    let _ = std::fs::remove_dir_all(&dir);
    let config = TransportConfig {
        mode: TransportMode::Relay,
        relay_url: Some("ws://127.0.0.1:9".into()),
        ..TransportConfig::default()
    };
    let options = PeerOptions { key_file: Some(file.clone()), ..PeerOptions::default() };
    let key = whispeer_sync::PeerKey::load_or_create(&file).expect("made");
    let again = whispeer_sync::PeerKey::load_or_create(&file).expect("read");
    assert_eq!(key.id(), again.id());
    let first = RelayTransport::new(config.clone(), key, options.clone()).expect("transport");
    let _ = create_transport_with(config, options).expect("same file works");
    assert_eq!(first.peer_id(), again.id());
    std::fs::write(&file, "not a key").expect("write");
    assert!(whispeer_sync::PeerKey::load_or_create(&file).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A CA and a certificate for 127.0.0.1 signed by it: (CA PEM, certificate PEM, key PEM).
fn pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("CA").pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("key");
    let params = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
    (ca, params.signed_by(&key, &issuer).expect("certificate").pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_behind_tls_is_reached_with_wss() {
    let (ca, cert, key) = pki();
    let relay = Arc::new(Relay::new(RelayConfig::default()));
    let mut server = ServerConfig::default();
    server.relay = Some(relay);
    server.tls =
        Some(whispeer_server::server_tls(cert.as_bytes(), key.as_bytes(), None).expect("tls"));
    let broker = Broker::builder(BrokerOptions::default())
        .with(WebSocket::new("127.0.0.1:0").config(server))
        .build();
    let url = format!("wss://{}", broker.local_addrs()[0]);
    let dir = std::env::temp_dir().join(format!("whispeer-relay-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca).expect("write");
    let wss = |relay_ca: Option<std::path::PathBuf>| {
        let config = TransportConfig {
            mode: TransportMode::Relay,
            relay_url: Some(url.clone()),
            timeout_ms: 3_000,
            encryption: true,
        };
        create_transport_with(config, PeerOptions { relay_ca, ..PeerOptions::default() })
            .expect("transport")
    };
    let topic = derive_topic("over tls");
    let (mut a, mut b) = (wss(Some(ca_file.clone())), wss(Some(ca_file.clone())));
    let mut a_in = a.connect(topic).await.expect("a connects over wss");
    let mut b_in = b.connect(topic).await.expect("b connects over wss");
    let (mut ab, mut ba) = (next(&mut a_in).await, next(&mut b_in).await);
    ab.send(b"through TLS and Noise").await.expect("send");
    assert_eq!(receive(&mut ba).await.as_deref(), Some(&b"through TLS and Noise"[..]));
    // Without the CA the relay's certificate is not trusted: a clear error, in time.
    let err = wss(None).announce(topic).await.expect_err("untrusted");
    assert!(err.to_string().contains("not reachable"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_only_the_connection_that_sent_it() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (_broker, relay, url) =
        relay_server(RelayConfig { max_message_bytes: 1024, ..RelayConfig::default() });
    let topic = derive_topic("bystanders");
    let (mut a, mut b) = (transport(&url, true), transport(&url, true));
    let mut a_in = a.connect(topic).await.expect("a connects");
    let mut b_in = b.connect(topic).await.expect("b connects");
    let (mut ab, mut ba) = (next(&mut a_in).await, next(&mut b_in).await);
    let bad = |stats: &whispeer_server::RelayStats| {
        stats.bad_messages.load(std::sync::atomic::Ordering::Relaxed)
    };
    let cases: [(&str, Vec<u8>); 3] = [
        ("an unknown kind", vec![99, 1, 2]),
        ("a cut-short join", vec![1, 0, 0]),
        ("a message over max_message_bytes", vec![7; 2048]),
    ];
    for (i, (what, bytes)) in cases.into_iter().enumerate() {
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("{url}/relay")).await.expect("ws");
        // Data on a link this connection is not on is ignored, not forwarded.
        let foreign = whispeer_proto::relay::RelayMessage::Data { link: 1, bytes: b"x".to_vec() };
        ws.send(Message::Binary(foreign.encode().into())).await.expect("send");
        ws.send(Message::Binary(bytes.into())).await.expect("send");
        let ended = tokio::time::timeout(WAIT, async {
            while let Some(Ok(message)) = ws.next().await {
                if message.is_close() {
                    break;
                }
            }
        });
        assert!(ended.await.is_ok(), "{what}: the relay closes the connection");
        assert_eq!(bad(&relay.stats), i as u64 + 1, "{what}: counted");
    }
    // The others' link is untouched.
    ab.send(b"still here").await.expect("send");
    assert_eq!(receive(&mut ba).await.as_deref(), Some(&b"still here"[..]));
}
