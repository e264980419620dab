//! `whispeer replay`: prints (or re-publishes) a topic's retained history from a start position,
//! then exits once the history is caught up (nothing more arrives for `--idle-ms`).
//!
//! It subscribes with QoS 1 and a credit window, so a long history is paced by this client's
//! acknowledgements instead of overrunning it, and acknowledges each message once it has been
//! printed or re-published.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use whispeer_client::{PublishOptions, Qos, StartAt, SubscribeOptions};

use crate::ConnectArgs;
use crate::pubsub::{block_on, connect, parse_start};

/// `whispeer replay`.
#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// Topic (or filter) whose history to replay; offsets need an exact topic.
    topic: String,
    /// Where to start: `earliest`, an offset, `time:<ms>` or an RFC 3339 time.
    #[arg(long, value_name = "WHERE", value_parser = parse_start, default_value = "earliest")]
    from: StartAt,
    /// Publish each message again to this topic (QoS 1) instead of printing it.
    #[arg(long, value_name = "TOPIC")]
    republish: Option<String>,
    /// Print each message's offset and topic before it.
    #[arg(short, long)]
    verbose: bool,
    /// History is caught up once nothing arrives for this long.
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    idle_ms: u64,
    #[command(flatten)]
    connect: ConnectArgs,
}

pub(crate) fn run(args: ReplayArgs) -> ExitCode {
    block_on(async move {
        let client = connect(&args.connect).await?;
        let options =
            SubscribeOptions::new(&args.topic).start(args.from).qos(Qos::AtLeastOnce).prefetch(512);
        let mut history = client.messages(options).await.context("subscribing")?;
        let idle = Duration::from_millis(args.idle_ms);
        let acked = PublishOptions::new().qos(Qos::AtLeastOnce);
        let mut count = 0u64;
        // A counter on standard error (drawn only on a terminal).
        let progress = ProgressBar::new_spinner()
            .with_style(ProgressStyle::with_template("{spinner} {pos} messages ({per_sec})")?);
        while let Ok(next) = tokio::time::timeout(idle, history.recv_delivery()).await {
            let Some((delivery, _)) = next else { anyhow::bail!("connection closed") };
            match &args.republish {
                Some(target) => {
                    let payload = delivery.plaintext().context("opening a message")?;
                    client.publish_bytes_with(target, payload, &acked).await?;
                }
                None => {
                    let payload = match delivery.plaintext() {
                        Ok(payload) => payload,
                        Err(err) => {
                            eprintln!("whispeer: message {} skipped: {err}", delivery.id());
                            delivery.nack(false);
                            continue;
                        }
                    };
                    let text = String::from_utf8_lossy(&payload);
                    let mut out = std::io::stdout().lock();
                    let written = if args.verbose {
                        let offset = delivery.offset().unwrap_or(0);
                        writeln!(out, "{offset} {} {text}", delivery.topic())
                    } else {
                        writeln!(out, "{text}")
                    };
                    if written.and_then(|()| out.flush()).is_err() {
                        break;
                    }
                }
            }
            delivery.ack();
            count += 1;
            progress.inc(1);
        }
        progress.finish_and_clear();
        client.flush().await.context("flushing acks to the server")?;
        eprintln!("whispeer: replayed {count} messages");
        Ok(())
    })
}
