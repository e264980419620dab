//! `whispeer chat --as alice`: a terminal chat on the server's chat listener, through the SDK's
//! `Chat`, sealed end to end by default (`--plain` to talk with clients that do not seal). On a
//! terminal, lines are edited with rustyline and incoming messages print above the prompt;
//! otherwise each line of standard input is one command (for scripts), and the command ends
//! with the input.

use std::process::ExitCode;

use clap::Args;
use futures_util::StreamExt;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use whispeer_client::{Chat, ChatEvent, ChatMessage, ChatOptions, Conversation};

mod sealing;

/// `whispeer chat`.
#[derive(Debug, Args)]
pub(crate) struct ChatArgs {
    /// Who to be (on a server without keys; with keys, the key's principal, and this must match).
    #[arg(long = "as", value_name = "USER")]
    user: Option<String>,
    /// The chat listener's URL.
    #[arg(long, env = "WHISPEER_CHAT_SERVER", default_value = "ws://127.0.0.1:3030/ws")]
    server: String,
    /// This device's name: each device keeps its own place in the inbox.
    #[arg(long, default_value = "cli")]
    device: String,
    /// API key or JWT, if the server requires one.
    #[arg(long, env = "WHISPEER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// This device's identity file (made on first use, readable by its owner only; the keys
    /// seen and group keys are kept beside it). Default: `<user>.<device>.identity` in the
    /// keys folder.
    #[arg(long, value_name = "FILE")]
    identity: Option<std::path::PathBuf>,
    /// The keys folder [default: $XDG_CONFIG_HOME/whispeer/chat, else ~/.config/whispeer/chat].
    #[arg(long, env = "WHISPEER_CHAT_KEYS", value_name = "DIR")]
    keys_dir: Option<std::path::PathBuf>,
    /// Do not seal: messages go as plain JSON, which the server and its store can read (to
    /// talk with clients that do not seal, such as websocat).
    #[arg(long, conflicts_with = "identity")]
    plain: bool,
}

const HELP: &str = "\
commands:
  /msg bob hi         a direct message (also sets where plain lines go)
  /msg #team hi       to a group
  /to bob | /to #team where plain lines go
  /create team [open] /join team  /invite team bob  /leave team  /remove team bob
  /members team       /groups     /who     /history bob|#team [count]
  /sub news           /say news hello (topic broadcast)
  keys:               messages are sealed end to end unless started with --plain
  /fingerprint [user] the fingerprints to compare with them
  /trust bob          accept bob's changed key (after comparing)
  /rotate team        a new group key for its members' devices now
  /help  /quit";

/// Where a name like `bob` or `#team` points.
fn conversation(name: &str) -> Conversation {
    match name.strip_prefix('#') {
        Some(group) => Conversation::Group(group.to_string()),
        None => Conversation::User(name.to_string()),
    }
}

fn clock(time_ms: u64) -> String {
    let seconds = (time_ms / 1000) % 86_400;
    format!("{:02}:{:02}:{:02}", seconds / 3600, (seconds / 60) % 60, seconds % 60)
}

fn text_of(message: &ChatMessage) -> String {
    if let Some(why) = &message.unreadable {
        return format!("(sealed; does not open here: {why})");
    }
    message.msg.as_str().map_or_else(|| message.msg.to_string(), str::to_string)
}

/// One line for a message; in a sealing session, one that came unsealed says so.
fn show(message: &ChatMessage, sealing: bool) -> String {
    let place = match (&message.to, &message.group, &message.topic) {
        (_, Some(group), _) => format!("#{group} "),
        (_, _, Some(topic)) => format!("+{topic} "),
        (Some(to), _, _) => format!("→{to} "),
        _ => String::new(),
    };
    let plain = if sealing && !message.sealed { "[plain] " } else { "" };
    format!("[{}] {place}{}: {plain}{}", clock(message.time), message.from, text_of(message))
}

/// One line for an event, if it is worth one.
fn describe(event: &ChatEvent, sealing: bool) -> Option<String> {
    if let Some(line) = sealing::describe(event) {
        return Some(line);
    }
    Some(match event {
        ChatEvent::Message(message) => show(message, sealing),
        ChatEvent::Group { group, event, user, by } => {
            format!("* #{group}: {user} {event} (by {by})")
        }
        ChatEvent::Presence { user, online: true, .. } => format!("* {user} is online"),
        ChatEvent::Presence { user, .. } => format!("* {user} went offline"),
        ChatEvent::Typing { .. } => return None,
        ChatEvent::Missed(count) => {
            format!("! {count} messages were dropped while this device was away")
        }
        ChatEvent::Other(value) => format!("! {value}"),
        _ => return None,
    })
}

/// Carries out one input line; the lines to print. `None` ends the session.
async fn command(
    chat: &Chat,
    current: &mut Option<Conversation>,
    line: &str,
) -> Option<Vec<String>> {
    let line = line.trim();
    if line.is_empty() {
        return Some(Vec::new());
    }
    let mut words = line.splitn(3, ' ');
    let head = words.next().unwrap_or_default();
    let (first, rest) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    let done = |result: Result<(), whispeer_client::ChatError>| match result {
        Ok(()) => Vec::new(),
        Err(err) => vec![format!("! {err}")],
    };
    let send = |to: Conversation, text: String| async move {
        let sent = match &to {
            Conversation::User(user) => chat.send_to(user, text).await.map(drop),
            Conversation::Group(group) => chat.send_group(group, text).await.map(drop),
        };
        sent.err().map_or_else(Vec::new, |err| sealing::refused(&err))
    };
    let sealing = chat.fingerprint().is_some();
    Some(match head {
        "/quit" | "/exit" => return None,
        "/fingerprint" | "/trust" | "/rotate" if !sealing => {
            vec!["! this session does not seal (--plain)".to_string()]
        }
        "/fingerprint" => {
            let whose = if first.is_empty() { chat.user() } else { first };
            sealing::fingerprints(chat, whose).await
        }
        "/trust" if !first.is_empty() => sealing::trust(chat, first),
        "/rotate" if !first.is_empty() => {
            sealing::rotate(chat, first.trim_start_matches('#')).await
        }
        "/help" => HELP.lines().map(str::to_string).collect(),
        "/msg" if !first.is_empty() && !rest.is_empty() => {
            *current = Some(conversation(first));
            send(conversation(first), rest.to_string()).await
        }
        "/to" if !first.is_empty() => {
            *current = Some(conversation(first));
            Vec::new()
        }
        "/create" if !first.is_empty() => done(chat.create_group(first, rest == "open").await),
        "/join" if !first.is_empty() => done(chat.join(first).await),
        "/leave" if !first.is_empty() => done(chat.leave(first).await),
        "/invite" if !rest.is_empty() => done(chat.invite(first, rest).await),
        "/remove" if !rest.is_empty() => done(chat.remove(first, rest).await),
        "/sub" if !first.is_empty() => done(chat.subscribe(first).await),
        "/say" if !rest.is_empty() => done(chat.broadcast(first, rest).await),
        "/members" if !first.is_empty() => match chat.members(first).await {
            Ok(members) => members
                .iter()
                .map(|m| {
                    let state = if m.online { "online" } else { "offline" };
                    format!("  {} ({}, {state})", m.user, m.role.as_deref().unwrap_or("member"))
                })
                .collect(),
            Err(err) => vec![format!("! {err}")],
        },
        "/groups" => match chat.request(serde_json::json!({"type": "groups"})).await {
            Ok(reply) => reply["groups"]
                .as_array()
                .map(|groups| {
                    groups
                        .iter()
                        .map(|g| {
                            format!(
                                "  #{} ({})",
                                g["group"].as_str().unwrap_or(""),
                                g["role"].as_str().unwrap_or("")
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            Err(err) => vec![format!("! {err}")],
        },
        "/who" => match chat.who().await {
            Ok(users) => users
                .iter()
                .map(|p| match (p.online, p.last_seen) {
                    (true, _) => format!("  {} online ({})", p.user, p.devices.join(", ")),
                    (false, Some(seen)) => {
                        format!("  {} offline, last seen {}", p.user, clock(seen))
                    }
                    (false, None) => format!("  {} offline", p.user),
                })
                .collect(),
            Err(err) => vec![format!("! {err}")],
        },
        "/history" if !first.is_empty() => {
            let count = rest.parse().unwrap_or(20);
            match chat.history(&conversation(first), None, count).await {
                Ok(messages) => messages.iter().map(|m| show(m, sealing)).collect(),
                Err(err) => vec![format!("! {err}")],
            }
        }
        _ if head.starts_with('/') => {
            vec![format!("! unknown or incomplete command {head:?}; /help lists them")]
        }
        _ => match current.clone() {
            Some(to) => send(to, line.to_string()).await,
            None => vec!["! say whom to: /msg bob hi, or /to bob".to_string()],
        },
    })
}

pub(crate) fn run(args: ChatArgs) -> ExitCode {
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(runtime) => runtime,
            Err(err) => {
                eprintln!("whispeer: cannot start the runtime: {err}");
                return ExitCode::FAILURE;
            }
        };
    let code = runtime.block_on(session(args));
    // Not waiting for the thread reading a piped standard input: it ends only at its end, and
    // `/quit` comes before that.
    runtime.shutdown_background();
    code
}

async fn session(args: ChatArgs) -> ExitCode {
    let mut options = ChatOptions::new(&args.server).device(&args.device);
    if let Some(user) = &args.user {
        options = options.user(user);
    }
    if let Some(key) = &args.api_key {
        options = options.token(key);
    }
    let dir = args.keys_dir.clone().or_else(sealing::default_dir);
    let options = sealing::options(options, args.plain, args.identity.as_ref(), dir.as_ref());
    let (chat, mut events) = match Chat::connect(options).await {
        Ok(pair) => pair,
        Err(err) => {
            eprintln!("whispeer: chat: {err}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("whispeer: chat as {} on {} (/help for commands)", chat.user(), chat.device());
    let sealing = match chat.fingerprint() {
        Some(fingerprint) => {
            eprintln!("whispeer: identity {fingerprint}; messages are sealed end to end");
            true
        }
        None => {
            eprintln!("whispeer: plain: messages are not sealed (the server can read them)");
            false
        }
    };
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let (lines, mut input) = mpsc::channel::<String>(16);
    let mut printer: Box<dyn FnMut(String) + Send> = if terminal {
        match editor(lines) {
            Ok(printer) => printer,
            Err(err) => {
                eprintln!("whispeer: chat: no line editor: {err}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        tokio::spawn(async move {
            let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = stdin.next_line().await {
                if lines.send(line).await.is_err() {
                    break;
                }
            }
        });
        Box::new(|line: String| println!("{line}"))
    };
    let mut current = None;
    loop {
        tokio::select! {
            line = input.recv() => {
                let Some(line) = line else { break };
                match command(&chat, &mut current, &line).await {
                    Some(out) => out.into_iter().for_each(&mut printer),
                    None => break,
                }
            }
            event = events.next() => {
                let Some(event) = event else {
                    eprintln!("whispeer: chat: the connection closed");
                    return ExitCode::FAILURE;
                };
                if let Some(line) = describe(&event, sealing) {
                    printer(line);
                }
            }
        }
    }
    // What was shown is acknowledged before the process ends: the next session shows it no
    // more.
    drop(chat);
    events.close().await;
    ExitCode::SUCCESS
}

/// Starts rustyline on a thread of its own, sending each line; gives a printer that writes
/// above the prompt.
fn editor(lines: mpsc::Sender<String>) -> rustyline::Result<Box<dyn FnMut(String) + Send>> {
    use rustyline::ExternalPrinter as _;
    let mut editor = rustyline::DefaultEditor::new()?;
    let mut external = editor.create_external_printer()?;
    std::thread::spawn(move || {
        while let Ok(line) = editor.readline("> ") {
            let _ = editor.add_history_entry(line.as_str());
            if lines.blocking_send(line).is_err() {
                break;
            }
        }
    });
    Ok(Box::new(move |line: String| {
        let _ = external.print(line);
    }))
}
