//! Faults inside the engine's own cluster: three nats-servers routed into one JetStream cluster
//! (the nodes' streams replicated on all three), nodes `a` and `b` on it. While a client on `a`
//! publishes QoS 1 to a durable topic (idempotency keys, retrying what is refused) and a client
//! on `b` reads with one wildcard subscription, each engine server in turn is frozen (SIGSTOP:
//! to its peers and clients a black hole) and let go, then killed (SIGKILL) and started again
//! on its directory. Every acknowledged message reaches `b` once.

use whispeer_client::Client;

mod common;

use common::engines::{Nats, node};
use common::traffic::{Publishing, count_reads, every_one_read, freeze_then_crash, warm_up};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_cross_nodes_while_engine_servers_freeze_and_crash() {
    let mut servers = Nats::cluster();
    let urls: Vec<String> = servers.iter().map(|n| n.url.clone()).collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let durable = [("WHISPEER_STORAGE__DURABLE", "[\"orders/#\"]")];
    let a = node(&urls, "a", &durable);
    let b = node(&urls, "b", &durable);

    let (seen, reading) = count_reads(&b.addr, "orders/#").await;

    let publisher = Client::connect(&a.addr).await.unwrap();
    warm_up(&publisher, &seen).await;
    let publishing = Publishing::start(publisher);

    // Each server in turn: frozen for 3 s, then killed and started again.
    for server in &mut servers {
        freeze_then_crash(&publishing, server).await;
    }
    let (published, refused, longest) = publishing.stop().await;

    let again = every_one_read(&seen, published).await;
    reading.abort();
    println!(
        "engine cluster faults: {published} QoS 1 messages while each of 3 engine servers was \
         frozen 3 s and killed and restarted, {refused} publishes refused and retried, {again} \
         delivered twice, longest wait for one acknowledgement {} ms",
        longest.as_millis()
    );
    assert_eq!(again, 0, "a repeated idempotency key is kept once");
}
