//! Byte streams to a server: TCP (`host:port` or `tcp://host:port`) or WebSocket
//! (`ws://host:port/ws`), behind one pair of `AsyncRead` / `AsyncWrite` halves.
//!
//! Over WebSocket the frames travel in binary messages: incoming messages are read as one byte
//! stream, and each write goes out as one message when the writer is flushed.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub(crate) type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Opens a connection to `addr`.
pub(crate) async fn open(addr: &str) -> io::Result<(Reader, Writer)> {
    if addr.starts_with("ws://") {
        // Connect the socket ourselves: without TCP_NODELAY, small messages wait for Nagle's
        // algorithm and delayed acknowledgements (about 40 ms each).
        let invalid =
            |message: &str| io::Error::new(io::ErrorKind::InvalidInput, message.to_string());
        let uri: Uri = addr.parse().map_err(|_| invalid("invalid WebSocket URL"))?;
        let host = uri.host().ok_or_else(|| invalid("no host in the WebSocket URL"))?;
        let tcp = TcpStream::connect((host, uri.port_u16().unwrap_or(80))).await?;
        tcp.set_nodelay(true)?;
        let (ws, _response) = tokio_tungstenite::client_async(addr, MaybeTlsStream::Plain(tcp))
            .await
            .map_err(io::Error::other)?;
        let (sink, stream) = ws.split();
        let reader = WsReader { stream, pending: Bytes::new(), done: false };
        return Ok((Box::new(reader), Box::new(WsWriter { sink, queue: VecDeque::new() })));
    }
    if addr.contains("://") && !addr.starts_with("tcp://") {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "use host:port, tcp://host:port or ws://host:port/path",
        ));
    }
    let stream = TcpStream::connect(addr.trim_start_matches("tcp://")).await?;
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    Ok((Box::new(reader), Box::new(writer)))
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Reads incoming binary messages as one byte stream.
struct WsReader {
    stream: SplitStream<Ws>,
    pending: Bytes,
    done: bool,
}

impl AsyncRead for WsReader {
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
            match ready!(Pin::new(&mut self.stream).poll_next(cx)) {
                Some(Ok(Message::Binary(bytes))) => self.pending = bytes,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "unexpected text message",
                    )));
                }
                Some(Ok(Message::Close(_))) | None => self.done = true,
                Some(Ok(_)) => {}
                Some(Err(err)) => return Poll::Ready(Err(io::Error::other(err))),
            }
        }
    }
}

/// Queues each write as one binary message; sends them when flushed.
struct WsWriter {
    sink: SplitSink<Ws, Message>,
    queue: VecDeque<Message>,
}

impl AsyncWrite for WsWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.queue.push_back(Message::Binary(Bytes::copy_from_slice(buf)));
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
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.sink).poll_close(cx).map_err(io::Error::other)
    }
}
