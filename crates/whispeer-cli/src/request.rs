//! `whispeer req` and `whispeer reply`: request/reply from the command line, through the SDK's
//! `Client::request` and `Client::respond` (the `response-topic` and `correlation-data`
//! headers, so MQTT 5 clients' requests and responses interoperate).

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::ConnectArgs;
use crate::pubsub::{block_on, connect};

/// `whispeer req`.
#[derive(Debug, Args)]
pub(crate) struct ReqArgs {
    /// Topic to send the request to.
    topic: String,
    /// The request.
    message: String,
    /// How long to wait for the reply.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    timeout_ms: u64,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// `whispeer reply`.
#[derive(Debug, Args)]
pub(crate) struct ReplyArgs {
    /// Filter of the requests to answer.
    filter: String,
    /// The answer; without it, each request is answered with its own payload (an echo).
    #[arg(long)]
    message: Option<String>,
    /// Queue group: responders in one group share the requests.
    #[arg(long, default_value = "responders")]
    group: String,
    /// Exit after answering this many requests.
    #[arg(long)]
    count: Option<u64>,
    #[command(flatten)]
    connect: ConnectArgs,
}

pub(crate) fn run_req(args: ReqArgs) -> ExitCode {
    block_on(async move {
        let client = connect(&args.connect).await?;
        let timeout = Duration::from_millis(args.timeout_ms);
        let reply = client.request(&args.topic, args.message.into_bytes(), timeout).await?;
        println!("{}", String::from_utf8_lossy(reply.payload()));
        Ok(())
    })
}

pub(crate) fn run_reply(args: ReplyArgs) -> ExitCode {
    block_on(async move {
        let client = connect(&args.connect).await?;
        let (answered, mut done) = tokio::sync::mpsc::unbounded_channel();
        let fixed = args.message.map(bytes::Bytes::from);
        let _responder = client
            .respond(&args.filter, &args.group, move |request| {
                let _ = answered.send(());
                Some(fixed.clone().unwrap_or_else(|| request.payload().clone()))
            })
            .await?;
        eprintln!("whispeer: answering requests on {}", args.filter);
        let mut count = 0;
        while done.recv().await.is_some() {
            count += 1;
            if args.count.is_some_and(|max| count >= max) {
                // Let the last reply leave before the connection closes.
                client.flush().await?;
                tokio::time::sleep(Duration::from_millis(100)).await;
                break;
            }
        }
        Ok(())
    })
}
