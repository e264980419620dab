//! NATS's text protocol as `whispeer bench` speaks it to nats-server without a client: frames
//! parsed in place and a connection whose subscriptions are confirmed (the PONG after them).
//! The request/reply and work-queue workloads build their raw NATS sides on it.

use std::ops::Range;

use anyhow::Context;
use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A NATS protocol frame, its parts as ranges of the buffer it was read from.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Frame {
    Msg {
        subject: Range<usize>,
        reply: Option<Range<usize>>,
        payload: Range<usize>,
    },
    /// A message with headers (`HMSG`): from JetStream, the status of a pull request
    /// (`NATS/1.0 408 Request Timeout`); its payload is left unread.
    Status {
        subject: Range<usize>,
        headers: Range<usize>,
    },
    Ping,
    Pong,
    Error(String),
    /// `+OK`, `INFO` and anything else a client may pass over.
    Other,
}

/// The frame `buf` starts with and its length, once it is whole.
pub(super) fn frame(buf: &[u8]) -> anyhow::Result<Option<(Frame, usize)>> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
    let line = &buf[..end];
    let headed = line.starts_with(b"HMSG ");
    let frame = if let Some(rest) = line.strip_prefix(b"MSG ").or(line.strip_prefix(b"HMSG ")) {
        // MSG <subject> <sid> [reply-to] <#bytes>, or HMSG with <#header bytes> before
        // <#bytes> (headers and payload together), which a JetStream status is.
        let mut words: Vec<&[u8]> = rest.split(|&b| b == b' ').filter(|w| !w.is_empty()).collect();
        let number =
            |word: &[u8]| -> anyhow::Result<usize> { Ok(std::str::from_utf8(word)?.parse()?) };
        let len = number(words.pop().unwrap_or_default())?;
        let head = if headed { number(words.pop().unwrap_or_default())? } else { 0 };
        let (subject, reply) = match words.as_slice() {
            [subject, _] => (*subject, None),
            [subject, _, reply] => (*subject, Some(*reply)),
            _ => anyhow::bail!("a message line of {} words", words.len() + 2),
        };
        anyhow::ensure!(head <= len, "headers longer than the message");
        if buf.len() < end + 2 + len + 2 {
            return Ok(None);
        }
        let at = |word: &[u8]| {
            let start = word.as_ptr() as usize - buf.as_ptr() as usize;
            start..start + word.len()
        };
        let payload = end + 2 + head..end + 2 + len;
        let (subject, reply) = (at(subject), reply.map(at));
        let frame = if headed {
            Frame::Status { subject, headers: end + 2..end + 2 + head }
        } else {
            Frame::Msg { subject, reply, payload }
        };
        return Ok(Some((frame, end + 2 + len + 2)));
    } else if line.starts_with(b"PING") {
        Frame::Ping
    } else if line.starts_with(b"PONG") {
        Frame::Pong
    } else if line.starts_with(b"-ERR") {
        Frame::Error(String::from_utf8_lossy(line).into_owned())
    } else {
        Frame::Other
    };
    Ok(Some((frame, end + 2)))
}

/// A connection speaking NATS's text protocol, its subscription in place.
pub(super) struct RawNats {
    pub(super) stream: TcpStream,
    pub(super) buf: BytesMut,
}

impl RawNats {
    /// Connects and sends `subscribe` (whole `SUB` lines), waiting for the PONG after them.
    pub(super) async fn connect(addr: &str, subscribe: &str) -> anyhow::Result<Self> {
        let mut stream = TcpStream::connect(addr).await.context("connecting to nats-server")?;
        stream.set_nodelay(true)?;
        let hello = [super::raw::NATS_CONNECT, subscribe.as_bytes(), b"PING\r\n"].concat();
        stream.write_all(&hello).await?;
        let mut this = Self { stream, buf: BytesMut::with_capacity(64 * 1024) };
        loop {
            while let Some((frame, used)) = frame(&this.buf)? {
                this.buf.advance(used);
                match frame {
                    Frame::Pong => return Ok(this),
                    Frame::Error(err) => anyhow::bail!("nats-server: {err}"),
                    _ => {}
                }
            }
            this.fill().await?;
        }
    }

    /// Reads more into the buffer (cancel-safe: nothing read is lost).
    pub(super) async fn fill(&mut self) -> anyhow::Result<()> {
        self.buf.reserve(64 * 1024);
        let read = self.stream.read_buf(&mut self.buf).await?;
        anyhow::ensure!(read > 0, "nats-server closed the connection");
        Ok(())
    }
}

pub(super) fn ascii(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_frames_are_read_only_when_whole_and_name_their_parts() {
        let buf = b"MSG bench.q 1 _INBOX.bench.7 3\r\nabc\r\nPING\r\n";
        let (msg, used) = frame(buf).unwrap().unwrap();
        let Frame::Msg { subject, reply, payload } = msg else { panic!("{msg:?}") };
        assert_eq!(&buf[subject], b"bench.q");
        assert_eq!(&buf[reply.unwrap()], b"_INBOX.bench.7");
        assert_eq!((&buf[payload], used), (&b"abc"[..], 37));
        assert_eq!(frame(&buf[used..]).unwrap(), Some((Frame::Ping, 6)));
        // Without a reply subject; and a payload not whole yet.
        let (msg, _) = frame(b"MSG _INBOX.bench.2 1 2\r\nok\r\n").unwrap().unwrap();
        assert!(matches!(msg, Frame::Msg { reply: None, .. }));
        assert_eq!(frame(b"MSG a 1 _INBOX.x 5\r\nab").unwrap(), None);
        assert_eq!(frame(b"PON").unwrap(), None);
        assert!(frame(b"MSG a\r\n").is_err(), "a line too short");
        assert!(frame(b"MSG a 1 x\r\n").is_err(), "a length that is not a number");
        // A JetStream status: headers only, its parts named, the whole frame used.
        let status = b"HMSG _INBOX.w 1 32 32\r\nNATS/1.0 408 Request Timeout\r\n\r\n\r\n";
        let (msg, used) = frame(status).unwrap().unwrap();
        let Frame::Status { subject, headers } = msg else { panic!("{msg:?}") };
        assert_eq!((&status[subject], used), (&b"_INBOX.w"[..], status.len()));
        assert!(status[headers].starts_with(b"NATS/1.0 408"));
        assert_eq!(frame(&status[..30]).unwrap(), None, "not whole yet");
        assert!(frame(b"HMSG a 1 9 5\r\n").is_err(), "headers longer than the message");
        let (err, _) = frame(b"-ERR 'Permissions Violation'\r\n").unwrap().unwrap();
        assert_eq!(err, Frame::Error("-ERR 'Permissions Violation'".into()));
    }
}
