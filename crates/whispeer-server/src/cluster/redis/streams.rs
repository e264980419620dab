//! Redis Streams: entry ids as offsets, replies read into entries, and a queue group's stream
//! read by one consumer per node.

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{Client, Value};
use tokio::sync::mpsc;

/// A stream entry id `<ms>-<seq>` as an offset.
pub(super) fn id_to_offset(id: &str) -> Option<u64> {
    let (ms, seq) = id.split_once('-')?;
    let (ms, seq) = (ms.parse::<u64>().ok()?, seq.parse::<u64>().ok()?);
    (seq < 1 << 20 && ms < 1 << 43).then_some(ms << 20 | seq)
}

/// The entry id of an offset.
pub(super) fn offset_to_id(offset: u64) -> String {
    format!("{}-{}", offset >> 20, offset & ((1 << 20) - 1))
}

/// Creates consumer group `group` of stream `key` (and the stream), starting with new entries;
/// one that exists already is left as it is.
pub(super) async fn create_group(
    conn: &mut MultiplexedConnection,
    key: &str,
    group: &str,
) -> redis::RedisResult<()> {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg("$")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(err) if !err.to_string().contains("BUSYGROUP") => Err(err),
        _ => Ok(()),
    }
}

/// Reads group stream `key` as consumer `node` of group `name` until an error or until the
/// inbox is gone; each entry is acknowledged once handed over.
pub(super) async fn read_group(
    client: &Client,
    key: &str,
    name: &str,
    node: &str,
    tx: &mpsc::Sender<Bytes>,
) -> redis::RedisResult<()> {
    let mut conn: MultiplexedConnection = client.get_multiplexed_async_connection().await?;
    create_group(&mut conn, key, name).await?;
    while !tx.is_closed() {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(name)
            .arg(node)
            .arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(key)
            .arg(">")
            .query_async(&mut conn)
            .await?;
        let entries = stream_entries(reply);
        if entries.is_empty() {
            continue;
        }
        let mut ack = redis::cmd("XACK");
        ack.arg(key).arg(name);
        for (id, fields) in entries {
            if let Some(message) = field(&fields, "m") {
                let _ = tx.send(message).await;
            }
            ack.arg(id);
        }
        ack.query_async::<()>(&mut conn).await?;
    }
    Ok(())
}

/// The entries of an `XREAD`/`XREADGROUP` reply (one stream): each id and its fields.
pub(super) fn stream_entries(reply: Value) -> Vec<(String, Vec<(String, Bytes)>)> {
    let streams = match reply {
        Value::Array(streams) => streams,
        Value::Map(map) => map.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => return Vec::new(),
    };
    let mut out = Vec::new();
    // RESP2: [[key, [[id, [f, v, …]], …]]]; RESP3 map: key → entries.
    let mut lists = Vec::new();
    for stream in streams {
        match stream {
            Value::Array(mut pair) if pair.len() == 2 => lists.push(pair.remove(1)),
            other @ Value::Array(_) => lists.push(other),
            _ => {}
        }
    }
    for list in lists {
        let Value::Array(entries) = list else { continue };
        for entry in entries {
            let Value::Array(mut parts) = entry else { continue };
            if parts.len() != 2 {
                continue;
            }
            let fields = parts.remove(1);
            let Some(id) = text(&parts[0]) else { continue };
            let Value::Array(fields) = fields else { continue };
            let mut pairs = Vec::new();
            for pair in fields.chunks(2) {
                if let [name, Value::BulkString(value)] = pair
                    && let Some(name) = text(name)
                {
                    pairs.push((name, Bytes::copy_from_slice(value)));
                }
            }
            out.push((id, pairs));
        }
    }
    out
}

pub(super) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

/// An entry's offset and message (field `m`), if it has both.
pub(super) fn message_of(id: &str, fields: &[(String, Bytes)]) -> Option<(u64, Bytes)> {
    Some((id_to_offset(id)?, field(fields, "m")?))
}

pub(super) fn field(fields: &[(String, Bytes)], name: &str) -> Option<Bytes> {
    fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
}
