//! TLS for TCP (`tls://`) and WebSocket (`wss://`), with a CA generated for each run.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tokio::net::TcpListener;
use whispeer::server::{ServerConfig, serve, serve_websocket, server_tls};
use whispeer::{Broker, BrokerOptions};
use whispeer_client::{Client, ClientError, ClientOptions, tls_config};

/// A throwaway PKI: a CA, a server certificate for 127.0.0.1, and a client certificate.
struct Pki {
    ca: String,
    server: (String, String),
    client: (String, String),
}

fn pki(name: &str) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, name);
    let ca = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params.extended_key_usages = vec![usage];
        (params.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
    };
    Pki {
        ca,
        server: leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        client: leaf(vec!["client".into()], ExtendedKeyUsagePurpose::ClientAuth),
    }
}

/// TCP and WebSocket listeners, both with TLS, on one broker; returns their client addresses.
async fn start(pki: &Pki, require_client_cert: bool) -> (String, String) {
    let client_ca = require_client_cert.then_some(pki.ca.as_bytes());
    let tls = server_tls(pki.server.0.as_bytes(), pki.server.1.as_bytes(), client_ca).unwrap();
    let mut config = ServerConfig::default();
    config.heartbeat = Duration::from_millis(300);
    config.tls = Some(tls);
    let broker = Broker::builder(BrokerOptions::default()).build();
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addrs = (
        format!("tls://{}", tcp.local_addr().unwrap()),
        format!("wss://{}/ws", ws.local_addr().unwrap()),
    );
    let (b1, c1) = (broker.clone(), config.clone());
    tokio::spawn(async move { serve(tcp, b1, c1, std::future::pending()).await });
    tokio::spawn(async move { serve_websocket(ws, broker, config, std::future::pending()).await });
    addrs
}

async fn soon<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f).await.expect("timed out")
}

#[tokio::test]
async fn tls_and_wss_clients_talk_through_one_broker() {
    let pki = pki("whispeer test CA");
    let (tls_addr, wss_addr) = start(&pki, false).await;
    let trust = tls_config(pki.ca.as_bytes(), None).unwrap();
    let a =
        Client::connect_with(ClientOptions::new(tls_addr).tls(Arc::clone(&trust))).await.unwrap();
    let b = Client::connect_with(ClientOptions::new(wss_addr).tls(trust)).await.unwrap();
    let mut at_b = b.subscribe::<String>("secure/#").await.unwrap();
    let mut at_a = a.subscribe::<String>("reply").await.unwrap();
    a.publish_acked("secure/x", &"over tls".to_string()).await.unwrap();
    assert_eq!(soon(at_b.recv()).await.as_deref(), Some("over tls"));
    b.publish_acked("reply", &"over wss".to_string()).await.unwrap();
    assert_eq!(soon(at_a.recv()).await.as_deref(), Some("over wss"));
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let real = pki("real CA");
    let other = pki("other CA");
    let (tls_addr, wss_addr) = start(&real, false).await;
    let wrong = tls_config(other.ca.as_bytes(), None).unwrap();
    for addr in [tls_addr.clone(), wss_addr] {
        let err = Client::connect_with(ClientOptions::new(addr.clone()).tls(Arc::clone(&wrong)))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{addr}: {err:?}");
    }
    // Without TLS settings the platform's roots are trusted, and they do not hold this CA.
    let err = Client::connect(tls_addr).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
}

#[tokio::test]
async fn a_plain_client_at_a_tls_port_is_told_to_use_tls() {
    let pki = pki("plain client CA");
    let (tls_addr, _) = start(&pki, false).await;
    let plain = tls_addr.replace("tls://", "tcp://");
    let err = Client::connect_with(ClientOptions::new(plain).reconnect(false)).await.unwrap_err();
    assert!(err.to_string().contains("this server speaks TLS: use tls://"), "{err}");
}

#[tokio::test]
async fn client_certificates_are_required_when_configured() {
    let pki = pki("client-auth CA");
    let (tls_addr, _) = start(&pki, true).await;
    let anonymous = tls_config(pki.ca.as_bytes(), None).unwrap();
    let refused =
        Client::connect_with(ClientOptions::new(tls_addr.clone()).tls(anonymous).reconnect(false))
            .await;
    assert!(refused.is_err(), "a client without a certificate got in");

    let identified =
        tls_config(pki.ca.as_bytes(), Some((pki.client.0.as_bytes(), pki.client.1.as_bytes())))
            .unwrap();
    let client = Client::connect_with(ClientOptions::new(tls_addr).tls(identified)).await.unwrap();
    let mut sub = client.subscribe::<u8>("x").await.unwrap();
    client.publish("x", &1u8).await.unwrap();
    assert_eq!(soon(sub.recv()).await, Some(1));
}

#[test]
fn bad_pem_is_a_clear_error() {
    assert!(matches!(tls_config(b"not a certificate", None), Err(ClientError::Tls(_))));
    assert!(server_tls(b"nothing", b"nothing", None).is_err());
    let pki = pki("mismatch CA");
    let other = pki_key();
    assert!(
        server_tls(pki.server.0.as_bytes(), other.as_bytes(), None).is_err(),
        "key does not match"
    );
}

fn pki_key() -> String {
    KeyPair::generate().unwrap().serialize_pem()
}

#[tokio::test]
async fn a_tls_hello_at_a_plain_port_is_answered_with_what_it_is() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use whispeer_client::proto::{Body, ErrorCode, Frame, Limits};
    let broker = Broker::builder(BrokerOptions::default())
        .with(whispeer::server::Tcp::new("127.0.0.1:0"))
        .build();
    let mut stream = tokio::net::TcpStream::connect(broker.local_addrs()[0]).await.unwrap();
    // The start of a TLS 1.2 record carrying a ClientHello.
    stream.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let frame = loop {
        if let Some(frame) = Frame::decode(&mut buf, &Limits::default()).unwrap() {
            break frame;
        }
        assert!(soon(stream.read_buf(&mut buf)).await.unwrap() > 0, "closed without a word");
    };
    match frame.body {
        Body::Error { code, message } => {
            assert_eq!(code, ErrorCode::TOO_LARGE);
            assert!(message.contains("not TLS"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}
