//! Engine servers on loopback for the cluster tests (nats-server, alone or a routed cluster of
//! three; redis-server), and `whispeer serve` nodes on them.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use super::Server;

/// A nats-server child on loopback, killed (SIGKILL) when dropped.
pub(crate) struct Nats {
    child: Child,
    pub(crate) url: String,
    /// JetStream's directory, removed when dropped.
    store: PathBuf,
}

impl Nats {
    /// Starts nats-server on `port` (0: any free port), with JetStream.
    pub(crate) fn start(port: u16) -> Self {
        Self::start_with(port, &[])
    }

    fn start_with(port: u16, extra: &[String]) -> Self {
        let port = if port == 0 { "-1".to_string() } else { port.to_string() };
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let store = std::env::temp_dir().join(format!("whispeer-nats-{}-{n}", std::process::id()));
        let mut child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
            .arg(&store)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nats-server must be installed (scripts/install-servers installs it)");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let url = loop {
            line.clear();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "nats-server exited");
            if let Some((_, addr)) = line.split_once("Listening for client connections on ") {
                break format!("nats://{}", addr.trim());
            }
        };
        // Keep reading its log, so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in stderr.lines() {});
        Self { child, url, store }
    }

    /// Three servers routed into one NATS cluster.
    pub(crate) fn cluster() -> [Self; 3] {
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let start = |i: usize| {
            let others: Vec<String> = (0..3)
                .filter(|&j| j != i)
                .map(|j| format!("nats://127.0.0.1:{}", routes[j]))
                .collect();
            let args = [
                "--cluster_name".to_string(),
                "whispeer-test".to_string(),
                "--name".to_string(),
                format!("n{i}"),
                "--cluster".to_string(),
                format!("nats://127.0.0.1:{}", routes[i]),
                "--routes".to_string(),
                others.join(","),
            ];
            Self::start_with(0, &args)
        };
        [start(0), start(1), start(2)]
    }

    pub(crate) fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A `whispeer serve` node named `name` on the engine servers `urls`, with an admin port.
pub(crate) fn node(urls: &[&str], name: &str, envs: &[(&str, &str)]) -> Server {
    node_with(urls, name, &[], envs)
}

/// [`node`] with more arguments for `whispeer serve`.
pub(crate) fn node_with(urls: &[&str], name: &str, args: &[&str], envs: &[(&str, &str)]) -> Server {
    let urls =
        format!("[{}]", urls.iter().map(|u| format!("\"{u}\"")).collect::<Vec<_>>().join(", "));
    let mut all = vec![("WHISPEER_CLUSTER__URLS", urls.as_str()), ("WHISPEER_CLUSTER__NODE", name)];
    all.extend_from_slice(envs);
    let mut all_args = vec!["--admin-listen", "127.0.0.1:0"];
    all_args.extend_from_slice(args);
    let server = Server::start_with(&all_args, &all);
    // A node accepts clients before its engine link is up (publishes meanwhile are refused
    // with CLUSTER_UNAVAILABLE, as documented): wait for /readyz, which says when it is, for a
    // while (a test may start a node whose engine is down on purpose).
    if let Some(admin) = &server.admin {
        for _ in 0..100 {
            if super::http_get(admin, "/readyz").0.contains("200") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    server
}

/// A redis-server child on loopback (no persistence), killed (SIGKILL) when dropped.
pub(crate) struct Redis {
    child: Child,
    pub(crate) url: String,
}

impl Redis {
    pub(crate) fn start() -> Self {
        Self::start_on(free_port())
    }

    /// Starts redis-server on `port`.
    pub(crate) fn start_on(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/install-servers installs it)");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        Self { child, url: format!("redis://127.0.0.1:{port}") }
    }

    pub(crate) fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes QoS 1 on `topic` from `client` until it is refused (the node's engine is away);
/// asserts the refusal is `CLUSTER_UNAVAILABLE`.
pub(crate) async fn refused_while_away(client: &whispeer_client::Client, topic: &str) {
    use whispeer_client::ClientError;
    use whispeer_client::proto::ErrorCode;
    for _ in 0..100 {
        match client.publish_acked(topic, &1u64).await {
            Err(ClientError::Server { code, message }) => {
                assert_eq!(code, ErrorCode::CLUSTER_UNAVAILABLE, "{message}");
                return;
            }
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            Err(other) => panic!("{other}"),
        }
    }
    panic!("QoS 1 was never refused while the engine was away");
}

/// Publishes QoS 1 on `topic` from `client` until one reaches `sub` (the engine is back and the
/// nodes subscribed again); asserts it happens within about 30 s.
pub(crate) async fn heals(
    client: &whispeer_client::Client,
    topic: &str,
    sub: &mut whispeer_client::ClientSubscription<u64>,
) {
    use std::time::Duration;
    for n in 0..300u64 {
        if client.publish_acked(topic, &n).await.is_ok()
            && let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(50), sub.recv()).await
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("messages never crossed again after the engine returned");
}

/// Takes what `members` of one queue group receive until `count` distinct values came (or
/// nothing came for 5 s); asserts none came twice. Returns the values.
pub(crate) async fn group_once(
    members: &mut [whispeer_client::ClientSubscription<u64>],
    count: usize,
) -> std::collections::BTreeSet<u64> {
    use std::time::Duration;
    let mut once = std::collections::BTreeSet::new();
    let mut quiet = 0;
    while once.len() < count && quiet < 250 {
        quiet += 1;
        for member in members.iter_mut() {
            while let Ok(Some(n)) =
                tokio::time::timeout(Duration::from_millis(20), member.recv()).await
            {
                assert!(once.insert(n), "{n} reached the group twice");
                quiet = 0;
            }
        }
    }
    once
}
