//! Three baselines for `whispeer bench`, each over a plain socket with buffered writes:
//!
//! - **NATS on its own text protocol** (`--nats-raw`): `PUB`/`SUB`/`MSG` written and parsed
//!   here, so the client costs next to nothing and the figure is the server's.
//! - **Redis pub/sub on RESP** (`--redis-raw`): `PUBLISH`/`SUBSCRIBE` and the `message` pushes
//!   written and parsed here likewise (the publisher's integer replies are read and dropped by a
//!   task of their own).
//! - **MQTT 3.1.1 at QoS 0** (`--mqtt`, `--mosquitto`, `--rumqttd`): CONNECT, SUBSCRIBE and PUBLISH packets
//!   written and parsed here likewise, against any MQTT broker (whispeer's MQTT listener,
//!   Mosquitto, rumqttd).
//! - **A forwarder** (`--forwarder`, served by `whispeer bench --serve-forwarder ADDR`): a
//!   process that only copies bytes from a publisher's socket to its subscribers' sockets, with
//!   4-byte length prefixes: what this machine can move through one process, the limit every
//!   broker is measured against.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

/// The MQTT broker behind an MQTT target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MqttBroker {
    /// whispeer's MQTT listener.
    Whispeer,
    Mosquitto,
    Rumqttd,
}

impl MqttBroker {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Whispeer => "whispeer (MQTT)",
            Self::Mosquitto => "mosquitto (MQTT)",
            Self::Rumqttd => "rumqttd (MQTT)",
        }
    }
}

/// Which raw protocol a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Nats,
    Redis,
    Mqtt,
    Forwarder,
}

/// A raw connection: it becomes a publisher or a subscriber on first use.
pub(super) struct RawConn {
    kind: Kind,
    stream: std::sync::Mutex<Option<TcpStream>>,
    writer: Mutex<Option<BufWriter<OwnedWriteHalf>>>,
}

/// The subscribing side of a raw connection.
pub(super) struct RawSub {
    kind: Kind,
    reader: OwnedReadHalf,
    /// For answering the NATS server's PINGs.
    writer: OwnedWriteHalf,
    buf: BytesMut,
}

pub(super) const NATS_CONNECT: &[u8] =
    b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false}\r\n";

/// MQTT's remaining length: 7 bits a byte, high bit for "more".
fn mqtt_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        out.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            return;
        }
    }
}

/// An MQTT 3.1.1 packet: `first` byte, then the remaining length, then `body`.
fn mqtt_packet(first: u8, body: &[&[u8]]) -> Vec<u8> {
    let len = body.iter().map(|part| part.len()).sum();
    let mut out = vec![first];
    mqtt_length(&mut out, len);
    body.iter().for_each(|part| out.extend_from_slice(part));
    out
}

fn mqtt_string(text: &[u8]) -> Vec<u8> {
    let mut out = (text.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(text);
    out
}

/// CONNECT: 3.1.1, clean session, a keep-alive of 60 s (longer than a run; rumqttd refuses
/// none), a client id of its own.
fn mqtt_connect() -> Vec<u8> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let id = format!(
        "bench-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let header = [&b"\x00\x04MQTT\x04\x02\x00\x3c"[..], &mqtt_string(id.as_bytes())].concat();
    mqtt_packet(0x10, &[&header])
}

/// The whole MQTT packet at the start of `buf`: (its first byte, where its body starts, its
/// length); `None` while incomplete.
fn mqtt_frame(buf: &[u8]) -> Option<(u8, usize, usize)> {
    let (mut len, mut shift, mut at) = (0usize, 0, 1);
    loop {
        let byte = *buf.get(at)?;
        len |= usize::from(byte & 0x7f) << shift;
        at += 1;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return None;
        }
    }
    (buf.len() >= at + len).then_some((buf[0], at, len))
}

impl RawConn {
    pub(super) async fn connect(kind: Kind, addr: &str) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (stream, writer) = (std::sync::Mutex::new(Some(stream)), Mutex::new(None));
        Ok(Self { kind, stream, writer })
    }

    fn take(&self) -> io::Result<TcpStream> {
        let mut stream = self.stream.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        stream.take().ok_or_else(|| io::Error::other("the connection is in use already"))
    }

    pub(super) async fn subscribe(&self, subject: &str) -> io::Result<RawSub> {
        let (reader, mut writer) = self.take()?.into_split();
        let mut sub = match self.kind {
            Kind::Mqtt => {
                let filter = [&[0, 1][..], &mqtt_string(subject.as_bytes()), &[0]].concat();
                writer.write_all(&[mqtt_connect(), mqtt_packet(0x82, &[&filter])].concat()).await?;
                let mut sub = RawSub { kind: self.kind, reader, writer, buf: BytesMut::new() };
                // CONNACK, then SUBACK: the subscription is in place.
                sub.mqtt_until(0x90).await?;
                return Ok(sub);
            }
            Kind::Nats => {
                let request = format!("SUB {subject} 1\r\nPING\r\n");
                writer.write_all(&[NATS_CONNECT, request.as_bytes()].concat()).await?;
                RawSub { kind: self.kind, reader, writer, buf: BytesMut::new() }
            }
            Kind::Redis => {
                // A wildcard is a pattern (`bench.x.*`), subscribed to with PSUBSCRIBE.
                let command = if subject.contains('*') { &b"PSUBSCRIBE"[..] } else { b"SUBSCRIBE" };
                writer.write_all(&resp(&[command, subject.as_bytes()])).await?;
                let mut sub = RawSub { kind: self.kind, reader, writer, buf: BytesMut::new() };
                // The confirmation is the first push: [subscribe, subject, 1].
                sub.redis_push().await?;
                return Ok(sub);
            }
            Kind::Forwarder => {
                writer.write_all(format!("S{subject}\n").as_bytes()).await?;
                let mut reader = reader;
                // The forwarder confirms once the subscriber is in place.
                let mut ack = [0u8; 1];
                reader.read_exact(&mut ack).await?;
                RawSub { kind: self.kind, reader, writer, buf: BytesMut::new() }
            }
        };
        if self.kind == Kind::Nats {
            // The PONG confirms the subscription, as a client's flush does.
            sub.until_line(|line| line.starts_with(b"PONG")).await?;
        }
        Ok(sub)
    }

    /// NATS only: one connection subscribed to every subject of `subjects` (sids from 1),
    /// confirmed by the PONG after them.
    /// Subscribes to each of `subjects` on this one NATS connection, as members of queue group
    /// `group` if given, and returns once nats-server has them.
    pub(super) async fn subscribe_nats(
        &self,
        subjects: &[String],
        group: Option<&str>,
    ) -> io::Result<RawSub> {
        if self.kind != Kind::Nats {
            return Err(io::Error::other("many subscriptions or a queue group: NATS only"));
        }
        let (reader, mut writer) = self.take()?.into_split();
        let mut request = NATS_CONNECT.to_vec();
        let group = group.map(|g| format!(" {g}")).unwrap_or_default();
        for (sid, subject) in subjects.iter().enumerate() {
            request.extend_from_slice(format!("SUB {subject}{group} {}\r\n", sid + 1).as_bytes());
        }
        request.extend_from_slice(b"PING\r\n");
        writer.write_all(&request).await?;
        let mut sub = RawSub { kind: self.kind, reader, writer, buf: BytesMut::new() };
        sub.until_line(|line| line.starts_with(b"PONG")).await?;
        Ok(sub)
    }

    pub(super) async fn publish(&self, subject: &str, payload: &[u8]) -> io::Result<()> {
        let mut writer = self.writer.lock().await;
        if writer.is_none() {
            let (mut reader, mut half) = self.take()?.into_split();
            match self.kind {
                Kind::Nats => half.write_all(NATS_CONNECT).await?,
                Kind::Redis => {
                    // Redis answers every PUBLISH: read the answers, and drop them.
                    tokio::spawn(async move {
                        let mut sink = vec![0u8; 64 * 1024];
                        while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
                    });
                }
                Kind::Forwarder => half.write_all(format!("P{subject}\n").as_bytes()).await?,
                Kind::Mqtt => {
                    half.write_all(&mqtt_connect()).await?;
                    // The CONNACK, then nothing (QoS 0): read and drop.
                    tokio::spawn(async move {
                        let mut sink = vec![0u8; 4096];
                        while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
                    });
                }
            }
            *writer = Some(BufWriter::with_capacity(64 * 1024, half));
        }
        let Some(writer) = writer.as_mut() else { return Ok(()) };
        match self.kind {
            Kind::Nats => {
                let head = format!("PUB {subject} {}\r\n", payload.len());
                writer.write_all(head.as_bytes()).await?;
                writer.write_all(payload).await?;
                writer.write_all(b"\r\n").await
            }
            Kind::Redis => {
                writer.write_all(&resp(&[b"PUBLISH", subject.as_bytes(), payload])).await
            }
            Kind::Forwarder => {
                let len = u32::try_from(payload.len()).map_err(io::Error::other)?;
                writer.write_all(&len.to_be_bytes()).await?;
                writer.write_all(payload).await
            }
            Kind::Mqtt => {
                let topic = mqtt_string(subject.as_bytes());
                let mut head = vec![0x30];
                mqtt_length(&mut head, topic.len() + payload.len());
                writer.write_all(&head).await?;
                writer.write_all(&topic).await?;
                writer.write_all(payload).await
            }
        }
    }

    pub(super) async fn flush(&self) -> io::Result<()> {
        match self.writer.lock().await.as_mut() {
            Some(writer) => writer.flush().await,
            None => Ok(()),
        }
    }
}

/// A RESP command: an array of bulk strings.
pub(super) fn resp(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for part in parts {
        out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The elements (bulk strings or integers) of the RESP array at the start of `buf`, as
/// (start, length) in `buf`, with the bytes it takes; `None` while it is incomplete (or not
/// such an array).
fn resp_array(buf: &[u8]) -> Option<(Vec<(usize, usize)>, usize)> {
    let line = |at: usize| -> Option<(&[u8], usize)> {
        let end = buf.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        Some((&buf[at..at + end], at + end + 2))
    };
    let (head, mut at) = line(0)?;
    let count: usize = std::str::from_utf8(head.strip_prefix(b"*")?).ok()?.parse().ok()?;
    let mut parts = Vec::with_capacity(count);
    for _ in 0..count {
        let (head, start) = line(at)?;
        if let Some(number) = head.strip_prefix(b":") {
            // An integer (the subscription count in a confirmation).
            parts.push((at + 1, number.len()));
            at = start;
            continue;
        }
        let len: usize = std::str::from_utf8(head.strip_prefix(b"$")?).ok()?.parse().ok()?;
        if buf.len() < start + len + 2 {
            return None;
        }
        parts.push((start, len));
        at = start + len + 2;
    }
    Some((parts, at))
}

impl RawSub {
    /// Reads MQTT packets until one whose type is `first`'s.
    async fn mqtt_until(&mut self, first: u8) -> io::Result<()> {
        loop {
            while let Some((kind, body, len)) = mqtt_frame(&self.buf) {
                self.buf.advance(body + len);
                if kind & 0xf0 == first {
                    return Ok(());
                }
            }
            self.fill().await?;
        }
    }

    /// The payload of the next Redis `message` push (or `pmessage`, to a pattern); `Ok(None)`
    /// for another push (the subscription's confirmation).
    async fn redis_push(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            if let Some((parts, used)) = resp_array(&self.buf) {
                let text = |&(at, len): &(usize, usize)| &self.buf[at..at + len];
                let kind = parts.first().map(text);
                let message = match (parts.len(), kind) {
                    (3, Some(b"message")) | (4, Some(b"pmessage")) => parts.last().copied(),
                    _ => None,
                };
                let mut taken = self.buf.split_to(used);
                let Some((start, len)) = message else { return Ok(None) };
                taken.advance(start);
                taken.truncate(len);
                return Ok(Some(taken.freeze()));
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> io::Result<()> {
        self.buf.reserve(64 * 1024);
        if self.reader.read_buf(&mut self.buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// Reads lines until one matches `done` (answering PINGs on the way).
    async fn until_line(&mut self, done: impl Fn(&[u8]) -> bool) -> io::Result<()> {
        loop {
            while let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(end + 2);
                if line.starts_with(b"PING") {
                    self.writer.write_all(b"PONG\r\n").await?;
                } else if done(&line) {
                    return Ok(());
                }
            }
            self.fill().await?;
        }
    }

    /// The next message's payload; `None` when the connection ends.
    pub(super) async fn next(&mut self) -> Option<Bytes> {
        loop {
            match self.kind {
                Kind::Redis => match self.redis_push().await {
                    Ok(Some(payload)) => return Some(payload),
                    Ok(None) => continue,
                    Err(_) => return None,
                },
                Kind::Forwarder => {
                    if self.buf.len() >= 4 {
                        let len = u32::from_be_bytes([
                            self.buf[0],
                            self.buf[1],
                            self.buf[2],
                            self.buf[3],
                        ]);
                        let len = usize::try_from(len).ok()?;
                        if self.buf.len() >= 4 + len {
                            self.buf.advance(4);
                            return Some(self.buf.split_to(len).freeze());
                        }
                    }
                }
                Kind::Mqtt => {
                    if let Some((kind, body, len)) = mqtt_frame(&self.buf) {
                        let mut packet = self.buf.split_to(body + len);
                        if kind & 0xf0 != 0x30 || len < 2 {
                            continue;
                        }
                        packet.advance(body);
                        let topic = usize::from(u16::from_be_bytes([packet[0], packet[1]]));
                        // QoS 1 and 2 carry a packet id after the topic.
                        let id = if kind & 0x06 == 0 { 0 } else { 2 };
                        if packet.len() < 2 + topic + id {
                            continue;
                        }
                        packet.advance(2 + topic + id);
                        return Some(packet.freeze());
                    }
                }
                Kind::Nats => {
                    if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        let line = &self.buf[..end];
                        if line.starts_with(b"MSG ") {
                            // MSG <subject> <sid> [reply-to] <#bytes>
                            let len: usize =
                                std::str::from_utf8(line).ok()?.rsplit(' ').next()?.parse().ok()?;
                            if self.buf.len() >= end + 2 + len + 2 {
                                self.buf.advance(end + 2);
                                let payload = self.buf.split_to(len).freeze();
                                self.buf.advance(2);
                                return Some(payload);
                            }
                        } else {
                            let ping = line.starts_with(b"PING");
                            self.buf.advance(end + 2);
                            if ping {
                                self.writer.write_all(b"PONG\r\n").await.ok()?;
                            }
                            continue;
                        }
                    }
                }
            }
            self.fill().await.ok()?;
        }
    }
}

/// Serves the forwarder on `listener` until the process ends: a connection names its role and
/// subject (`S<subject>\n` or `P<subject>\n`); every byte a publisher sends after that is
/// written, as it came, to each subscriber of its subject.
pub(crate) async fn serve_forwarder(listener: TcpListener) -> io::Result<()> {
    type Subscribers = Arc<Mutex<HashMap<String, Vec<OwnedWriteHalf>>>>;
    let subscribers: Subscribers = Arc::default();
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let subscribers = Arc::clone(&subscribers);
        tokio::spawn(async move {
            let (mut reader, mut writer) = stream.into_split();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while reader.read_exact(&mut byte).await.is_ok() && byte[0] != b'\n' {
                head.push(byte[0]);
            }
            let Some((&role, subject)) = head.split_first() else { return };
            let subject = String::from_utf8_lossy(subject).into_owned();
            if role == b'S' {
                let mut map = subscribers.lock().await;
                if writer.write_all(b"K").await.is_err() {
                    return;
                }
                map.entry(subject).or_default().push(writer);
                drop(map);
                // Hold the read half until the subscriber leaves.
                let _ = reader.read(&mut [0u8; 1]).await;
                return;
            }
            let mut chunk = vec![0u8; 256 * 1024];
            while let Ok(n) = reader.read(&mut chunk).await {
                if n == 0 {
                    break;
                }
                let mut map = subscribers.lock().await;
                if let Some(list) = map.get_mut(&subject) {
                    let mut alive = Vec::with_capacity(list.len());
                    for mut sub in list.drain(..) {
                        if sub.write_all(&chunk[..n]).await.is_ok() {
                            alive.push(sub);
                        }
                    }
                    *list = alive;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtt_packets_are_framed_only_when_whole() {
        let topic = mqtt_string(b"bench/x");
        let payload = vec![7u8; 300];
        let packet = mqtt_packet(0x30, &[&topic, &payload]);
        // 309 bytes of body: two bytes of remaining length.
        assert_eq!(&packet[..3], &[0x30, 0xb5, 0x02]);
        assert_eq!(mqtt_frame(&packet), Some((0x30, 3, 309)));
        assert_eq!(mqtt_frame(&packet[..packet.len() - 1]), None);
        assert_eq!(mqtt_frame(&[0x30]), None);
        let connect = mqtt_connect();
        assert_eq!(&connect[2..10], b"\x00\x04MQTT\x04\x02");
    }

    #[test]
    fn resp_arrays_are_read_only_when_whole() {
        let push = b"*3\r\n$7\r\nmessage\r\n$7\r\nbench.x\r\n$5\r\nhello\r\n";
        let (parts, used) = resp_array(push).expect("a whole push");
        assert_eq!(used, push.len());
        let text: Vec<&[u8]> = parts.iter().map(|(at, len)| &push[*at..*at + *len]).collect();
        assert_eq!(text, [&b"message"[..], b"bench.x", b"hello"]);
        assert!(resp_array(&push[..push.len() - 3]).is_none(), "incomplete");
        assert!(resp_array(b":1\r\n").is_none(), "not an array");
        let pushed = b"*4\r\n$8\r\npmessage\r\n$9\r\nbench.x.*\r\n$9\r\nbench.x.7\r\n$2\r\nhi\r\n";
        let (parts, used) = resp_array(pushed).expect("a pattern's push");
        assert_eq!((parts.len(), used), (4, pushed.len()));
        assert_eq!(&pushed[parts[3].0..parts[3].0 + parts[3].1], b"hi");
        let confirmed = b"*3\r\n$9\r\nsubscribe\r\n$1\r\nt\r\n:1\r\n";
        let (parts, used) = resp_array(confirmed).expect("a confirmation");
        assert_eq!((parts.len(), used), (3, confirmed.len()));
        assert_eq!(
            resp(&[b"PUBLISH", b"t", b"x"]),
            b"*3\r\n$7\r\nPUBLISH\r\n$1\r\nt\r\n$1\r\nx\r\n"
        );
    }
}
