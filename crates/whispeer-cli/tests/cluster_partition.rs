//! A partition inside the engine's own cluster: three nats-servers routed into one JetStream
//! cluster through test proxies (one for each server dialling each other), the nodes' streams
//! replicated on all three. Node `a` is on server 0 alone, node `b` on server 1. While a client
//! on `a` publishes QoS 1 to a durable topic (idempotency keys, retrying what is refused) and a
//! client on `b` reads with one wildcard subscription, server 0 is cut off from the other two
//! twice (its routes reset, then silent) and joined again: server 0 keeps running and serving
//! node `a`, in the minority. Nothing may be acknowledged that the majority did not keep: every
//! acknowledged message reaches `b`, once, and a durable queue group on `b` (reading through
//! the engine's group consumer) gets every one too.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::sleep;
use whispeer_client::{Client, Qos, SubscribeOptions};

mod common;
#[path = "../../whispeer-client/tests/support/proxy.rs"]
mod proxy;

use common::engines::{Nats, free_port, node};
use common::traffic::{Publishing, count_reads, every_one_read, warm_up};
use proxy::{Fault, Proxy};

/// Three servers whose routes all go through proxies: `proxies[i][j]` carries what server `i`
/// dials to server `j`. No server advertises a route address others could dial directly.
async fn routed_cluster() -> ([Nats; 3], Vec<Vec<Option<Proxy>>>) {
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut proxies: Vec<Vec<Option<Proxy>>> = Vec::new();
    for i in 0..3 {
        let mut row = Vec::new();
        for (j, port) in routes.iter().enumerate() {
            let target = SocketAddr::from(([127, 0, 0, 1], *port));
            row.push(if i == j { None } else { Some(Proxy::start(target).await) });
        }
        proxies.push(row);
    }
    let start = |i: usize| {
        let dials: Vec<String> =
            proxies[i].iter().flatten().map(|p| format!("nats://{}", p.addr)).collect();
        let args: Vec<String> = [
            "--cluster_name",
            "whispeer-partition",
            "--name",
            &format!("n{i}"),
            "--cluster",
            &format!("nats://127.0.0.1:{}", routes[i]),
            "--routes",
            &dials.join(","),
            // Gossiped route addresses lead nowhere: every route is one of the proxies'.
            "--cluster_advertise",
            "127.0.0.1:1",
            "--connect_retries",
            "0",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
        Nats::start_with(0, &args)
    };
    ([start(0), start(1), start(2)], proxies)
}

/// The proxies that carry server `n`'s routes, both ways.
fn routes_of(proxies: &[Vec<Option<Proxy>>], n: usize) -> Vec<&Proxy> {
    let mut of = Vec::new();
    for (i, row) in proxies.iter().enumerate() {
        for (j, proxy) in row.iter().enumerate() {
            if let Some(proxy) = proxy.as_ref().filter(|_| i == n || j == n) {
                of.push(proxy);
            }
        }
    }
    of
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_a_partition_of_the_engine_cluster() {
    let (servers, proxies) = routed_cluster().await;
    let env =
        [("WHISPEER_STORAGE__DURABLE", "[\"orders/#\"]"), ("WHISPEER_CLUSTER__REPLICAS", "3")];
    let a = node(&[servers[0].url.as_str()], "a", &env);
    let b = node(&[servers[1].url.as_str()], "b", &env);
    let (seen, reading) = count_reads(&b.addr, "orders/#").await;
    // A durable queue group on the reading node too: its share comes through the engine's
    // group consumer, which must keep delivering through the partition.
    let billing = SubscribeOptions::new("orders/#").qos(Qos::AtLeastOnce).group("billing");
    let (billed, billing) = count_reads(&b.addr, billing).await;

    let publisher = Client::connect(&a.addr).await.unwrap();
    // The group's consumer is made once its node learned of the group: warm it up first.
    warm_up(&publisher, &billed).await;
    warm_up(&publisher, &seen).await;
    let publishing = Publishing::start(publisher);

    let cut = routes_of(&proxies, 0);
    for _ in 0..2 {
        sleep(Duration::from_secs(3)).await;
        let before = publishing.acknowledged();
        for proxy in &cut {
            proxy.set(Fault::Pause);
            proxy.reset_all();
        }
        sleep(Duration::from_secs(6)).await;
        for proxy in &cut {
            proxy.set(Fault::Pass);
        }
        // Publishing goes on once the routes are back (JetStream's leaders may take a while:
        // up to 30 s here; the longest wait is reported below).
        let healed = tokio::time::Instant::now();
        while publishing.acknowledged() <= before && healed.elapsed() < Duration::from_secs(30) {
            sleep(Duration::from_millis(250)).await;
        }
        let after = publishing.acknowledged();
        assert!(after > before, "publishing stalled at {after} after the partition healed");
        sleep(Duration::from_secs(3)).await;
    }
    let (published, refused, longest) = publishing.stop().await;

    let again = every_one_read(&seen, published).await;
    reading.abort();
    // Warm-up messages may reach the group late; a message given to it again after the
    // engine's ack wait may come twice (the group is at least once).
    billed.lock().unwrap().remove(&u64::MAX);
    let billed_again = every_one_read(&billed, published).await;
    billing.abort();
    println!(
        "engine cluster partition: {published} QoS 1 messages while the engine server of the \
         publishing node was cut off from the other two twice for 6 s, {refused} publishes \
         refused and retried, {again} delivered twice ({billed_again} to the durable group), longest \
         wait for one acknowledgement {} ms",
        longest.as_millis()
    );
    assert_eq!(again, 0, "a repeated idempotency key is kept once");
}
