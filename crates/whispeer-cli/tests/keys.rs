//! `whispeer keys` against `whispeer serve` with API keys: devices publish their identities,
//! an owner makes a key policy, members read what is sealed under it and a removed member no
//! longer opens what comes after; a plain subscriber sees ciphertext only; an owner's device key
//! swapped in the directory is reported and trusted only when told.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

mod common;

use common::{BIN, Server};

#[test]
fn members_read_a_policys_messages_and_a_removed_member_opens_nothing_new() {
    let dir = std::env::temp_dir().join(format!("whispeer-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut users = String::new();
    for name in ["alice", "bob", "carol", "eve"] {
        users.push_str(&format!(
            "[[users]]\nname = \"{name}\"\napi_key = \"{name}-key\"\npublish = [\"#\"]\nsubscribe = [\"#\"]\n"
        ));
    }
    let config = dir.join("users.toml");
    std::fs::write(&config, users).unwrap();
    let server = Server::start_with(&["--config", config.to_str().unwrap()], &[]);
    let keys = |name: &str, args: &[&str]| {
        let identity = dir.join(format!("{name}.identity"));
        let mut command = Command::new(BIN);
        command.arg("keys").args(args).args(["--as", name, "--identity"]).arg(identity);
        command.args(["--server", &server.addr, "--api-key", &format!("{name}-key")]);
        command
    };
    for name in ["bob", "carol"] {
        let out = keys(name, &["publish", "--device", "phone"]).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("phone "), "{out:?}");
    }
    // Eve may not write bob's entry: the server refuses it.
    let forged = Command::new(BIN)
        .args(["keys", "publish", "--as", "bob", "--identity"])
        .arg(dir.join("eve.identity"))
        .args(["--server", &server.addr, "--api-key", "eve-key"])
        .output()
        .unwrap();
    assert!(!forged.status.success(), "{forged:?}");
    let made = keys(
        "alice",
        &["policy", "ops", "--filter", "ops/#", "--member", "bob", "--member", "carol"],
    )
    .output()
    .unwrap();
    assert!(made.status.success(), "{made:?}");
    assert_eq!(
        String::from_utf8_lossy(&made.stdout).trim(),
        "alice/ops ops/# epoch 1: alice bob carol"
    );
    let reader = |name: &str| {
        let mut child =
            keys(name, &["sub", "alice/ops", "ops/#", "--count", "2", "--device", "phone"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stderr.take().unwrap()).read_line(&mut ready).unwrap();
        assert!(ready.contains("reading ops/#"), "{ready}");
        child
    };
    let (bob, carol) = (reader("bob"), reader("carol"));
    let plain = common::subscriber(
        &["--server", &server.addr, "--api-key", "eve-key", "--count", "2", "ops/#"],
        &[],
    );
    let sent = keys("alice", &["pub", "alice/ops", "ops/deploy", "release 1.2"]).output().unwrap();
    assert!(sent.status.success(), "{sent:?}");
    // Carol is removed: the next message is sealed with a key she never gets.
    let changed =
        keys("alice", &["policy", "ops", "--filter", "ops/#", "--member", "bob"]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&changed.stdout).trim(),
        "alice/ops ops/# epoch 2: alice bob"
    );
    let sent = keys("alice", &["pub", "alice/ops", "ops/deploy", "release 1.3"]).output().unwrap();
    assert!(sent.status.success(), "{sent:?}");
    assert_eq!(common::output_of(bob), "release 1.2\nrelease 1.3\n");
    let carol = common::output_of(carol);
    let lines: Vec<&str> = carol.lines().collect();
    assert_eq!(lines[0], "release 1.2");
    assert!(lines[1].starts_with("! ops/deploy: no key for epoch 2"), "{carol}");
    // Each device kept the keys it opened beside its identity (carol only epoch 1's), and the
    // owner's device key it trusts.
    let kept = |name: &str| {
        let file = dir.join(format!("{name}.identity.alice.ops.keys"));
        let text = std::fs::read_to_string(file).unwrap();
        let owners = text.lines().filter(|l| l.starts_with("owner ")).count();
        (text.lines().count() - owners, owners)
    };
    assert_eq!((kept("alice"), kept("bob"), kept("carol")), ((2, 1), (2, 1), (1, 1)));
    let seen = common::output_of(plain);
    assert!(!seen.contains("release"), "the server carried ciphertext only: {seen}");

    // Someone with alice's API key but not her device puts another key in the directory for
    // it and makes an epoch that lets eve in: bob's device reports the change and seals
    // nothing under the policy until told to trust it.
    let thief = |args: &[&str]| {
        let mut command = Command::new(BIN);
        command.arg("keys").args(args).args(["--as", "alice", "--identity"]);
        command.arg(dir.join("thief.identity"));
        command.args(["--server", &server.addr, "--api-key", "alice-key"]);
        command.output().unwrap()
    };
    assert!(thief(&["publish"]).status.success());
    assert!(keys("eve", &["publish"]).output().unwrap().status.success());
    let forged =
        thief(&["policy", "ops", "--filter", "ops/#", "--member", "bob", "--member", "eve"]);
    assert!(forged.status.success(), "{forged:?}");
    let bob_pub =
        || keys("bob", &["pub", "alice/ops", "ops/x", "hi", "--device", "phone"]).output();
    let refused = bob_pub().unwrap();
    assert!(!refused.status.success(), "{refused:?}");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("alice's key for device default changed"), "{said}");
    let trusted = keys("bob", &["trust", "alice/ops", "--device", "phone"]).output().unwrap();
    assert!(trusted.status.success(), "{trusted:?}");
    assert_eq!(
        String::from_utf8_lossy(&trusted.stdout).trim(),
        "1 changed key(s) of alice trusted"
    );
    let sent = bob_pub().unwrap();
    assert!(sent.status.success(), "{sent:?}");

    // Carol retires her phone: the directory no longer lists it.
    let revoke = |key: &str| {
        Command::new(BIN)
            .args(["keys", "revoke", "phone", "--as", "carol", "--server", &server.addr])
            .args(["--api-key", key])
            .output()
            .unwrap()
    };
    assert!(!revoke("eve-key").status.success(), "eve may not revoke carol's device");
    let revoked = revoke("carol-key");
    assert!(revoked.status.success(), "{revoked:?}");
    let shown = Command::new(BIN)
        .args(["keys", "show", "carol", "--server", &server.addr, "--api-key", "bob-key"])
        .output()
        .unwrap();
    assert!(shown.status.success() && shown.stdout.is_empty(), "{shown:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
