//! WebSocket transport: the binary protocol's frames carried in binary WebSocket messages.
//!
//! After the HTTP upgrade (only on the configured path), the connection is served by the same
//! reader and writer as TCP, through two adapters. The first message fixes the connection's
//! mode:
//! - binary: incoming messages are read as one byte stream (frames may span messages), and each
//!   batch the writer writes goes out as one binary message;
//! - text: each message is a JSON request (see `json.rs`) translated into its frame, and each
//!   frame the writer writes goes out as one JSON text message. A JSON client need not say hello.
//!
//! Mixing modes on one connection, or a malformed JSON request, closes it with `MALFORMED`.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use whispeer_proto::{Body, Frame, Limits};

use super::json::{JsonIds, frame_to_json, request_to_frame};
use super::{ServerConfig, connection};
use crate::Broker;

/// The connection's mode, set by its first message.
const UNKNOWN: u8 = 0;
const BINARY: u8 = 1;
const JSON: u8 = 2;

/// Upgrades the connection (on `config.websocket_path` only), after TLS if configured, and
/// serves it.
pub(super) async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Broker,
    config: Arc<ServerConfig>,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    #[cfg(feature = "tls")]
    if let Some(tls) = &config.tls {
        let Some(stream) = super::tls::accept(tls, stream, peer, config.idle_timeout()).await
        else {
            return;
        };
        return upgrade_and_serve(stream, peer, broker, config, stop).await;
    }
    upgrade_and_serve(stream, peer, broker, config, stop).await;
}

async fn upgrade_and_serve<S>(
    stream: S,
    peer: SocketAddr,
    broker: Broker,
    config: Arc<ServerConfig>,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &broker.options().limits;
    let mut ws_config = WebSocketConfig::default();
    // A message never needs to be larger than the largest frame plus its length prefix.
    ws_config.max_message_size = Some(limits.max_frame_bytes + 4);
    ws_config.max_frame_size = Some(limits.max_frame_bytes + 4);
    let path = config.websocket_path.clone();
    #[expect(
        clippy::result_large_err,
        reason = "tungstenite's handshake callback returns this type"
    )]
    let check_path = |request: &Request, response: Response| -> Result<Response, ErrorResponse> {
        if request.uri().path() == path {
            return Ok(response);
        }
        let mut refusal =
            ErrorResponse::new(Some(format!("no WebSocket endpoint at {}", request.uri().path())));
        *refusal.status_mut() = StatusCode::NOT_FOUND;
        Err(refusal)
    };
    let upgrade =
        tokio_tungstenite::accept_hdr_async_with_config(stream, check_path, Some(ws_config));
    let ws = match tokio::time::timeout(config.idle_timeout(), upgrade).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(err)) => {
            tracing::debug!(%peer, %err, "WebSocket upgrade refused");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "WebSocket upgrade timed out");
            return;
        }
    };
    let (sink, stream) = ws.split();
    let mode = Arc::new(AtomicU8::new(UNKNOWN));
    let reader = WsReader {
        stream,
        pending: Bytes::new(),
        done: false,
        mode: Arc::clone(&mode),
        limits: broker.options().limits.clone(),
        ids: JsonIds::new(),
    };
    let writer = WsWriter { sink, queue: VecDeque::new(), mode };
    connection::run(reader, writer, peer, broker, config, stop).await;
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Reads incoming messages as one byte stream of frames.
struct WsReader<S> {
    stream: SplitStream<WebSocketStream<S>>,
    pending: Bytes,
    done: bool,
    mode: Arc<AtomicU8>,
    limits: Limits,
    ids: JsonIds,
}

impl<S> WsReader<S> {
    /// Records the mode the first message sets; refuses a message of the other kind.
    fn enter(&self, wanted: u8) -> io::Result<bool> {
        match self.mode.compare_exchange(UNKNOWN, wanted, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Ok(true),
            Err(current) if current == wanted => Ok(false),
            Err(_) => {
                Err(invalid("binary and text (JSON) messages cannot be mixed on one connection"))
            }
        }
    }

    /// The frame bytes a JSON request stands for (after an implicit HELLO for the first one).
    fn translate(&self, text: &str, first: bool) -> io::Result<Bytes> {
        let frame =
            request_to_frame(text, &self.limits, &self.ids).map_err(|e| invalid(e.to_string()))?;
        let mut bytes = BytesMut::new();
        if first && !matches!(frame.body, Body::Hello { .. }) {
            let hello = Frame::new(
                1,
                Body::Hello {
                    version: whispeer_proto::PROTOCOL_VERSION,
                    capabilities: 0,
                    name: "json".into(),
                },
            );
            hello.encode(&mut bytes, usize::MAX).map_err(|e| invalid(e.to_string()))?;
        }
        frame
            .encode(&mut bytes, self.limits.max_frame_bytes)
            .map_err(|e| invalid(e.to_string()))?;
        Ok(bytes.freeze())
    }
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
                Some(Ok(Message::Binary(bytes))) => {
                    self.enter(BINARY)?;
                    self.pending = bytes;
                }
                Some(Ok(Message::Text(text))) => {
                    let first = self.enter(JSON)?;
                    self.pending = self.translate(text.as_str(), first)?;
                }
                // tungstenite answers pings itself; pongs and raw frames carry nothing for us.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => self.done = true,
                Some(Err(err)) => return Poll::Ready(Err(io::Error::other(err))),
            }
        }
    }
}

/// Sends what the connection writes: each write as one binary message, or, for a JSON client,
/// each frame in it as one JSON text message. Messages wait in `queue` until flushed.
struct WsWriter<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
    queue: VecDeque<Message>,
    mode: Arc<AtomicU8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsWriter<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // The writer flushes after every batch, so the queue holds at most one batch.
        if self.mode.load(Ordering::Acquire) == JSON {
            let mut frames = BytesMut::from(buf);
            let mut limits = Limits::default();
            limits.max_frame_bytes = usize::MAX;
            while let Ok(Some(frame)) = Frame::decode(&mut frames, &limits) {
                self.queue.push_back(Message::text(frame_to_json(&frame).to_string()));
            }
        } else {
            self.queue.push_back(Message::Binary(Bytes::copy_from_slice(buf)));
        }
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
