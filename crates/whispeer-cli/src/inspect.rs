//! `whispeer inspect topics|subscriptions|durable|connections|nodes`: the admin API's snapshots
//! as tables (or the JSON itself with `--json`).

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::Value;

/// What to show.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum What {
    /// Topics retained or seen: subscribers, rates, offsets, retained messages, durability.
    Topics,
    /// Subscriptions (a queue group once): queued, received, unacknowledged, drops.
    #[value(alias = "subscribers")]
    Subscriptions,
    /// Durable subscriptions: committed offsets and lag.
    Durable,
    /// Live connections: peer, principal, subscriptions, messages published and delivered.
    Connections,
    /// The nodes of the server's cluster: name, client addresses, engine server, last seen.
    Nodes,
    /// The principals connected anywhere in the cluster (this server's, without one), and
    /// where.
    Presence,
}

/// `whispeer inspect`.
#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// What to show.
    what: What,
    /// The server's admin port.
    #[arg(long, default_value = "http://127.0.0.1:9090")]
    admin: String,
    /// The admin token (`admin_token` in the server's configuration).
    #[arg(long, env = "WHISPEER_ADMIN_TOKEN", hide_env_values = true)]
    token: String,
    /// Print the JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// With `connections`: disconnect the connection with this id instead.
    #[arg(long, value_name = "ID")]
    disconnect: Option<u64>,
}

/// The columns of each table: (header, JSON field).
fn columns(what: What) -> &'static [(&'static str, &'static str)] {
    match what {
        What::Topics => &[
            ("TOPIC", "topic"),
            ("SUBSCRIBERS", "subscribers"),
            ("IN/S", "rate_in"),
            ("OUT/S", "rate_out"),
            ("FIRST", "first_offset"),
            ("NEXT", "next_offset"),
            ("RETAINED", "messages"),
            ("BYTES", "bytes"),
            ("DURABLE", "durable"),
        ],
        What::Subscriptions => &[
            ("FILTER", "filter"),
            ("GROUP", "group"),
            ("MEMBERS", "members"),
            ("QUEUED", "queued"),
            ("RECEIVED", "received"),
            ("UNACKED", "unacked"),
            ("DROPPED", "dropped"),
        ],
        What::Durable => &[
            ("GROUP", "group"),
            ("FILTER", "filter"),
            ("TOPIC", "topic"),
            ("COMMITTED", "committed"),
            ("LAG", "lag"),
        ],
        What::Connections => &[
            ("ID", "id"),
            ("PEER", "peer"),
            ("PRINCIPAL", "principal"),
            ("SUBSCRIPTIONS", "subscriptions"),
            ("PUBLISHED", "published"),
            ("DELIVERED", "delivered"),
            ("SINCE", "since"),
        ],
        What::Nodes => &[
            ("NODE", "node"),
            ("ADDRESSES", "addrs"),
            ("ENGINE SERVER", "engine_server"),
            ("SEEN", "seen"),
            ("VERSION", "version"),
        ],
        What::Presence => {
            &[("PRINCIPAL", "principal"), ("NODES", "nodes"), ("CONNECTIONS", "connections")]
        }
    }
}

fn cell(value: Option<&Value>) -> String {
    match value {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(Value::Array(items)) => {
            items.iter().map(|item| cell(Some(item))).collect::<Vec<_>>().join(",")
        }
        Some(other) => other.to_string(),
    }
}

/// Renders rows of JSON objects as an aligned table.
pub(crate) fn table(what: What, rows: &[Value]) -> String {
    let columns = columns(what);
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| columns.iter().map(|(_, field)| cell(row.get(*field))).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, (header, _))| {
            cells.iter().map(|r| r[i].len()).chain([header.len()]).max().unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, values: Vec<&str>| {
        let padded: Vec<String> =
            values.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut out, columns.iter().map(|(header, _)| *header).collect());
    for row in &cells {
        line(&mut out, row.iter().map(String::as_str).collect());
    }
    out
}

pub(crate) fn run(args: &InspectArgs) -> ExitCode {
    let path = match args.what {
        What::Topics => "topics",
        What::Subscriptions => "subscriptions",
        What::Durable => "durable",
        What::Connections => "connections",
        What::Nodes => "cluster",
        What::Presence => "presence",
    };
    let auth = format!("Bearer {}", args.token);
    if let Some(id) = args.disconnect {
        let url = format!("{}/api/connections/{id}/disconnect", args.admin.trim_end_matches('/'));
        return match ureq::post(&url).header("Authorization", &auth).send_empty() {
            Ok(_) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("whispeer: POST {url}: {err}");
                ExitCode::FAILURE
            }
        };
    }
    let url = format!("{}/api/{path}", args.admin.trim_end_matches('/'));
    let fetched = ureq::get(&url)
        .header("Authorization", &auth)
        .call()
        .with_context(|| format!("GET {url}"))
        .and_then(|mut response| Ok(response.body_mut().read_json::<Value>()?))
        .map(|body| match args.what {
            What::Nodes => nodes(&body, now_ms()),
            What::Presence => body["principals"].as_array().cloned().unwrap_or_default(),
            _ => body.as_array().cloned().unwrap_or_default(),
        });
    match fetched {
        Ok(rows) if args.json => {
            println!("{}", Value::Array(rows));
            ExitCode::SUCCESS
        }
        Ok(rows) => {
            print!("{}", table(args.what, &rows));
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("whispeer: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn now_ms() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    now.map_or(0, |d| d.as_millis() as u64)
}

/// The rows of `whispeer inspect nodes` from `/api/cluster`: each node, with how long ago it
/// wrote its entry. Why the membership could not be read, if so, goes to standard error.
fn nodes(cluster: &Value, now_ms: u64) -> Vec<Value> {
    if let Some(why) = cluster.pointer("/membership/error").and_then(Value::as_str) {
        eprintln!("whispeer: this node cannot hear the others now ({why}); the list may be stale");
    }
    let listed = cluster.pointer("/membership/nodes").and_then(Value::as_array);
    let mut rows = listed.cloned().unwrap_or_default();
    for row in &mut rows {
        if let Some(seen) = row.get("seen_ms").and_then(Value::as_u64) {
            let ago = now_ms.saturating_sub(seen) as f64 / 1000.0;
            row["seen"] = Value::String(format!("{ago:.1}s ago"));
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn rows_become_an_aligned_table() {
        let rows = [
            json!({"group": "workers", "filter": "jobs/#", "topic": "jobs/x", "committed": 2, "lag": 3}),
            json!({"group": "w", "filter": "a", "topic": "a", "committed": 10, "lag": 0}),
        ];
        let text = table(What::Durable, &rows);
        assert_eq!(
            text,
            "GROUP    FILTER  TOPIC   COMMITTED  LAG\n\
             workers  jobs/#  jobs/x  2          3\n\
             w        a       a       10         0\n"
        );
    }

    #[test]
    fn the_cluster_view_becomes_one_row_per_node() {
        let cluster = json!({"node": "a", "membership": {"error": null, "nodes": [
            {"node": "a", "addrs": ["127.0.0.1:7461", "127.0.0.1:7471"], "engine_server": "127.0.0.1:4261",
             "started_ms": 1_000, "seen_ms": 9_000, "version": "0.1.0"},
            {"node": "b", "addrs": [], "engine_server": null, "started_ms": 1_000, "seen_ms": 10_000,
             "version": "0.1.0"},
        ]}});
        let text = table(What::Nodes, &nodes(&cluster, 10_500));
        assert_eq!(
            text,
            "NODE  ADDRESSES                      ENGINE SERVER   SEEN      VERSION\n\
             a     127.0.0.1:7461,127.0.0.1:7471  127.0.0.1:4261  1.5s ago  0.1.0\n\
             b                                    -               0.5s ago  0.1.0\n"
        );
    }
}
