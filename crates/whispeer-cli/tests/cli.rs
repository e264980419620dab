//! The `whispeer` binary, run as a user runs it.

use std::process::{Command, Output};

fn whispeer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_whispeer")).args(args).output().expect("run whispeer")
}

#[test]
fn match_prints_each_topic_and_exits_by_outcome() {
    let out =
        whispeer(&["match", "sensor/+/temperature", "sensor/k1/temperature", "sensor/k1/humidity"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "match\tsensor/k1/temperature\nno match\tsensor/k1/humidity\n"
    );
    let out = whispeer(&["match", "chat/#", "chat", "chat/a/b"]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn invalid_filter_is_a_usage_error_with_a_reason() {
    let out = whispeer(&["match", "a/#/b", "a"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("'#' must be the last segment"), "{stderr}");
}

#[test]
fn help_explains_the_commands() {
    let out = whispeer(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8(out.stdout).unwrap().contains("match"));
}

#[test]
fn keygen_prints_a_loadable_key_and_a_new_one_each_time() {
    let first = whispeer(&["keygen", "--id", "7"]);
    assert!(first.status.success());
    let text = String::from_utf8(first.stdout).unwrap();
    let keyring = whispeer::Keyring::parse(&text).unwrap();
    assert_eq!(keyring.current(), Some(whispeer::KeyId(7)));
    let second = String::from_utf8(whispeer(&["keygen", "--id", "7"]).stdout).unwrap();
    assert_ne!(text, second);
}
