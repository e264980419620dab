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
    /// Its arguments past the port and the directory (a cluster's routes), to start it again.
    extra: Vec<String>,
}

impl Nats {
    /// Starts nats-server on `port` (0: any free port), with JetStream.
    pub(crate) fn start(port: u16) -> Self {
        Self::start_with(port, &[])
    }

    pub(crate) fn start_with(port: u16, extra: &[String]) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let store = std::env::temp_dir().join(format!("whispeer-nats-{}-{n}", std::process::id()));
        let (child, url) = Self::spawn(port, &store, extra);
        Self { child, url, store, extra: extra.to_vec() }
    }

    fn spawn(port: u16, store: &std::path::Path, extra: &[String]) -> (Child, String) {
        let port = if port == 0 { "-1".to_string() } else { port.to_string() };
        let mut child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd"])
            .arg(store)
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
        (child, url)
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

    /// Kills the server (SIGKILL), keeping its JetStream directory.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on its port, directory and routes.
    pub(crate) fn restart(&mut self) {
        let (child, url) = Self::spawn(self.port(), &self.store, &self.extra);
        assert_eq!(url, self.url, "the same address again");
        self.child = child;
    }
}

/// An engine server the fault tests freeze and crash.
pub(crate) trait EngineServer {
    /// Freezes the server (SIGSTOP; to its peers and clients, a black hole) or lets it go on
    /// (SIGCONT).
    fn freeze(&self, frozen: bool);

    /// Kills the server (SIGKILL) and starts it again on its port, with what it keeps on disk.
    fn crash_and_restart(&mut self);
}

impl EngineServer for Nats {
    fn freeze(&self, frozen: bool) {
        freeze(&self.child, frozen);
    }

    /// Starts it with its JetStream directory and routes.
    fn crash_and_restart(&mut self) {
        self.kill();
        self.restart();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// Stops `child` (SIGSTOP) or lets it go on (SIGCONT).
fn freeze(child: &Child, frozen: bool) {
    let signal = if frozen { "-STOP" } else { "-CONT" };
    let pid = child.id().to_string();
    assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success());
}

pub(crate) fn free_port() -> u16 {
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

/// A redis-server child on loopback, killed (SIGKILL) when dropped: without persistence, or
/// with an append-only file synced before each reply in a directory of its own.
pub(crate) struct Redis {
    child: Child,
    pub(crate) url: String,
    /// The append-only file's directory (removed when dropped), if it keeps one.
    dir: Option<PathBuf>,
}

impl Redis {
    pub(crate) fn start() -> Self {
        Self::start_on(free_port())
    }

    /// Starts redis-server on `port`, keeping nothing.
    pub(crate) fn start_on(port: u16) -> Self {
        Self { child: Self::spawn(port, None), url: format!("redis://127.0.0.1:{port}"), dir: None }
    }

    /// Starts redis-server on a free port with `appendonly yes` and `appendfsync always`:
    /// what it answered survives a crash of the server.
    pub(crate) fn start_persistent() -> Self {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("whispeer-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Self::spawn(port, Some(&dir));
        Self { child, url: format!("redis://127.0.0.1:{port}"), dir: Some(dir) }
    }

    fn spawn(port: u16, dir: Option<&std::path::Path>) -> Child {
        let port = port.to_string();
        let mut args = vec!["--bind", "127.0.0.1", "--port", &port, "--save", ""];
        let dir = dir.map(|d| d.to_string_lossy().into_owned());
        match &dir {
            Some(dir) => {
                args.extend(["--appendonly", "yes", "--appendfsync", "always", "--dir", dir])
            }
            None => args.extend(["--appendonly", "no"]),
        }
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/install-servers installs it)");
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        child
    }

    pub(crate) fn port(&self) -> u16 {
        self.url.rsplit(':').next().unwrap().parse().unwrap()
    }
}

impl EngineServer for Redis {
    fn freeze(&self, frozen: bool) {
        freeze(&self.child, frozen);
    }

    /// Starts it with its append-only file, if it keeps one.
    fn crash_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(self.port(), self.dir.as_deref());
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
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
