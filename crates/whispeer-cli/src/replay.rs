//! `whispeer replay`: prints (or re-publishes) a topic's retained history from a start position.
//!
//! Two ways to read it:
//! - through the protocol (the default): a QoS 1 subscription with a credit window, so a long
//!   history is paced by this client's acknowledgements; it ends once nothing arrives for
//!   `--idle-ms`;
//! - through the server's admin API (`--admin`): pages of sealed envelopes, opened here with
//!   the content key; it ends exactly where history ended when it was read, and reaches back
//!   into a durable topic's store beyond what the server holds in memory.
//!
//! With `--group` (and `--admin`) it replays nothing itself: it moves that durable
//! subscription to `--from`, and the group delivers again from there once a member joins.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use whispeer_client::engines::{Encryption, Engines};
use whispeer_client::proto::{Envelope, Limits};
use whispeer_client::{Client, PublishOptions, Qos, StartAt, SubscribeOptions};

use crate::ConnectArgs;
use crate::pubsub::{block_on, connect, keyring, parse_start};

/// `whispeer replay`.
#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// Topic (or filter) whose history to replay; offsets need an exact topic.
    topic: String,
    /// Where to start: `earliest`, `latest`, an offset, `time:<ms>` or an RFC 3339 time.
    #[arg(long, value_name = "WHERE", value_parser = parse_start, default_value = "earliest")]
    from: StartAt,
    /// Publish each message again to this topic (QoS 1) instead of printing it.
    #[arg(long, value_name = "TOPIC")]
    republish: Option<String>,
    /// Print each message's offset and topic before it.
    #[arg(short, long)]
    verbose: bool,
    /// History is caught up once nothing arrives for this long (without --admin).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    idle_ms: u64,
    /// Read history through the server's admin API at this address (exact topics).
    #[arg(long, value_name = "URL")]
    admin: Option<String>,
    /// The admin token (`admin_token` in the server's configuration).
    #[arg(long, env = "WHISPEER_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Move this durable subscription (a QoS 1 group on <TOPIC> as its filter) to --from
    /// instead; needs --admin.
    #[arg(long, value_name = "NAME", requires = "admin")]
    group: Option<String>,
    #[command(flatten)]
    connect: ConnectArgs,
}

pub(crate) fn run(args: ReplayArgs) -> ExitCode {
    match (&args.admin, &args.group) {
        (Some(admin), Some(group)) => block_on(rewind(&args, admin, group)),
        (Some(admin), None) => block_on(through_admin(&args, admin)),
        (None, _) => block_on(subscribed(args)),
    }
}

/// Prints a message, or publishes it again; `false` once standard output is closed.
async fn emit(
    args: &ReplayArgs,
    client: Option<&Client>,
    offset: u64,
    topic: &str,
    payload: Bytes,
) -> anyhow::Result<bool> {
    if let (Some(target), Some(client)) = (&args.republish, client) {
        let acked = PublishOptions::new().qos(Qos::AtLeastOnce);
        client.publish_bytes_with(target, payload, &acked).await?;
        return Ok(true);
    }
    let text = String::from_utf8_lossy(&payload);
    let mut out = std::io::stdout().lock();
    let written = if args.verbose {
        writeln!(out, "{offset} {topic} {text}")
    } else {
        writeln!(out, "{text}")
    };
    Ok(written.and_then(|()| out.flush()).is_ok())
}

fn counter() -> anyhow::Result<ProgressBar> {
    // A counter on standard error (drawn only on a terminal).
    let style = ProgressStyle::with_template("{spinner} {pos} messages ({per_sec})")?;
    Ok(ProgressBar::new_spinner().with_style(style))
}

async fn subscribed(args: ReplayArgs) -> anyhow::Result<()> {
    let client = connect(&args.connect).await?;
    let options =
        SubscribeOptions::new(&args.topic).start(args.from).qos(Qos::AtLeastOnce).prefetch(512);
    let mut history = client.messages(options).await.context("subscribing")?;
    let idle = Duration::from_millis(args.idle_ms);
    let mut count = 0u64;
    let progress = counter()?;
    while let Ok(next) = tokio::time::timeout(idle, history.recv_delivery()).await {
        let Some((delivery, _)) = next else { anyhow::bail!("connection closed") };
        let payload = match delivery.plaintext() {
            Ok(payload) => payload,
            Err(err) if args.republish.is_none() => {
                eprintln!("whispeer: message {} skipped: {err}", delivery.id());
                delivery.nack(false);
                continue;
            }
            Err(err) => return Err(err).context("opening a message"),
        };
        let offset = delivery.offset().unwrap_or(0);
        let topic = delivery.topic().to_string();
        if !emit(&args, Some(&client), offset, &topic, payload).await? {
            break;
        }
        delivery.ack();
        count += 1;
        progress.inc(1);
    }
    progress.finish_and_clear();
    client.flush().await.context("flushing acks to the server")?;
    eprintln!("whispeer: replayed {count} messages");
    Ok(())
}

/// The admin API's form of a start position.
fn start_query(start: StartAt) -> String {
    match start {
        StartAt::Offset(offset) => offset.to_string(),
        StartAt::Time(ms) => format!("time:{ms}"),
        StartAt::Latest => "latest".into(),
        _ => "earliest".into(),
    }
}

/// Calls the admin API off the async threads; a refusal carries its status and the server's
/// reason.
async fn call(url: String, token: String, body: Option<Value>) -> anyhow::Result<Value> {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent =
            ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let auth = format!("Bearer {token}");
        let response = match body {
            Some(body) => agent.post(&url).header("Authorization", &auth).send_json(body),
            None => agent.get(&url).header("Authorization", &auth).call(),
        };
        let mut response = response.with_context(|| url.clone())?;
        let status = response.status();
        if !status.is_success() {
            let why = response.body_mut().read_to_string().unwrap_or_default();
            anyhow::bail!("{url}: {status}: {}", why.trim());
        }
        Ok(response.body_mut().read_json::<Value>()?)
    })
    .await?
}

async fn through_admin(args: &ReplayArgs, admin: &str) -> anyhow::Result<()> {
    let token = args.token.clone().context("--admin needs --token (or WHISPEER_ADMIN_TOKEN)")?;
    let engines = match keyring(&args.connect)? {
        Some(keyring) => Engines::new().with_encryption(Encryption::with_keyring(keyring)),
        None => Engines::new(),
    };
    let client = match &args.republish {
        Some(_) => Some(connect(&args.connect).await?),
        None => None,
    };
    let limits = Limits::default();
    let base = admin.trim_end_matches('/');
    let topic = url_encode(&args.topic);
    let mut from = start_query(args.from);
    let (mut count, progress) = (0u64, counter()?);
    'pages: loop {
        let url = format!("{base}/api/history?topic={topic}&from={from}&max=1000");
        let page = call(url, token.clone(), None).await?;
        let messages = page["messages"].as_array().cloned().unwrap_or_default();
        for message in messages {
            let offset = message["offset"].as_u64().unwrap_or(0);
            let encoded = BASE64
                .decode(message["envelope"].as_str().unwrap_or_default())
                .context("an envelope that is not base64")?;
            let envelope = Envelope::decode(Bytes::from(encoded), &limits)
                .context("an envelope that does not decode")?;
            let payload = match engines.open(&envelope) {
                Ok(payload) => payload,
                Err(err) if args.republish.is_none() => {
                    eprintln!("whispeer: message {} skipped: {err}", envelope.id);
                    continue;
                }
                Err(err) => return Err(err).context("opening a message"),
            };
            if !emit(args, client.as_ref(), offset, envelope.topic.as_str(), payload).await? {
                break 'pages;
            }
            count += 1;
            progress.inc(1);
        }
        match page["next_from"].as_u64() {
            Some(next) => from = next.to_string(),
            None => break,
        }
    }
    progress.finish_and_clear();
    if let Some(client) = client {
        client.flush().await?;
    }
    eprintln!("whispeer: replayed {count} messages");
    Ok(())
}

async fn rewind(args: &ReplayArgs, admin: &str, group: &str) -> anyhow::Result<()> {
    let token = args.token.clone().context("--admin needs --token (or WHISPEER_ADMIN_TOKEN)")?;
    let url = format!("{}/api/durable/rewind", admin.trim_end_matches('/'));
    let body = json!({"filter": args.topic, "group": group, "from": start_query(args.from)});
    let moved = call(url, token, Some(body)).await?;
    for topic in moved["topics"].as_array().cloned().unwrap_or_default() {
        println!("{} from {}", topic["topic"].as_str().unwrap_or("?"), topic["from"]);
    }
    Ok(())
}

/// Percent-encodes a topic for a query string.
fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~/".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}
