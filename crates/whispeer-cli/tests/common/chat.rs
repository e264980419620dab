//! A chat server child and a scripted chat client (a real WebSocket client, one JSON object per
//! text message), for the chat tests.
#![expect(clippy::unwrap_used, reason = "test helpers fail loudly")]

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::serve_command;

/// A `whispeer serve --chat-listen` child, killed when dropped.
pub(crate) struct ChatServer {
    pub(crate) child: Child,
    /// `ws://host:port/ws`.
    pub(crate) url: String,
}

impl ChatServer {
    /// Starts a server with chat on a free port; `envs` configure it.
    pub(crate) fn start(envs: &[(&str, &str)]) -> Self {
        let mut child = serve_command(&["--chat-listen", "127.0.0.1:0"], envs).spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let url = loop {
            let mut line = String::new();
            assert!(stdout.read_line(&mut line).unwrap() > 0, "the server exited before chat");
            if let Some(url) = line.trim().strip_prefix("whispeer: chat listening on ") {
                break url.to_string();
            }
        };
        Self { child, url }
    }

    /// Kills the server at once (SIGKILL): nothing is flushed on the way out.
    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChatServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A chat client.
pub(crate) struct ChatClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How long a test waits for one expected message.
const PATIENCE: Duration = Duration::from_secs(15);

impl ChatClient {
    /// Connects to `url` (with its query, such as `?id=alice&device=phone`).
    pub(crate) async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Self { ws }
    }

    /// Connects as `user` on `device` and waits for the welcome (`base` may have a query).
    pub(crate) async fn join(base: &str, user: &str, device: &str) -> Self {
        let joiner = if base.contains('?') { '&' } else { '?' };
        let mut client = Self::connect(&format!("{base}{joiner}id={user}&device={device}")).await;
        let welcome = client.next().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        client
    }

    /// Closes the connection and waits for the server's close: its session has ended, so
    /// nothing sent afterwards is delivered to this device (dropping the client instead races
    /// the server noticing the closed socket).
    pub(crate) async fn leave(mut self) {
        let _ = self.ws.close(None).await;
        while let Ok(Some(Ok(_))) = tokio::time::timeout(PATIENCE, self.ws.next()).await {}
    }

    /// Sends one JSON text message.
    pub(crate) async fn send(&mut self, value: &Value) {
        self.ws.send(Message::Text(value.to_string().into())).await.unwrap();
    }

    /// Sends one JSON text message; `false` when the connection is gone.
    pub(crate) async fn try_send(&mut self, value: &Value) -> bool {
        self.ws.send(Message::Text(value.to_string().into())).await.is_ok()
    }

    /// Sends raw text.
    pub(crate) async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::Text(text.to_string().into())).await.unwrap();
    }

    /// The next JSON message, or `None` when the connection ended.
    pub(crate) async fn try_next(&mut self, patience: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let message = tokio::time::timeout_at(deadline, self.ws.next()).await.ok()??;
            match message {
                Ok(Message::Text(text)) => return Some(serde_json::from_str(&text).unwrap()),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// The next JSON message; fails the test after a while.
    pub(crate) async fn next(&mut self) -> Value {
        self.try_next(PATIENCE).await.expect("a chat message")
    }

    /// The next message for which `wanted` holds, skipping others (presence, typing, …).
    pub(crate) async fn next_where(&mut self, wanted: impl Fn(&Value) -> bool) -> Value {
        loop {
            let value = self.next().await;
            if wanted(&value) {
                return value;
            }
        }
    }

    /// The next reply to a request: `sent`, `ok`, `error`, or the named kind.
    pub(crate) async fn reply(&mut self) -> Value {
        self.next_where(|v| {
            matches!(v["type"].as_str(), Some("sent" | "ok" | "error" | "history" | "members"))
        })
        .await
    }

    /// Sends a request and returns its reply.
    pub(crate) async fn ask(&mut self, request: Value) -> Value {
        self.send(&request).await;
        self.reply().await
    }

    /// Asserts that no chat message (one with `msg`) arrives within `quiet`.
    pub(crate) async fn no_message_within(&mut self, quiet: Duration) {
        let deadline = tokio::time::Instant::now() + quiet;
        while let Some(left) = deadline.checked_duration_since(tokio::time::Instant::now()) {
            match self.try_next(left).await {
                Some(value) if value.get("msg").is_some() => panic!("unexpected message {value}"),
                Some(_) => {}
                None => return,
            }
        }
    }
}

/// A `whispeer chat` child, sealing with its identity in a keys folder; its output lines come
/// through a channel. Killed when dropped.
pub(crate) struct TerminalChat {
    child: Child,
    input: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
}

impl TerminalChat {
    /// `whispeer chat --as <user> --keys-dir <dir>` on `url`.
    pub(crate) fn start(url: &str, user: &str, keys: &std::path::Path) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(super::BIN)
            .args(["chat", "--as", user, "--server", url, "--keys-dir"])
            .arg(keys)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while !line.contains("whispeer: identity") {
            line.clear();
            assert!(err.read_line(&mut line).unwrap() > 0, "{user}'s chat ended");
        }
        let (sender, lines) = std::sync::mpsc::channel();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            out.lines().map_while(Result::ok).for_each(|l| drop(sender.send(l)));
        });
        let input = child.stdin.take().unwrap();
        Self { child, input, lines }
    }

    /// Types `text` (lines).
    pub(crate) fn type_in(&mut self, text: &str) {
        use std::io::Write;
        self.input.write_all(text.as_bytes()).unwrap();
    }

    /// Waits for the chat to end by itself (`/quit`, say), and gives its exit status.
    pub(crate) fn wait_exit(mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// The next output line containing `text`; fails after a while.
    pub(crate) fn wait_for(&self, text: &str) -> String {
        loop {
            let line = self.lines.recv_timeout(PATIENCE).unwrap();
            if line.contains(text) {
                return line;
            }
        }
    }
}

impl Drop for TerminalChat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
