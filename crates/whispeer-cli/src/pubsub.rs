//! `whispeer pub` and `whispeer sub`: the client SDK from the command line.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use whispeer_client::engines::{Compression, Encryption, Keyring};

use whispeer_client::{Client, ClientOptions, PublishOptions, Qos, StartAt, SubscribeOptions};

use crate::ConnectArgs;

/// `whispeer pub`.
#[derive(Debug, Args)]
pub(crate) struct PubArgs {
    /// Topic to publish to.
    topic: String,
    /// The message; without it, each line of standard input is one message.
    message: Option<String>,
    /// Wait for the server to acknowledge each message (QoS 1).
    #[arg(long)]
    ack: bool,
    /// Never deliver the message once this many milliseconds have passed.
    #[arg(long, value_name = "MS")]
    ttl_ms: Option<u64>,
    /// Idempotency key: a repeat with the same key within the server's window is dropped.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// Retained: the server keeps it as the topic's last message and gives it first to every
    /// new subscriber (an empty message clears it).
    #[arg(long)]
    retain: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// `whispeer sub`.
#[derive(Debug, Args)]
pub(crate) struct SubArgs {
    /// Filter to subscribe to (`+` one segment, `#` the rest).
    filter: String,
    /// Print each message's topic before it.
    #[arg(short, long)]
    verbose: bool,
    /// Exit after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// At least once: acknowledge each message after printing it (unacknowledged ones come
    /// again).
    #[arg(long)]
    ack: bool,
    /// Join this queue group: its members share the messages (with `--ack`, what one leaves
    /// unacknowledged goes to another, or back to it when it returns).
    #[arg(long, value_name = "NAME")]
    group: Option<String>,
    /// Start in the server's retained history: `earliest`, an offset (`42`, exact topics
    /// only), or a time (`2026-11-23T09:00:00Z`, or milliseconds since the epoch as `time:<ms>`).
    #[arg(long, value_name = "WHERE", value_parser = parse_start)]
    from: Option<StartAt>,
    #[command(flatten)]
    connect: ConnectArgs,
}

pub(crate) use whispeer::server::parse_start;

pub(crate) fn block_on(future: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    run_on(tokio::runtime::Builder::new_current_thread(), future)
}

/// Like `block_on`, on a multi-threaded runtime (for the benchmark's many connections).
pub(crate) fn block_on_multi(future: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    run_on(tokio::runtime::Builder::new_multi_thread(), future)
}

fn run_on(
    mut builder: tokio::runtime::Builder,
    future: impl Future<Output = anyhow::Result<()>>,
) -> ExitCode {
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("whispeer: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(future) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("whispeer: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The content key: `--key-file`, else `WHISPEER_KEY`, else none.
pub(crate) fn keyring(args: &ConnectArgs) -> anyhow::Result<Option<Keyring>> {
    Ok(match &args.key_file {
        Some(path) => {
            Some(Keyring::from_file(path).with_context(|| format!("key file {}", path.display()))?)
        }
        None if std::env::var_os("WHISPEER_KEY").is_some() => {
            Some(Keyring::from_env("WHISPEER_KEY").context("WHISPEER_KEY")?)
        }
        None => None,
    })
}

pub(crate) async fn connect(args: &ConnectArgs) -> anyhow::Result<Client> {
    let mut servers = args.server.split(',').map(str::trim).filter(|s| !s.is_empty());
    let first = servers.next().context("--server names no address")?;
    let mut options =
        ClientOptions::new(first).failover(servers).shared_offsets(args.shared_offsets);
    if let Some(ca) = &args.ca_file {
        let read = |path: &std::path::PathBuf| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        let ca = read(ca)?;
        let client = match (&args.cert, &args.key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        };
        let client = client.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice()));
        options = options.tls(whispeer_client::tls_config(&ca, client)?);
    }
    if let Some(key) = &args.api_key {
        options = options.api_key(key.clone());
    }
    if let Some(keyring) = keyring(args)? {
        options = options.encryption(Encryption::with_keyring(keyring));
    }
    if args.compress {
        options = options.compression(Compression::new());
    }
    Ok(Client::connect_with(options).await?)
}

pub(crate) fn run_pub(args: PubArgs) -> ExitCode {
    block_on(async move {
        let client = connect(&args.connect).await?;
        let mut options = PublishOptions::new();
        if args.ack {
            options = options.qos(Qos::AtLeastOnce);
        }
        if let Some(ttl) = args.ttl_ms {
            options = options.ttl(Duration::from_millis(ttl));
        }
        if let Some(key) = &args.idempotency_key {
            options = options.idempotency_key(key.clone());
        }
        if args.retain {
            options = options.retain();
        }
        let publish = async |payload: String| -> anyhow::Result<()> {
            client.publish_bytes_with(&args.topic, payload.into_bytes(), &options).await?;
            Ok(())
        };
        match &args.message {
            Some(message) => publish(message.clone()).await?,
            None => {
                let mut lines = BufReader::new(tokio::io::stdin()).lines();
                while let Some(line) = lines.next_line().await.context("reading standard input")? {
                    publish(line).await?;
                }
            }
        }
        client.flush().await.context("flushing to the server")?;
        Ok(())
    })
}

pub(crate) fn run_sub(args: SubArgs) -> ExitCode {
    block_on(async move {
        let client = connect(&args.connect).await?;
        let mut options = SubscribeOptions::new(&args.filter);
        if args.ack {
            options = options.qos(Qos::AtLeastOnce);
        }
        if let Some(group) = &args.group {
            options = options.group(group);
        }
        if let Some(start) = args.from {
            options = options.start(start);
        }
        let mut messages = client.messages(options).await.context("subscribing")?;
        eprintln!("whispeer: subscribed to {}", args.filter);
        let mut seen = 0u64;
        while args.count.is_none_or(|count| seen < count) {
            let received = tokio::select! {
                received = messages.recv_delivery() => received.map(|(delivery, _)| delivery),
                _ = tokio::signal::ctrl_c() => break,
            };
            let Some(delivery) = received else { anyhow::bail!("connection closed") };
            let payload = match delivery.plaintext() {
                Ok(payload) => payload,
                Err(err) => {
                    eprintln!(
                        "whispeer: message {} on {} skipped: {err}",
                        delivery.id(),
                        delivery.topic()
                    );
                    // It will not open next time either (under --ack: to the dead letters).
                    delivery.nack(false);
                    continue;
                }
            };
            let text = String::from_utf8_lossy(&payload);
            let mut out = std::io::stdout().lock();
            let written = if args.verbose {
                writeln!(out, "{} {text}", delivery.topic())
            } else {
                writeln!(out, "{text}")
            };
            // A closed pipe (`whispeer sub … | head`) ends the command quietly.
            if written.and_then(|()| out.flush()).is_err() {
                break;
            }
            delivery.ack();
            seen += 1;
        }
        // Acks still queued must reach the server before the process ends.
        client.flush().await.context("flushing acks to the server")?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_positions_parse_from_words_numbers_and_times() {
        assert_eq!(parse_start("earliest"), Ok(StartAt::Earliest));
        assert_eq!(parse_start("42"), Ok(StartAt::Offset(42)));
        assert_eq!(parse_start("time:1700000000000"), Ok(StartAt::Time(1_700_000_000_000)));
        assert_eq!(parse_start("2023-11-14T22:13:20Z"), Ok(StartAt::Time(1_700_000_000_000)));
        assert!(parse_start("yesterday").is_err());
    }
}
