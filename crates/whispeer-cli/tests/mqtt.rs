//! The MQTT listener with clients no one here wrote: Debian's `mosquitto_pub` / `mosquitto_sub`
//! and Paho for Python (`tests/mqtt/paho_check.py`), against `whispeer serve --mqtt-listen`:
//! QoS 0, 1 and 2, wills (with a delay too), credentials and ACLs, client ids bound to their
//! principal, shared subscriptions, persistent sessions, MQTT 5 properties, subscription
//! options and request/response, retained messages (kept across a restart for durable topics,
//! listed and cleared by the admin API), messages crossing to and from native clients, and bad
//! input (`tests/mqtt/paho_sessions.py` has the sessions' and options' scenarios).
//! `scripts/install-servers` installs the clients.

#![expect(clippy::unwrap_used, reason = "tests fail loudly")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::time::Duration;

/// A server with an MQTT listener; killed when dropped.
struct MqttServer {
    child: Child,
    addr: String,
    port: String,
    /// The WebSocket listener's port, when started with one.
    ws_port: Option<String>,
}

impl MqttServer {
    fn start(args: &[&str]) -> Self {
        let mut all = vec!["--mqtt-listen", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let mut child = common::serve_command(&all, &[]).spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let (mut addr, mut port, mut ws_port) = (String::new(), String::new(), None);
        let wants_ws = args.contains(&"--ws-listen");
        while port.is_empty() || (wants_ws && ws_port.is_none()) {
            let mut line = String::new();
            assert!(stdout.read_line(&mut line).unwrap() > 0, "the server ended");
            if let Some(rest) = line.trim().strip_prefix("whispeer: listening on ") {
                addr = rest.to_string();
            }
            if let Some(rest) = line.trim().strip_prefix("whispeer: mqtt listening on mqtt://") {
                port = rest.rsplit(':').next().unwrap().to_string();
            }
            if let Some(rest) = line.trim().strip_prefix("whispeer: websocket listening on ws://") {
                let host = rest.split('/').next().unwrap();
                ws_port = Some(host.rsplit(':').next().unwrap().to_string());
            }
        }
        Self { child, addr, port, ws_port }
    }
}

impl Drop for MqttServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tool(name: &str) -> Command {
    let found = Command::new("sh").args(["-c", &format!("command -v {name}")]).output().unwrap();
    assert!(found.status.success(), "{name} is missing: run scripts/install-servers");
    Command::new(name)
}

/// A `mosquitto_sub` child and its output.
struct MosquittoSub {
    child: Child,
    out: BufReader<ChildStdout>,
}

/// `mosquitto_sub` on `port` with `args`, printing `-v` lines (line-buffered through
/// `stdbuf`: it does not flush a pipe itself); waits until it subscribed.
fn mosquitto_sub(port: &str, args: &[&str]) -> MosquittoSub {
    tool("mosquitto_sub");
    let mut child = tool("stdbuf")
        .args(["-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-v", "-d", "-W", "30"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("received SUBACK") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "mosquitto_sub ended before SUBACK");
    }
    MosquittoSub { child, out }
}

/// What a `mosquitto_sub` child printed until it ended, its `-d` chatter left out.
fn received(mut sub: MosquittoSub) -> Vec<String> {
    let mut text = String::new();
    sub.out.read_to_string(&mut text).unwrap();
    let _ = sub.child.wait();
    text.lines()
        .filter(|l| !l.starts_with("Client ") && !l.starts_with("Subscribed"))
        .map(str::to_string)
        .collect()
}

fn mosquitto_pub(port: &str, args: &[&str]) -> Output {
    tool("mosquitto_pub").args(["-h", "127.0.0.1", "-p", port, "-d"]).args(args).output().unwrap()
}

fn paho(port: &str, scenario: &str) {
    paho_script("paho_check.py", port, scenario);
}

/// Runs one scenario of a Paho script in `tests/mqtt/`.
fn paho_script(script: &str, port: &str, scenario: &str) {
    let script = format!("{}/tests/mqtt/{script}", env!("CARGO_MANIFEST_DIR"));
    let output = tool("python3").args([&script, port, scenario]).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && text.starts_with("ok:"), "{scenario}: {text}{errors}");
}

#[test]
fn mosquitto_clients_exchange_messages_at_every_qos_with_native_clients_too() {
    let server = MqttServer::start(&[]);
    let sub = mosquitto_sub(&server.port, &["-t", "m/#", "-q", "2", "-C", "4"]);
    let native = common::subscriber(&["--server", &server.addr, "--count", "4", "m/#"], &[]);
    for (qos, text) in [("0", "at most once"), ("1", "at least once"), ("2", "exactly once")] {
        let out = mosquitto_pub(&server.port, &["-t", &format!("m/q{qos}"), "-m", text, "-q", qos]);
        assert!(out.status.success(), "{out:?}");
        let chatter = String::from_utf8_lossy(&out.stdout);
        if qos == "2" {
            assert!(chatter.contains("received PUBREC") && chatter.contains("received PUBCOMP"));
        }
    }
    let sent = common::publish_with(&["--server", &server.addr, "m/native", "from native"], &[]);
    assert!(sent.status.success(), "{sent:?}");
    assert_eq!(
        received(sub),
        ["m/q0 at most once", "m/q1 at least once", "m/q2 exactly once", "m/native from native"]
    );
    let native = common::output_of(native);
    for text in ["at most once", "at least once", "exactly once"] {
        assert!(native.contains(text), "the native subscriber got MQTT's messages: {native}");
    }
}

#[test]
fn a_will_is_published_when_a_client_vanishes_or_goes_silent_but_not_after_disconnect() {
    let server = MqttServer::start(&[]);
    let watcher = mosquitto_sub(&server.port, &["-t", "status/#", "-C", "2"]);
    // A client that says DISCONNECT: its will is dropped.
    let clean =
        &["-t", "x/y", "-m", "bye", "--will-topic", "status/clean", "--will-payload", "gone"];
    assert!(mosquitto_pub(&server.port, clean).status.success());
    // A client that vanishes: its will goes out.
    let will = |device: &'static str| {
        ["-t", "x/never", "--will-topic", device, "--will-payload", "offline", "--will-qos", "1"]
    };
    let mut vanishing = mosquitto_sub(&server.port, &will("status/dev1"));
    vanishing.child.kill().unwrap();
    let _ = vanishing.child.wait();
    // A client that stops (its socket open, no PINGREQ): its will goes out after 1.5 × its
    // keep-alive of 5 s (mosquitto's shortest).
    let silent =
        mosquitto_sub(&server.port, &[&will("status/dev2")[..], &["-k", "5"][..]].concat());
    let pid = silent.child.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    assert_eq!(received(watcher), ["status/dev1 offline", "status/dev2 offline"]);
    let _ = Command::new("kill").args(["-KILL", &pid]).status();
    let mut silent = silent;
    let _ = silent.child.wait();
}

#[test]
fn credentials_and_acls_apply_to_mqtt_clients() {
    let file = std::env::temp_dir().join(format!("whispeer-mqtt-acl-{}.toml", std::process::id()));
    let users = "[[users]]\nname = \"alice\"\napi_key = \"alice-key\"\n\
                 publish = [\"allowed/#\"]\nsubscribe = [\"allowed/#\"]\n";
    std::fs::write(&file, users).unwrap();
    let server = MqttServer::start(&["--config", file.to_str().unwrap()]);
    let port = &server.port;
    // No password, or a wrong one: refused at CONNECT.
    let none = mosquitto_pub(port, &["-t", "allowed/a", "-m", "x"]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("not authorised"), "{none:?}");
    let wrong = mosquitto_pub(port, &["-t", "allowed/a", "-m", "x", "-u", "alice", "-P", "nope"]);
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("bad user name or password"));
    paho(port, "wrong-password");
    let alice = ["-u", "alice", "-P", "alice-key"];
    // A denied filter fails in SUBACK; a denied publish is refused (MQTT 5: reason 135).
    let denied = tool("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", port, "-t", "secret/#", "-W", "5"])
        .args(alice)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&denied.stderr).contains("denied"), "{denied:?}");
    let sub = mosquitto_sub(port, &[&["-t", "allowed/#", "-C", "1"][..], &alice[..]].concat());
    let refused = mosquitto_pub(
        port,
        &[&["-V", "mqttv5", "-q", "1", "-t", "secret/x", "-m", "no"][..], &alice[..]].concat(),
    );
    assert!(String::from_utf8_lossy(&refused.stdout).contains("RC:135"), "{refused:?}");
    let allowed = mosquitto_pub(
        port,
        &[&["-q", "1", "-t", "allowed/x", "-m", "yes"][..], &alice[..]].concat(),
    );
    assert!(allowed.status.success(), "{allowed:?}");
    assert_eq!(received(sub), ["allowed/x yes"]);
    let _ = std::fs::remove_file(file);
}

#[test]
fn paho_shares_subscriptions_resumes_sessions_and_carries_mqtt5_properties_and_request_response() {
    let server = MqttServer::start(&["--ws-listen", "127.0.0.1:0"]);
    for scenario in ["shared", "request", "properties", "persistent", "aliases", "takeover"] {
        paho(&server.port, scenario);
    }
    // MQTT over WebSocket, on the WebSocket listener at /mqtt.
    paho(server.ws_port.as_deref().unwrap(), "websocket");
}

#[test]
fn malformed_and_oversized_packets_end_only_their_own_connection() {
    let server = MqttServer::start(&[]);
    let address = format!("127.0.0.1:{}", server.port);
    let closed = |stream: &mut TcpStream| {
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        rest
    };
    // Not MQTT at all.
    let mut garbage = TcpStream::connect(&address).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(closed(&mut garbage).is_empty());
    // A CONNECT (3.1.1, clean, keep-alive 60, no client id), then a PUBLISH announcing 256 MiB:
    // the CONNACK comes, then the connection ends before a byte of the body is read.
    let mut big = TcpStream::connect(&address).unwrap();
    let connect = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0];
    big.write_all(&connect).unwrap();
    big.write_all(&[0x30, 0xff, 0xff, 0xff, 0x7f]).unwrap();
    assert_eq!(closed(&mut big), [0x20, 2, 0, 0], "CONNACK, then the end");
    // A malformed remaining length (five continuation bytes).
    let mut bad = TcpStream::connect(&address).unwrap();
    bad.write_all(&connect).unwrap();
    bad.write_all(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01]).unwrap();
    assert_eq!(closed(&mut bad), [0x20, 2, 0, 0]);
    // The server goes on serving others.
    let sub = mosquitto_sub(&server.port, &["-t", "still/#", "-C", "1"]);
    assert!(mosquitto_pub(&server.port, &["-t", "still/here", "-m", "yes"]).status.success());
    assert_eq!(received(sub), ["still/here yes"]);
}

#[test]
fn retained_messages_reach_new_subscribers_of_every_protocol_and_an_empty_one_clears() {
    let server = MqttServer::start(&[]);
    let port = &server.port;
    assert!(
        mosquitto_pub(port, &["-t", "home/lamp", "-m", "on", "-r", "-q", "1"]).status.success()
    );
    let native =
        common::publish_with(&["--server", &server.addr, "--retain", "home/door", "shut"], &[]);
    assert!(native.status.success(), "{native:?}");
    // A new MQTT subscriber gets both first, flagged retained (r1).
    let mut sub = tool("stdbuf")
        .args(["-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-v", "-d", "-t", "home/#"])
        .args(["-C", "2", "-W", "20"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&sub.stdout).into_owned();
    assert!(text.contains("home/lamp on") && text.contains("home/door shut"), "{text}");
    assert_eq!(text.matches(", r1, ").count(), 2, "{text}");
    // A client with a persistent session too (its subscription is a queue group of its own).
    let persistent = tool("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", port, "-v", "-c", "-i", "keeper", "-q", "1"])
        .args(["-t", "home/door", "-C", "1", "-W", "20"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&persistent.stdout).trim(), "home/door shut");
    // A new native subscriber too.
    let got = common::subscriber(&["--server", &server.addr, "--count", "1", "home/lamp"], &[]);
    assert!(common::output_of(got).contains("on"));
    // An empty retained message clears the topic's: a later subscriber gets only the door.
    assert!(mosquitto_pub(port, &["-t", "home/lamp", "-n", "-r"]).status.success());
    sub = tool("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", port, "-v", "-t", "home/#", "-W", "2"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&sub.stdout).trim(), "home/door shut");
}

#[test]
fn request_reply_works_between_native_and_mqtt5_clients_with_clear_errors() {
    let server = MqttServer::start(&[]);
    let addr = server.addr.as_str();
    let bin = |args: &[&str]| Command::new(common::BIN).args(args).output().unwrap();
    // A native responder answers an MQTT 5 requester.
    let mut responder = Command::new(common::BIN)
        .args(["reply", "--server", addr, "svc/native", "--message", "pong", "--count", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    BufReader::new(responder.stderr.take().unwrap()).read_line(&mut ready).unwrap();
    assert!(ready.contains("answering requests"), "{ready}");
    paho(&server.port, "ask-native");
    assert!(responder.wait().unwrap().success());
    // An MQTT 5 responder answers a native request.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mqtt/paho_check.py");
    let mut answering = tool("python3")
        .args([script, &server.port, "answer-native"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(answering.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let asked = bin(&["req", "--server", addr, "svc/paho", "hello"]);
    assert_eq!(String::from_utf8_lossy(&asked.stdout).trim(), "paho says hello", "{asked:?}");
    assert!(answering.wait().unwrap().success());
    // Nothing subscribes: refused at once; something takes it and never answers: no reply.
    let nobody = bin(&["req", "--server", addr, "svc/nobody", "x"]);
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("no responders"), "{nobody:?}");
    let silent = common::subscriber(&["--server", addr, "svc/silent"], &[]);
    let waited = bin(&["req", "--server", addr, "--timeout-ms", "300", "svc/silent", "x"]);
    assert!(String::from_utf8_lossy(&waited.stderr).contains("no reply"), "{waited:?}");
    let mut silent = silent;
    let _ = silent.kill();
    let _ = silent.wait();
}

#[test]
fn a_retained_publish_past_the_bound_is_refused_not_dropped() {
    let server = common::Server::start(&[("WHISPEER_MAX_RETAINED", "1")]);
    let publish = |topic: &str| {
        common::publish_with(&["--server", &server.addr, "--ack", "--retain", topic, "on"], &[])
    };
    assert!(publish("lamps/a").status.success());
    // Replacing the topic's retained message is within the bound; another topic is not.
    assert!(publish("lamps/a").status.success());
    let refused = publish("lamps/b");
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("max_retained"), "{said}");
}

#[test]
fn mqtt5_subscription_options_delayed_wills_and_sessions_that_outlive_the_group_linger() {
    // The broker's group linger is short: a persistent session keeps its messages for its
    // own expiry regardless.
    let file =
        std::env::temp_dir().join(format!("whispeer-mqtt-linger-{}.toml", std::process::id()));
    std::fs::write(&file, "[delivery]\ngroup_linger_ms = 200\n").unwrap();
    let server = MqttServer::start(&["--config", file.to_str().unwrap()]);
    for scenario in ["options", "will-delay", "expiry", "auth-method"] {
        paho_script("paho_sessions.py", &server.port, scenario);
    }
    let _ = std::fs::remove_file(file);
}

#[test]
fn a_client_id_belongs_to_its_principal_and_a_wrong_password_takes_nothing_over() {
    let file =
        std::env::temp_dir().join(format!("whispeer-mqtt-bound-{}.toml", std::process::id()));
    let users = "[[users]]\nname = \"alice\"\napi_key = \"alice-key\"\n\
                 publish = [\"#\"]\nsubscribe = [\"#\"]\n\
                 [[users]]\nname = \"bob\"\napi_key = \"bob-key\"\n\
                 publish = [\"#\"]\nsubscribe = [\"#\"]\n";
    std::fs::write(&file, users).unwrap();
    let server = MqttServer::start(&["--config", file.to_str().unwrap()]);
    paho_script("paho_sessions.py", &server.port, "bound");
    let _ = std::fs::remove_file(file);
}

/// `method path` on the admin port with the token: (status code, body).
fn admin_call(admin: &str, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(admin).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: whispeer\r\nAuthorization: Bearer t0ken\r\n\
         Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, body.to_string())
}

#[test]
fn retained_messages_of_durable_topics_survive_a_kill_and_the_admin_api_lists_and_clears_them() {
    let dir = std::env::temp_dir().join(format!("whispeer-mqtt-retained-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let dir_text = dir.to_string_lossy().to_string();
    let envs = [
        ("WHISPEER_STORAGE__DIR", dir_text.as_str()),
        ("WHISPEER_STORAGE__DURABLE", r#"["home/#"]"#),
        ("WHISPEER_ADMIN_TOKEN", "t0ken"),
    ];
    let retained_now = |port: &str| {
        let out = tool("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", port, "-v", "-t", "#", "-W", "2"])
            .output()
            .unwrap();
        let mut lines: Vec<String> =
            String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
        lines.sort();
        lines
    };
    let (mut child, _, mqtt, _) = common::serve_mqtt_admin(&envs);
    let port = mqtt.rsplit(':').next().unwrap().to_string();
    for (topic, text) in [("home/lamp", "on"), ("home/door", "shut"), ("mem/x", "fleeting")] {
        let out = mosquitto_pub(&port, &["-t", topic, "-m", text, "-r", "-q", "1"]);
        assert!(out.status.success(), "{out:?}");
    }
    // Replaced, then a durable topic cleared: the last word of each stays.
    assert!(
        mosquitto_pub(&port, &["-t", "home/lamp", "-m", "dim", "-r", "-q", "1"]).status.success()
    );
    assert!(mosquitto_pub(&port, &["-t", "home/door", "-n", "-r", "-q", "1"]).status.success());
    assert_eq!(retained_now(&port), ["home/lamp dim", "mem/x fleeting"]);
    // Killed: the durable topic's retained message comes back, the other does not.
    child.kill().unwrap();
    let _ = child.wait();
    let (mut child, _, mqtt, admin) = common::serve_mqtt_admin(&envs);
    let port = mqtt.rsplit(':').next().unwrap().to_string();
    assert_eq!(retained_now(&port), ["home/lamp dim"]);
    // The admin API lists it, and clears it (on disk too).
    let (code, body) = admin_call(&admin, "GET", "/api/retained?filter=home/%23");
    assert_eq!(code, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["messages"][0]["topic"], "home/lamp", "{body}");
    assert_eq!(listed["messages"].as_array().unwrap().len(), 1, "{body}");
    let (code, body) = admin_call(&admin, "DELETE", "/api/retained?topic=home/lamp");
    assert_eq!(code, 200, "{body}");
    assert_eq!(admin_call(&admin, "DELETE", "/api/retained?topic=home/lamp").0, 404);
    assert!(retained_now(&port).is_empty());
    child.kill().unwrap();
    let _ = child.wait();
    let (mut child, _, mqtt, _) = common::serve_mqtt_admin(&envs);
    let port = mqtt.rsplit(':').next().unwrap().to_string();
    assert!(retained_now(&port).is_empty(), "cleared for good");
    child.kill().unwrap();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
