//! The `whispeer` command line: run a server, publish and subscribe, make keys, check filters.
//!
//! Exit codes: 0 success; 1 a runtime failure (cannot connect, refused by the server); 2 a usage
//! or configuration error; for `match`, 1 also means some topic did not match.

mod bench;
mod cert;
mod chat;
mod config;
mod inspect;
mod keys;
mod pubsub;
mod replay;
mod request;
mod serve;
mod sync;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use whispeer::{Filter, Key, KeyId, Keyring, Topic};

/// whispeer — an embeddable, end-to-end encrypted publish/subscribe broker.
#[derive(Debug, Parser)]
#[command(name = "whispeer", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a server for clients over TCP.
    ///
    /// Settings come from defaults, then `whispeer.toml` (or --config), then WHISPEER_*
    /// variables (WHISPEER_LISTEN, WHISPEER_API_KEYS='["sha256:…"]',
    /// WHISPEER_LIMITS__MAX_MESSAGE_BYTES=…), then --listen. Without api_keys the server only
    /// listens on loopback. Stops cleanly on SIGINT or SIGTERM.
    Serve {
        /// Address to listen on, such as 127.0.0.1:7450 (port 0 picks a free port).
        #[arg(long)]
        listen: Option<String>,
        /// Also accept WebSocket clients on this address (path `ws_path`, default /ws).
        #[arg(long)]
        ws_listen: Option<String>,
        /// Serve chat (WebSocket, one JSON object per message; see CHAT.md) on this address,
        /// e.g. 127.0.0.1:3030 for ws://127.0.0.1:3030/ws.
        #[arg(long)]
        chat_listen: Option<String>,
        /// Serve the chat page at http://<chat-listen>/ with the WASM client's web package from
        /// this directory (wasm-bindgen --target web output).
        #[arg(long, value_name = "DIR")]
        chat_page: Option<PathBuf>,
        /// Serve /healthz, /readyz and /metrics (Prometheus) on this address.
        #[arg(long)]
        admin_listen: Option<String>,
        /// Also accept MQTT 3.1.1 and 5 clients on this address, e.g. 127.0.0.1:1883 (the
        /// CONNECT password is an API key or a JWT; see MQTT.md).
        #[arg(long)]
        mqtt_listen: Option<String>,
        /// Serve the P2P relay at /relay on the WebSocket listener (needs --ws-listen): peers
        /// of `whispeer sync` and whispeer-sync's relay transport meet there.
        #[arg(long)]
        relay: bool,
        /// Configuration file [default: whispeer.toml, if present].
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Publish a message, or one message per line of standard input.
    ///
    /// Example: whispeer pub sensor/k1/temperature 21.5
    Pub(pubsub::PubArgs),
    /// Chat in the terminal on a server's chat listener (`whispeer serve --chat-listen`).
    ///
    /// Example: whispeer chat --as alice, then /msg bob hi, /join team, /history bob, /who
    Chat(chat::ChatArgs),
    /// Send a request and print its reply (request/reply; MQTT 5 responders answer it too).
    ///
    /// Example: whispeer req svc/time now
    Req(request::ReqArgs),
    /// Answer requests: with --message, or by echoing each request.
    ///
    /// Example: whispeer reply svc/time --message 12:00
    Reply(request::ReplyArgs),
    /// Join a mesh of brokers through a relay: print what arrives on the shared filters, and
    /// publish each line of standard input with --pub.
    ///
    /// Example: whispeer sync --topic team-docs --share 'docs/#' --relay ws://127.0.0.1:7451
    Sync(sync::SyncArgs),
    /// Subscribe and print each message (with -v, its topic first, like mosquitto_sub -v).
    ///
    /// Example: whispeer sub 'sensor/#' -v
    Sub(pubsub::SubArgs),
    /// End-to-end keys for pub/sub without a shared secret: publish this device's identity,
    /// show a principal's devices, make a key policy, publish and read under one.
    ///
    /// Example: whispeer keys policy ops --filter 'ops/#' --member bob --as alice --identity alice.id
    Keys(keys::KeysArgs),
    /// Print a topic's retained history from a start position, or publish it again elsewhere.
    ///
    /// Example: whispeer replay orders/eu --from 2026-11-23T09:00:00Z -v
    Replay(replay::ReplayArgs),
    /// Show a running server's topics, subscriptions or durable subscriptions (admin API).
    ///
    /// Example: whispeer inspect subscriptions --admin http://127.0.0.1:9090 --token …
    Inspect(inspect::InspectArgs),
    /// Measure throughput and latency of a running server (and of nats-server with --nats).
    ///
    /// Prints a table: delivered msgs/s for 1→1 and 1→8 subscribers with 128-byte payloads,
    /// MB/s with 64 KiB payloads, and p50/p99/p99.9 latency at a fixed rate.
    Bench(Box<bench::BenchArgs>),
    /// Write a development CA and a server certificate (PEM) for trying TLS.
    ///
    /// Example: whispeer cert --out certs && whispeer serve --config whispeer.toml, with
    /// [tls] cert = "certs/cert.pem", key = "certs/key.pem"; clients pass --ca-file certs/ca.pem.
    Cert(cert::CertArgs),
    /// Check which topics a filter matches, the way the broker routes them.
    ///
    /// Prints one line per topic, `match` or `no match`, and exits with 0 if every topic
    /// matched, 1 if some did not, and 2 if the filter or a topic is invalid.
    ///
    /// Example: whispeer match 'sensor/+/temperature' sensor/k1/temperature sensor/k1/humidity
    Match {
        /// The filter: `/`-separated segments; `+` or `*` match one segment, `#` (last) any number.
        filter: String,
        /// Topics to test against the filter.
        #[arg(required = true)]
        topics: Vec<String>,
    },
    /// Print a new random 256-bit encryption key as `<id>:<base64url>`.
    ///
    /// The line is the key file and `WHISPEER_KEY` format: append it to a key file
    /// (`whispeer keygen --id 2 >> keys.txt`) to rotate; the highest id seals, every id opens.
    /// Treat the output as a password.
    Keygen {
        /// The key id carried in every message sealed with this key.
        #[arg(long, default_value_t = 1)]
        id: u32,
    },
}

/// Connection settings shared by `pub` and `sub`.
#[derive(Debug, Args)]
pub(crate) struct ConnectArgs {
    /// Server address; several, separated by commas, are nodes of one cluster: the first that
    /// answers is used, and the next ones take over when it goes away.
    #[arg(long, env = "WHISPEER_SERVER", default_value = config::DEFAULT_LISTEN)]
    server: String,
    /// API key, if the server requires one.
    #[arg(long, env = "WHISPEER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// With several --server nodes of a cluster and durable topics (whose offsets the cluster
    /// shares): a subscription that moves to another node resumes after its last offset.
    #[arg(long)]
    shared_offsets: bool,
    /// Key file for end-to-end encryption (see `whispeer keygen`); WHISPEER_KEY also works.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Compress payloads (zstd) before sending.
    #[arg(long)]
    compress: bool,
    /// CA certificate (PEM) to trust for tls:// and wss:// servers, for a private CA; without
    /// it the platform's root certificates are trusted (SSL_CERT_FILE / SSL_CERT_DIR honoured).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for servers that require one; needs --key.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// Client private key (PEM) for --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Match { filter, topics } => match_topics(&filter, &topics),
        Command::Keygen { id } => keygen(id),
        Command::Serve {
            listen,
            ws_listen,
            chat_listen,
            chat_page,
            admin_listen,
            mqtt_listen,
            relay,
            config,
        } => {
            let addresses = serve::Listen {
                listen,
                ws_listen,
                admin_listen,
                chat_listen,
                chat_page,
                mqtt_listen,
                relay,
            };
            serve::run(addresses, config)
        }
        Command::Pub(args) => pubsub::run_pub(args),
        Command::Chat(args) => chat::run(args),
        Command::Sub(args) => pubsub::run_sub(args),
        Command::Keys(args) => keys::run(args),
        Command::Sync(args) => sync::run(args),
        Command::Req(args) => request::run_req(args),
        Command::Reply(args) => request::run_reply(args),
        Command::Replay(args) => replay::run(args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Bench(args) => bench::run(*args),
        Command::Cert(args) => cert::run(args),
    }
}

fn keygen(id: u32) -> ExitCode {
    let mut keyring = Keyring::new();
    let made = Key::generate().and_then(|key| keyring.insert(KeyId(id), key));
    match made {
        Ok(()) => {
            print!("{}", keyring.to_text().as_str());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("whispeer: cannot make a key: {err}");
            ExitCode::FAILURE
        }
    }
}

fn match_topics(filter: &str, topics: &[String]) -> ExitCode {
    let filter = match Filter::parse(filter) {
        Ok(filter) => filter,
        Err(err) => {
            eprintln!("whispeer: invalid filter {filter:?}: {err}");
            return ExitCode::from(2);
        }
    };
    let mut all = true;
    for topic in topics {
        match Topic::parse(topic) {
            Ok(parsed) => {
                let matched = filter.matches(&parsed);
                all &= matched;
                println!("{}\t{topic}", if matched { "match" } else { "no match" });
            }
            Err(err) => {
                eprintln!("whispeer: invalid topic {topic:?}: {err}");
                return ExitCode::from(2);
            }
        }
    }
    if all { ExitCode::SUCCESS } else { ExitCode::from(1) }
}
