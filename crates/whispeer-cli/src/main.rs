//! The `whispeer` command line.
//!
//! Today it checks topics and filters; `serve`, `pub`, `sub`, `bench` and `keygen` arrive with
//! the network broker and engines work (see the README's status table).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use whispeer::{Filter, Topic};

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
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Match { filter, topics } => match_topics(&filter, &topics),
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
