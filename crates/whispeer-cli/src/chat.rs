//! `whispeer chat --as alice`: a terminal chat on the server's chat listener, through the SDK's
//! `Chat`. On a terminal, lines are edited with rustyline and incoming messages print above the
//! prompt; otherwise each line of standard input is one command (for scripts), and the command
//! ends with the input.

use std::process::ExitCode;

use clap::Args;
use futures_util::StreamExt;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use whispeer_client::{Chat, ChatEvent, ChatMessage, ChatOptions, Conversation};

mod sealing;

use sealing::Sealing;

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
    /// This device's identity file (made on first use): direct messages are then sealed end to
    /// end for the recipient's devices, and sealed ones opened as they arrive.
    #[arg(long, value_name = "FILE")]
    identity: Option<std::path::PathBuf>,
}

const HELP: &str = "\
commands:
  /msg bob hi         a direct message (also sets where plain lines go)
  /msg #team hi       to a group
  /to bob | /to #team where plain lines go
  /create team [open] /join team  /invite team bob  /leave team  /remove team bob
  /members team       /groups     /who     /history bob|#team [count]
  /sub news           /say news hello (topic broadcast)
  with --identity:    messages are sealed; /fingerprint [user]  /trust bob
                      /rotate team (a new group key for its members' devices)
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
    message.msg.as_str().map_or_else(|| message.msg.to_string(), str::to_string)
}

/// The user a line goes to sealed: `/msg bob text`, or a plain line while talking to a user.
fn direct_to(
    head: &str,
    first: &str,
    rest: &str,
    current: &Option<Conversation>,
) -> Option<String> {
    match head {
        "/msg" if !rest.is_empty() && !first.starts_with('#') => Some(first.to_string()),
        _ if head.starts_with('/') => None,
        _ => match current {
            Some(Conversation::User(user)) => Some(user.clone()),
            _ => None,
        },
    }
}

/// The group a line goes to sealed: `/msg #team text`, or a plain line while in a group.
fn group_to(head: &str, first: &str, rest: &str, current: &Option<Conversation>) -> Option<String> {
    match head {
        "/msg" if !rest.is_empty() => first.strip_prefix('#').map(str::to_string),
        _ if head.starts_with('/') => None,
        _ => match current {
            Some(Conversation::Group(group)) => Some(group.clone()),
            _ => None,
        },
    }
}

/// One line for a message.
fn show(message: &ChatMessage) -> String {
    let place = match (&message.to, &message.group, &message.topic) {
        (_, Some(group), _) => format!("#{group} "),
        (_, _, Some(topic)) => format!("+{topic} "),
        (Some(to), _, _) => format!("→{to} "),
        _ => String::new(),
    };
    format!("[{}] {place}{}: {}", clock(message.time), message.from, text_of(message))
}

/// One line for an event, if it is worth one.
fn describe(event: &ChatEvent) -> Option<String> {
    Some(match event {
        ChatEvent::Message(message) => show(message),
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
    sealing: &mut Option<Sealing>,
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
    if let (Some(keys), Some(group)) = (sealing.as_mut(), group_to(head, first, rest, current)) {
        // With an identity, group messages go sealed with the group's key.
        let text = if head == "/msg" { rest.to_string() } else { line.to_string() };
        if head == "/msg" {
            *current = Some(Conversation::Group(group.clone()));
        }
        return Some(keys.send_group(chat, &group, &text).await);
    }
    if let (Some(keys), Some(to)) = (sealing.as_mut(), direct_to(head, first, rest, current)) {
        // With an identity, direct messages go sealed.
        let text = if head == "/msg" { rest.to_string() } else { line.to_string() };
        if head == "/msg" {
            *current = Some(Conversation::User(to.clone()));
        }
        return Some(keys.send(chat, &to, &text).await);
    }
    let send = |to: Conversation, text: String| async move {
        match &to {
            Conversation::User(user) => chat.send_to(user, text).await.map(drop),
            Conversation::Group(group) => chat.send_group(group, text).await.map(drop),
        }
    };
    Some(match head {
        "/quit" | "/exit" => return None,
        "/fingerprint" | "/trust" | "/rotate" if sealing.is_none() => {
            vec!["! start with --identity FILE for end-to-end keys".to_string()]
        }
        "/fingerprint" => {
            let whose = if first.is_empty() { chat.user() } else { first };
            sealing.as_mut()?.fingerprints(chat, whose).await
        }
        "/trust" if !first.is_empty() => sealing.as_mut()?.trust(first),
        "/rotate" if !first.is_empty() => {
            sealing.as_mut()?.rotate(chat, first.trim_start_matches('#')).await
        }
        "/help" => HELP.lines().map(str::to_string).collect(),
        "/msg" if !first.is_empty() && !rest.is_empty() => {
            *current = Some(conversation(first));
            done(send(conversation(first), rest.to_string()).await)
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
                Ok(messages) => messages.iter().map(show).collect(),
                Err(err) => vec![format!("! {err}")],
            }
        }
        _ if head.starts_with('/') => {
            vec![format!("! unknown or incomplete command {head:?}; /help lists them")]
        }
        _ => match current.clone() {
            Some(to) => done(send(to, line.to_string()).await),
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
    runtime.block_on(session(args))
}

async fn session(args: ChatArgs) -> ExitCode {
    let mut options = ChatOptions::new(&args.server).device(&args.device);
    if let Some(user) = &args.user {
        options = options.user(user);
    }
    if let Some(key) = &args.api_key {
        options = options.token(key);
    }
    let (chat, mut events) = match Chat::connect(options).await {
        Ok(pair) => pair,
        Err(err) => {
            eprintln!("whispeer: chat: {err}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("whispeer: chat as {} on {} (/help for commands)", chat.user(), chat.device());
    let mut sealing = match &args.identity {
        Some(path) => match Sealing::load(path) {
            Ok((sealing, made)) => match sealing.publish(&chat).await {
                Ok(fingerprint) => {
                    let new = if made { " (new)" } else { "" };
                    eprintln!("whispeer: identity{new} {fingerprint}; direct messages are sealed");
                    Some(sealing)
                }
                Err(err) => {
                    eprintln!("whispeer: chat: publishing the identity: {err}");
                    return ExitCode::FAILURE;
                }
            },
            Err(err) => {
                eprintln!("whispeer: chat: {err:#}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
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
                match command(&chat, &mut current, &mut sealing, &line).await {
                    Some(out) => out.into_iter().for_each(&mut printer),
                    None => break,
                }
            }
            event = events.next() => {
                let Some(event) = event else {
                    eprintln!("whispeer: chat: the connection closed");
                    return ExitCode::FAILURE;
                };
                let event = match (event, sealing.as_mut()) {
                    (ChatEvent::Message(mut message), Some(keys))
                        if message.msg.get("group_key").is_none() =>
                    {
                        if let Some((text, lines)) = keys.open_message(&chat, &message).await {
                            lines.into_iter().for_each(&mut printer);
                            message.msg = format!("[sealed] {text}").into();
                        }
                        ChatEvent::Message(message)
                    }
                    (ChatEvent::Message(message), Some(keys))
                        if message.msg.get("group_key").is_some() =>
                    {
                        keys.learn(&chat, &message).await.into_iter().for_each(&mut printer);
                        continue;
                    }
                    (event, _) => event,
                };
                if let Some(line) = describe(&event) {
                    printer(line);
                }
            }
        }
    }
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
