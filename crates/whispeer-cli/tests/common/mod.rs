//! Helpers shared by the command-line tests: a `whispeer serve` child, `pub` and `sub` children,
//! and the admin port.
#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]
#![allow(dead_code, reason = "each test file uses some of the helpers")]

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};

pub(crate) mod chat;
pub(crate) mod engines;
pub(crate) mod history;
pub(crate) mod traffic;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_whispeer");

/// `whispeer serve --listen 127.0.0.1:0` with `args`, configured by `envs` only (the caller's
/// `WHISPEER_*` variables removed) and a 500 ms heartbeat; stdout piped, stderr shown when
/// `WHISPEER_TEST_LOG` is set.
pub(crate) fn serve_command(args: &[&str], envs: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BIN);
    let stderr = if std::env::var_os("WHISPEER_TEST_LOG").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    };
    command
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(stderr);
    for (name, _) in std::env::vars() {
        if name.starts_with("WHISPEER_") {
            command.env_remove(name);
        }
    }
    // A short heartbeat so that dead connections are noticed within a test, unless `envs`
    // sets another.
    command.env("WHISPEER_HEARTBEAT_MS", "500").envs(envs.iter().copied());
    command
}

/// A `whispeer serve` child process, killed when dropped.
pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) addr: String,
    /// The admin port's address, when started with one.
    pub(crate) admin: Option<String>,
}

impl Server {
    pub(crate) fn start(envs: &[(&str, &str)]) -> Self {
        Self::start_with(&[], envs)
    }

    /// Starts with extra arguments; with `--admin-listen`, reads the admin port's address too.
    pub(crate) fn start_with(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut child = serve_command(args, envs).spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut next = |prefix: &str| {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            line.trim().strip_prefix(prefix).unwrap_or_else(|| panic!("{line:?}")).to_string()
        };
        let addr = next("whispeer: listening on ");
        let admin =
            args.contains(&"--admin-listen").then(|| next("whispeer: admin listening on http://"));
        Self { child, addr, admin }
    }

    /// Sends SIGTERM and returns the exit status.
    pub(crate) fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child started by hand (a server with options `Server` does not give), killed and reaped
/// when dropped: a test that fails part-way leaves no process running.
pub(crate) struct Reaped(Option<Child>);

impl Reaped {
    pub(crate) fn new(child: Child) -> Self {
        Self(Some(child))
    }

    /// The child itself, no longer killed when dropped (to wait for its output).
    pub(crate) fn into_inner(mut self) -> Child {
        self.0.take().unwrap()
    }
}

impl std::ops::Deref for Reaped {
    type Target = Child;

    fn deref(&self) -> &Child {
        self.0.as_ref().unwrap()
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        self.0.as_mut().unwrap()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `whispeer sub` child; waits until it has subscribed.
pub(crate) fn subscriber(args: &[&str], envs: &[(&str, &str)]) -> Child {
    subscriber_to(args, envs, Stdio::piped())
}

/// A `whispeer sub` child writing what it receives to `stdout`; waits until it has subscribed.
pub(crate) fn subscriber_to(args: &[&str], envs: &[(&str, &str)], stdout: Stdio) -> Child {
    let mut child = Command::new(BIN)
        .arg("sub")
        .args(args)
        .envs(envs.iter().copied())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert!(line.starts_with("whispeer: subscribed"), "{line:?}");
    child
}

/// `whispeer pub` with `args` and extra environment variables.
pub(crate) fn publish_with(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    Command::new(BIN).arg("pub").args(args).envs(envs.iter().copied()).output().unwrap()
}

pub(crate) fn publish(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new(BIN)
        .arg("pub")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

pub(crate) fn output_of(mut child: Child) -> String {
    let status = child.wait().unwrap();
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(status.success(), "sub exited with {status}: {out}");
    out
}

/// `GET path` on the admin port: (status line, body).
pub(crate) fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: whispeer\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of a sample line `name value` in Prometheus text.
pub(crate) fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
}

/// `whispeer serve` with an MQTT listener and the admin port, configured by `envs`: (child,
/// native address, MQTT address, admin address).
pub(crate) fn serve_mqtt_admin(envs: &[(&str, &str)]) -> (Child, String, String, String) {
    let args = ["--mqtt-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
    let mut child = serve_command(&args, envs).spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let (mut native, mut mqtt, mut admin) = (String::new(), String::new(), String::new());
    while native.is_empty() || mqtt.is_empty() || admin.is_empty() {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "the server ended");
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("whispeer: listening on ") {
            native = rest.to_string();
        } else if let Some(rest) = line.strip_prefix("whispeer: mqtt listening on mqtt://") {
            mqtt = rest.to_string();
        } else if let Some(rest) = line.strip_prefix("whispeer: admin listening on http://") {
            admin = rest.to_string();
        }
    }
    (child, native, mqtt, admin)
}

/// The resident memory of process `pid`, in KiB.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Sends an MQTT 3.1.1 CONNECT (clean session, no keep-alive, client `id`), written by hand,
/// and returns the stream (the CONNACK left unread).
pub(crate) fn mqtt_connect(addr: &str, id: &str) -> std::net::TcpStream {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let id = id.as_bytes();
    let mut connect = vec![0x10, 12 + id.len() as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 0];
    connect.extend_from_slice(&[0, id.len() as u8]);
    connect.extend_from_slice(id);
    stream.write_all(&connect).unwrap();
    stream
}

/// Sends an MQTT 3.1.1 CONNECT (clean session, client `id`) and a QoS 0 SUBSCRIBE to `filter`,
/// written by hand, and returns the stream (the replies are left unread).
pub(crate) fn mqtt_subscribe(addr: &str, id: &str, filter: &str) -> std::net::TcpStream {
    let mut stream = mqtt_connect(addr, id);
    let mut subscribe = vec![0x82, (5 + filter.len()) as u8, 0, 1, 0, filter.len() as u8];
    subscribe.extend_from_slice(filter.as_bytes());
    subscribe.push(0);
    stream.write_all(&subscribe).unwrap();
    stream
}
