//! Byte streams to a server, behind one pair of `AsyncRead` / `AsyncWrite` halves: TCP
//! (`host:port` or `tcp://host:port`), TLS over TCP (`tls://host:port`), WebSocket
//! (`ws://host:port/ws`) and WebSocket over TLS (`wss://host:port/ws`).
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
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use rustls_pki_types::ServerName;
use tokio_rustls::{TlsConnector, rustls};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::http::Uri;

pub(crate) type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub(crate) type Writer = Box<dyn AsyncWrite + Send + Unpin>;

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.to_string())
}

/// Connects TCP with `TCP_NODELAY`: small frames must not wait for Nagle's algorithm and
/// delayed acknowledgements (about 40 ms each).
async fn tcp(host: &str, port: u16) -> io::Result<TcpStream> {
    let stream = TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Wraps `stream` in TLS for `host`.
async fn tls(
    stream: TcpStream,
    host: &str,
    config: Option<&Arc<rustls::ClientConfig>>,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let platform;
    let config = match config {
        Some(config) => config,
        None => {
            platform = crate::platform_tls_config().map_err(|e| invalid(&e.to_string()))?;
            &platform
        }
    };
    let name =
        ServerName::try_from(host.to_string()).map_err(|_| invalid("invalid server name"))?;
    TlsConnector::from(Arc::clone(config)).connect(name, stream).await
}

fn split<S: AsyncRead + AsyncWrite + Send + 'static>(stream: S) -> (Reader, Writer) {
    let (reader, writer) = tokio::io::split(stream);
    (Box::new(reader), Box::new(writer))
}

async fn websocket<S>(url: &str, stream: S) -> io::Result<(Reader, Writer)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (ws, _response) =
        tokio_tungstenite::client_async(url, stream).await.map_err(io::Error::other)?;
    let (sink, stream) = ws.split();
    let reader = WsReader { stream, pending: Bytes::new(), done: false };
    Ok((Box::new(reader), Box::new(WsWriter { sink, queue: VecDeque::new() })))
}

/// Opens a connection to `addr`.
pub(crate) async fn open(
    addr: &str,
    tls_config: Option<&Arc<rustls::ClientConfig>>,
) -> io::Result<(Reader, Writer)> {
    let (scheme, rest) = addr.split_once("://").unwrap_or(("tcp", addr));
    match scheme {
        "tcp" | "tls" => {
            let (host, port) =
                rest.rsplit_once(':').ok_or_else(|| invalid("expected host:port"))?;
            let port = port.parse().map_err(|_| invalid("invalid port"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let stream = tcp(host, port).await?;
            if scheme == "tls" {
                return Ok(split(tls(stream, host, tls_config).await?));
            }
            let (reader, writer) = stream.into_split();
            Ok((Box::new(reader), Box::new(writer)))
        }
        "ws" | "wss" => {
            let uri: Uri = addr.parse().map_err(|_| invalid("invalid WebSocket URL"))?;
            let host = uri.host().ok_or_else(|| invalid("no host in the WebSocket URL"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let default_port = if scheme == "wss" { 443 } else { 80 };
            let stream = tcp(host, uri.port_u16().unwrap_or(default_port)).await?;
            if scheme == "wss" {
                return websocket(addr, tls(stream, host, tls_config).await?).await;
            }
            websocket(addr, stream).await
        }
        _ => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "use host:port, tcp://, tls://, ws:// or wss://",
        )),
    }
}

/// Reads incoming binary messages as one byte stream.
struct WsReader<S> {
    stream: SplitStream<WebSocketStream<S>>,
    pending: Bytes,
    done: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsReader<S> {
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
struct WsWriter<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
    queue: VecDeque<Message>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsWriter<S> {
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
