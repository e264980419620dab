//! What whispeer's client and server share below the protocol: WebSocket messages read and
//! written as one byte stream of frames, so the protocol code above runs unchanged over TCP
//! and WebSocket.
//!
//! [`split`] turns a WebSocket into a reader ([`WsReader`], `AsyncRead`) and a writer
//! ([`WsWriter`], `AsyncWrite`). By default binary messages carry the bytes (frames may span
//! messages) and each flushed write goes out as one binary message; an [`Incoming`] and an
//! [`Outgoing`] hook change that (the server's JSON form uses them).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};

/// What the reader does with each incoming message; the defaults suit a binary-only peer.
pub trait Incoming: Unpin {
    /// The bytes a binary message contributes to the stream.
    ///
    /// # Errors
    /// A refusal, reported by the reader.
    fn binary(&mut self, bytes: Bytes) -> io::Result<Bytes> {
        Ok(bytes)
    }

    /// The bytes a text message stands for; by default text is refused.
    ///
    /// # Errors
    /// A refusal, reported by the reader (`InvalidData` by default).
    fn text(&mut self, text: Utf8Bytes) -> io::Result<Bytes> {
        let _ = text;
        Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected text message"))
    }

    /// The error to report for a failed read (the stream ends after it).
    fn error(&mut self, err: tungstenite::Error) -> io::Error {
        io::Error::other(err)
    }
}

/// Most bytes one binary message carries by default: a longer write goes in several messages,
/// which the peer reads as one stream. A peer bounds its messages (a whispeer server by its
/// frame limit and 64 KiB more), and a writer whose peer reads slowly may have much to write
/// at once: before this bound, an SDK held back by its server sent what it had gathered, 2 MiB,
/// as one message, and the server closed the connection as too large again and again.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// What the writer sends for each write; the defaults suit a binary-only peer.
pub trait Outgoing: Unpin {
    /// Queues the messages that carry one write (by default, binary messages of at most
    /// [`MAX_MESSAGE_BYTES`]).
    fn write(&mut self, buf: &[u8], queue: &mut VecDeque<Message>) {
        for chunk in buf.chunks(MAX_MESSAGE_BYTES) {
            queue.push_back(Message::Binary(Bytes::copy_from_slice(chunk)));
        }
    }

    /// A last message before the stream closes (a close frame with a code), if any.
    fn closing(&mut self) -> Option<Message> {
        None
    }
}

/// Binary messages both ways: the client's choice, and the default of both hooks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Binary;

impl Incoming for Binary {}
impl Outgoing for Binary {}

/// Reads incoming messages as one byte stream.
#[derive(Debug)]
pub struct WsReader<S, I> {
    stream: SplitStream<WebSocketStream<S>>,
    pending: Bytes,
    done: bool,
    incoming: I,
}

/// Sends what is written as messages, each write's messages when the writer is flushed.
#[derive(Debug)]
pub struct WsWriter<S, O> {
    sink: SplitSink<WebSocketStream<S>, Message>,
    queue: VecDeque<Message>,
    outgoing: O,
    closing: bool,
}

/// The reader and writer halves of `ws`, with these hooks.
pub fn split<S, I, O>(
    ws: WebSocketStream<S>,
    incoming: I,
    outgoing: O,
) -> (WsReader<S, I>, WsWriter<S, O>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (sink, stream) = ws.split();
    let reader = WsReader { stream, pending: Bytes::new(), done: false, incoming };
    let writer = WsWriter { sink, queue: VecDeque::new(), outgoing, closing: false };
    (reader, writer)
}

impl<S: AsyncRead + AsyncWrite + Unpin, I: Incoming> AsyncRead for WsReader<S, I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if self.done {
                return Poll::Ready(Ok(()));
            }
            let this = &mut *self;
            match ready!(Pin::new(&mut this.stream).poll_next(cx)) {
                Some(Ok(Message::Binary(bytes))) => this.pending = this.incoming.binary(bytes)?,
                Some(Ok(Message::Text(text))) => this.pending = this.incoming.text(text)?,
                // tungstenite answers pings itself; pongs and raw frames carry nothing.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => this.done = true,
                Some(Err(err)) => {
                    this.done = true;
                    return Poll::Ready(Err(this.incoming.error(err)));
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin, O: Outgoing> AsyncWrite for WsWriter<S, O> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        this.outgoing.write(buf, &mut this.queue);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            ready!(Pin::new(&mut self.sink).poll_ready(cx)).map_err(io::Error::other)?;
            if let Some(message) = self.queue.pop_front() {
                Pin::new(&mut self.sink).start_send(message).map_err(io::Error::other)?;
            }
        }
        Pin::new(&mut self.sink).poll_flush(cx).map_err(io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.closing {
            self.closing = true;
            if let Some(last) = self.outgoing.closing() {
                self.queue.push_back(last);
            }
        }
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.sink).poll_close(cx).map_err(io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;

    #[test]
    fn a_long_write_goes_in_messages_no_longer_than_the_bound() {
        let mut queue = VecDeque::new();
        let bytes: Vec<u8> = (0..2 * MAX_MESSAGE_BYTES + 10).map(|i| i as u8).collect();
        Binary.write(&bytes, &mut queue);
        let sizes: Vec<usize> = queue.iter().map(Message::len).collect();
        assert_eq!(sizes, [MAX_MESSAGE_BYTES, MAX_MESSAGE_BYTES, 10]);
        let joined: Vec<u8> = queue.into_iter().flat_map(|m| m.into_data().to_vec()).collect();
        assert_eq!(joined, bytes);
    }

    #[tokio::test]
    async fn bytes_cross_as_binary_messages_and_text_is_refused() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let left = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let right = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        let (_, mut writer) = split(left, Binary, Binary);
        let (mut reader, _) = split(right, Binary, Binary);
        writer.write_all(b"one frame, ").await.ok();
        writer.write_all(b"then another").await.ok();
        writer.flush().await.ok();
        let mut got = vec![0u8; 23];
        reader.read_exact(&mut got).await.ok();
        assert_eq!(&got, b"one frame, then another");

        let (a, b) = tokio::io::duplex(1 << 16);
        let mut left = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
        let right = WebSocketStream::from_raw_socket(b, Role::Server, None).await;
        futures_util::SinkExt::send(&mut left, Message::text("hello")).await.ok();
        let (mut reader, _) = split(right, Binary, Binary);
        let err = reader.read(&mut [0u8; 8]).await.err().map(|e| e.kind());
        assert_eq!(err, Some(io::ErrorKind::InvalidData));
    }
}
