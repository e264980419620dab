//! The `whispeer` command line.
//!
//! Today it checks topics and filters and makes keys; `serve`, `pub`, `sub` and `bench` arrive
//! with the network broker (see the README's status table).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
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

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Match { filter, topics } => match_topics(&filter, &topics),
        Command::Keygen { id } => keygen(id),
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
