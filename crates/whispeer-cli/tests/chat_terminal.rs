//! The terminal chat (`whispeer chat`) against a real `whispeer serve --chat-listen`: commands,
//! sealing by default with identities in a keys folder, and `/quit`.

mod common;

use common::chat::{ChatClient, ChatServer, TerminalChat};
use serde_json::json;

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("whispeer-chat-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_terminal_chat_sends_lists_and_pages_history() {
    use std::io::Write;
    let server = ChatServer::start(&[]);
    // Bob speaks plain JSON (as websocat does), so alice's terminal runs `--plain`.
    let mut bob = ChatClient::join(&server.url, "bob", "phone").await;
    let mut child = std::process::Command::new(common::BIN)
        .args(["chat", "--as", "alice", "--plain", "--server", &server.url])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let script = "/msg bob hi from the terminal\nand a plain line\n/create team open\n\
                  /msg #team to the team\n/members team\n/history bob\n/who\n/frobnicate\n";
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let first = bob.next_where(|v| v.get("msg").is_some()).await;
    assert_eq!(
        (first["from"].as_str(), first["msg"].as_str()),
        (Some("alice"), Some("hi from the terminal"))
    );
    let second = bob.next_where(|v| v.get("msg").is_some()).await;
    assert_eq!(second["msg"], "and a plain line", "plain lines go where the last /msg went");
    let output =
        tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("  alice (owner, online)"), "{stdout}");
    assert!(stdout.contains("→bob alice: hi from the terminal"), "{stdout}");
    assert!(stdout.contains("→bob alice: and a plain line"), "{stdout}");
    assert!(stdout.contains("  bob online (phone)"), "{stdout}");
    assert!(stdout.contains("! unknown or incomplete command \"/frobnicate\""), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_terminal_chat_seals_direct_messages_by_default() {
    let dir = temp_dir("identities");
    let server = ChatServer::start(&[]);
    let bob = TerminalChat::start(&server.url, "bob", &dir);
    let mut alice = TerminalChat::start(&server.url, "alice", &dir);
    alice.type_in("/msg bob a sealed hello\n/fingerprint bob\n");
    assert!(alice.wait_for("  bob cli: ").split(": ").nth(1).is_some_and(|f| f.len() == 71));
    let shown = bob.wait_for("alice:");
    assert!(shown.ends_with("alice: a sealed hello"), "opened, not marked plain: {shown}");
    // The server kept only the box: a plain device of bob's sees no text.
    let mut raw = ChatClient::join(&server.url, "bob", "raw").await;
    let stored = raw.next_where(|v| v.get("msg").is_some()).await;
    assert!(stored["msg"]["sealed"].is_string() && !stored.to_string().contains("sealed hello"));
    // A plain message (from a client that does not seal) is shown as such.
    raw.send(&json!({"from": "bob", "to": "alice", "msg": "unsealed"})).await;
    assert!(alice.wait_for("unsealed").ends_with("bob: [plain] unsealed"));
    // Each identity is a file of its own in the keys folder, readable by its owner only.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let file = dir.join("bob.cli.identity");
        let mode = std::fs::metadata(file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the identity file is its owner's only");
    }
    // Bob's terminal restarts with the same file: alice sees no key change and can send.
    drop(bob);
    let bob = TerminalChat::start(&server.url, "bob", &dir);
    alice.type_in("/msg bob after the restart\n");
    assert!(bob.wait_for("after the restart").ends_with("alice: after the restart"));
    drop((alice, bob));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `/quit` right after a message is shown: the message was acknowledged before the process
/// ended, so the next session does not show it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_terminal_chat_acknowledges_what_it_showed_before_it_quits() {
    let dir = temp_dir("quit-identities");
    let server = ChatServer::start(&[]);
    let mut bob = TerminalChat::start(&server.url, "bob", &dir);
    let mut alice = TerminalChat::start(&server.url, "alice", &dir);
    alice.type_in("/msg bob before quitting\n");
    bob.wait_for("before quitting");
    bob.type_in("/quit\n");
    assert!(bob.wait_exit().success());
    let bob = TerminalChat::start(&server.url, "bob", &dir);
    alice.type_in("/msg bob after\n");
    let shown = bob.wait_for("alice:");
    assert!(shown.ends_with("alice: after"), "the first message again: {shown}");
    drop((alice, bob));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_terminal_chat_seals_group_messages_and_reports_a_changed_key() {
    let dir = temp_dir("group-identities");
    let server = ChatServer::start(&[]);
    // The group exists beforehand, made from plain devices of the same users.
    let mut setup = ChatClient::join(&server.url, "alice", "setup").await;
    assert_eq!(
        setup.ask(json!({"type": "create", "group": "team", "open": true})).await["type"],
        "ok"
    );
    let mut bob_setup = ChatClient::join(&server.url, "bob", "setup").await;
    assert_eq!(bob_setup.ask(json!({"type": "join", "group": "team"})).await["type"], "ok");
    let bob = TerminalChat::start(&server.url, "bob", &dir);
    let mut alice = TerminalChat::start(&server.url, "alice", &dir);
    alice.type_in("/msg #team the sealed plan\n");
    assert!(bob.wait_for("key epoch 1 from alice").starts_with("* #team"));
    let shown = bob.wait_for("the sealed plan");
    assert!(shown.ends_with("#team alice: the sealed plan"), "{shown}");
    // Bob's plain device sees only the box.
    let stored = bob_setup.next_where(|v| v["msg"].get("sealed_group").is_some()).await;
    assert!(!stored.to_string().contains("sealed plan"));
    // Bob's identity is replaced (a new phone, or a swapped directory entry): alice's terminal
    // refuses to send until she trusts it.
    drop(bob);
    std::fs::remove_file(dir.join("bob.cli.identity")).unwrap();
    let bob = TerminalChat::start(&server.url, "bob", &dir);
    alice.wait_for("* bob's devices changed");
    alice.type_in("/msg bob are you new?\n");
    assert!(alice.wait_for("CHANGED").contains("bob's key for cli CHANGED"));
    assert!(alice.wait_for("not sent").contains("a key changed"));
    alice.type_in("/trust bob\n/msg bob welcome back\n");
    assert!(alice.wait_for("accepted").contains("1 change(s) of bob's keys accepted"));
    assert!(bob.wait_for("welcome back").ends_with("alice: welcome back"));
    drop((alice, bob));
    let _ = std::fs::remove_dir_all(&dir);
}
