//! Request/reply through a real server: responders in a queue group share the requests, each
//! request gets its own reply, and the errors say what happened.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use whispeer::server::{ServerConfig, serve};
use whispeer::{Broker, BrokerOptions};
use whispeer_client::{Client, ClientError};

async fn server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let broker = Broker::builder(BrokerOptions::default()).build();
    tokio::spawn(serve(listener, broker, ServerConfig::default(), std::future::pending()));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responders_share_requests_and_each_request_gets_its_own_reply() {
    let addr = server().await;
    let answered = Arc::new(Mutex::new(HashMap::new()));
    let mut responders = Vec::new();
    for name in ["a", "b"] {
        let client = Client::connect(&addr).await.unwrap();
        let seen = Arc::clone(&answered);
        let responder = client
            .respond("svc/upper", "workers", move |request| {
                *seen.lock().unwrap().entry(name).or_insert(0) += 1;
                // Work that takes a while: a responder that holds more requests than its share
                // keeps them waiting while the other idles.
                tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(5)));
                let text = String::from_utf8_lossy(request.payload()).to_uppercase();
                Some(Bytes::from(format!("{name}:{text}")))
            })
            .await
            .unwrap();
        responders.push((client, responder));
    }
    let requester = Client::connect(&addr).await.unwrap();
    let asks = (0..20).map(|i| {
        let requester = requester.clone();
        async move {
            let reply = requester
                .request("svc/upper", format!("word{i}"), Duration::from_secs(5))
                .await
                .unwrap();
            let text = String::from_utf8_lossy(reply.payload()).into_owned();
            assert!(text.ends_with(&format!(":WORD{i}")), "request {i} got {text}");
        }
    });
    futures_util::future::join_all(asks).await;
    // Each takes its share of the burst, not whichever the scheduler ran first as much as its
    // prefetch allows: a member holds at most its share of what there is.
    let answered = answered.lock().unwrap().clone();
    assert!(answered.values().all(|&n| n >= 5) && answered.len() == 2, "{answered:?}");

    let nobody = requester.request("svc/none", "x", Duration::from_secs(1)).await.unwrap_err();
    assert!(
        matches!(nobody, ClientError::NoResponders(ref topic) if topic == "svc/none"),
        "{nobody}"
    );
    let _silent = requester.messages("svc/silent").await.unwrap();
    let waited =
        requester.request("svc/silent", "x", Duration::from_millis(200)).await.unwrap_err();
    assert!(matches!(waited, ClientError::NoReply { .. }), "{waited}");
    // A responder dropped answers no more.
    responders.clear();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let gone = requester.request("svc/upper", "x", Duration::from_secs(1)).await.unwrap_err();
    assert!(matches!(gone, ClientError::NoResponders(_) | ClientError::NoReply { .. }), "{gone}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_responder_goes_away_before_answering_goes_to_another() {
    let addr = server().await;
    let first = Client::connect(&addr).await.unwrap();
    let (took, mut taken) = tokio::sync::mpsc::unbounded_channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let released = Mutex::new(released);
    let _stuck = first
        .respond("svc/slow", "workers", move |request| {
            let _ = took.send(request.payload().clone());
            // Stuck until the test lets it go, long after its connection is gone.
            tokio::task::block_in_place(|| {
                let _ = released.lock().unwrap().recv_timeout(Duration::from_secs(10));
            });
            Some(Bytes::from_static(b"first"))
        })
        .await
        .unwrap();
    let requester = Client::connect(&addr).await.unwrap();
    let asked = tokio::spawn({
        let requester = requester.clone();
        async move { requester.request("svc/slow", "job", Duration::from_secs(5)).await }
    });
    assert_eq!(taken.recv().await.unwrap(), Bytes::from_static(b"job"));
    let second = Client::connect(&addr).await.unwrap();
    let _other = second
        .respond("svc/slow", "workers", |_| Some(Bytes::from_static(b"second")))
        .await
        .unwrap();
    // The first responder's connection goes away with the request taken and not answered.
    first.close().await;
    let reply = asked.await.unwrap().unwrap();
    assert_eq!(reply.payload(), &Bytes::from_static(b"second"), "the other responder answered");
    let _ = release.send(());
}
