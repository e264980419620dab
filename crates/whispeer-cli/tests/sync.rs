//! `whispeer sync` through a real `whispeer serve --relay`: two nodes meet on a mesh topic and
//! exchange lines both ways; a recording proxy in front of the relay shows it forwarded no
//! plaintext; the relay restarts and the nodes find each other again.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// `whispeer serve` with the relay on its WebSocket listener at `ws`; the relay's URL.
fn relay(ws: &str, admin: bool) -> (common::Server, String) {
    let mut args = vec!["--ws-listen", ws, "--relay"];
    if admin {
        args.extend(["--admin-listen", "127.0.0.1:0"]);
    }
    let mut child = common::serve_command(&args, &[]).spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let (mut addr, mut url, mut admin_addr) = (String::new(), None, None);
    while url.is_none() || (admin && admin_addr.is_none()) {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "the server ended");
        if let Some(rest) = line.trim().strip_prefix("whispeer: listening on ") {
            addr = rest.to_string();
        }
        if let Some(rest) = line.trim().strip_prefix("whispeer: relay listening on ") {
            url = Some(rest.to_string());
        }
        if let Some(rest) = line.trim().strip_prefix("whispeer: admin listening on http://") {
            admin_addr = Some(rest.to_string());
        }
    }
    (common::Server { child, addr, admin: admin_addr }, url.unwrap())
}

/// A `whispeer sync` node: its stdin, and its stdout and stderr lines as they come.
struct Node {
    child: Child,
    stdin: ChildStdin,
    out: Receiver<String>,
    err: Receiver<String>,
}

fn lines(read: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(read).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn node(relay: &str, publish: &str) -> Node {
    node_with(&["--relay", relay], publish)
}

fn node_with(args: &[&str], publish: &str) -> Node {
    let mut child = Command::new(common::BIN)
        .args(["sync", "--topic", "team docs", "--share", "docs/#", "--pub", publish])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let out = lines(child.stdout.take().unwrap());
    let err = lines(child.stderr.take().unwrap());
    Node { child, stdin, out, err }
}

impl Node {
    /// The first stderr line that contains `needle`.
    fn wait_err(&self, needle: &str) -> String {
        loop {
            let line =
                self.err.recv_timeout(WAIT).unwrap_or_else(|_| panic!("no {needle:?} in time"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    fn say(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn hear(&self) -> String {
        self.out.recv_timeout(WAIT).expect("a line in time")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy to `target` that records the bytes both ways.
fn recording_proxy(target: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { break };
            let Ok(server) = TcpStream::connect(&target) else { continue };
            for (mut from, mut to) in
                [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
            {
                let record = Arc::clone(&record);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = from.read(&mut buf) {
                        if n == 0 || to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        record.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    (format!("ws://{addr}"), seen)
}

#[test]
fn two_nodes_sync_through_a_relay_that_sees_only_ciphertext_and_survive_its_restart() {
    let (server, url) = relay("127.0.0.1:0", false);
    let host = url.trim_start_matches("ws://").trim_end_matches("/relay").to_string();
    let (proxied, seen) = recording_proxy(host.clone());
    let mut a = node(&proxied, "docs/from-a");
    let mut b = node(&url, "docs/from-b");
    a.wait_err("connected");
    b.wait_err("connected");

    let secret = "a line the relay must not read";
    a.say(secret);
    assert_eq!(b.hear(), format!("docs/from-a {secret}"));
    assert_eq!(a.hear(), format!("docs/from-a {secret}"), "a node gets its own too");
    b.say("hello back");
    assert_eq!(a.hear(), "docs/from-b hello back");
    assert_eq!(b.hear(), "docs/from-b hello back");
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() > 1000, "the proxy carried the traffic ({} bytes)", seen.len());
    for plain in [secret.as_bytes(), b"hello back", b"docs/from-a"] {
        assert!(!seen.windows(plain.len()).any(|w| w == plain), "the relay saw {plain:?}");
    }

    // The relay restarts on the same address: the nodes reconnect and meet again.
    drop(server);
    a.wait_err("left");
    let (server, _) = relay(&host, true);
    a.wait_err("connected");
    b.wait_err("connected");
    a.say("after the restart");
    assert_eq!(b.hear(), "docs/from-a after the restart");
    // The relay's own counters, on its admin port.
    let (_, metrics) = common::http_get(server.admin.as_deref().unwrap(), "/metrics");
    assert_eq!(common::sample(&metrics, "whispeer_relay_connections"), 2.0);
    assert_eq!(common::sample(&metrics, "whispeer_relay_links"), 1.0);
    assert!(common::sample(&metrics, "whispeer_relay_bytes_total") > 100.0);
}

#[test]
fn the_relay_needs_a_websocket_listener() {
    let output = common::serve_command(&["--relay"], &[]).stderr(Stdio::piped()).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("ws_listen"));
}

#[test]
fn two_nodes_sync_through_the_dht_one_bootstrapping_from_the_other() {
    let listen = ["--listen", "/ip4/127.0.0.1/tcp/0"];
    let mut a = node_with(&listen, "docs/from-a");
    let line = a.wait_err("sync listening on");
    let address = line.rsplit(' ').next().unwrap().to_string();
    assert!(address.contains("/p2p/12D3KooW"), "{address}");
    let mut b = node_with(
        &["--listen", "/ip4/127.0.0.1/udp/0/quic-v1", "--bootstrap", &address],
        "docs/from-b",
    );
    a.wait_err("connected");
    b.wait_err("connected");
    a.say("over the DHT");
    assert_eq!(b.hear(), "docs/from-a over the DHT");
    b.say("and back");
    assert_eq!(a.hear(), "docs/from-a over the DHT");
    assert_eq!(a.hear(), "docs/from-b and back");
}
