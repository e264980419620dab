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
//! Mixing modes on one connection, or a malformed JSON request, closes it with `MALFORMED`; a
//! JSON request naming an invalid topic is refused alone with `INVALID_TOPIC`. A message over
//! the size limit is answered with `TOO_LARGE`, then a close frame with code 1009 (message too
//! big) and the limit as its reason.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use whispeer_proto::{Body, ErrorCode, Frame, Limits};

use super::adapter::AdapterError;
use super::json::{JsonError, JsonIds, frame_to_json, request_to_frame};
use super::{ServerConfig, connection};
use whispeer_core::Broker;

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
    let (stream, spare) = match with_spare(stream) {
        Ok(pair) => pair,
        Err(err) => {
            tracing::debug!(%peer, %err, "cannot take the socket's handle");
            return;
        }
    };
    #[cfg(feature = "tls")]
    if let Some(tls) = &config.tls {
        let Some(stream) = super::tls::accept(tls, stream, peer, config.idle_timeout()).await
        else {
            return;
        };
        if upgrade_and_serve(stream, peer, broker, config, stop).await {
            linger(spare).await;
        }
        return;
    }
    if upgrade_and_serve(stream, peer, broker, config, stop).await {
        linger(spare).await;
    }
}

/// Most bytes read and dropped after refusing an over-size message, and for how long.
const LINGER_BYTES: usize = 64 << 20;
const LINGER: Duration = Duration::from_secs(2);

/// The stream and a second handle on its socket, which keeps it open after the stream is gone.
fn with_spare(stream: TcpStream) -> io::Result<(TcpStream, std::net::TcpStream)> {
    let stream = stream.into_std()?;
    let spare = stream.try_clone()?;
    Ok((TcpStream::from_std(stream)?, spare))
}

/// Closes a socket whose peer may still be sending (the rest of a refused over-size message):
/// sends FIN, then reads and drops what arrives until the peer closes, for a bounded time and
/// size. Closing with unread data would reset the connection, and the peer would lose the error
/// and the close frame written just before.
async fn linger(spare: std::net::TcpStream) {
    let _ = spare.shutdown(std::net::Shutdown::Write);
    let Ok(mut spare) = TcpStream::from_std(spare) else { return };
    let mut scratch = vec![0u8; 64 * 1024];
    let drain = async {
        let mut left = LINGER_BYTES;
        while left > 0 {
            match spare.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Serves the connection; `true` when it ended by refusing an over-size message.
async fn upgrade_and_serve<S>(
    stream: S,
    peer: SocketAddr,
    broker: Broker,
    config: Arc<ServerConfig>,
    stop: CancellationToken,
) -> bool
where
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
            return false;
        }
        Err(_) => {
            tracing::debug!(%peer, "WebSocket upgrade timed out");
            return false;
        }
    };
    let (sink, stream) = ws.split();
    let mode = Arc::new(AtomicU8::new(UNKNOWN));
    let close = Arc::new(OnceLock::new());
    let reader = WsReader {
        stream,
        pending: Bytes::new(),
        done: false,
        mode: Arc::clone(&mode),
        limits: broker.options().limits.clone(),
        ids: JsonIds::new(),
        greeted: false,
        close: Arc::clone(&close),
    };
    let writer =
        WsWriter { sink, queue: VecDeque::new(), mode, close: Arc::clone(&close), closing: false };
    connection::run(reader, writer, peer, broker, config, stop).await;
    close.get().is_some()
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
    /// Whether a HELLO went to the connection (a JSON client's is implied by its first request
    /// that becomes a frame).
    greeted: bool,
    /// The close frame the writer sends last, when the reader ends the connection.
    close: Arc<OnceLock<CloseFrame>>,
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
    fn translate(&mut self, text: &str) -> io::Result<Bytes> {
        let frame = request_to_frame(text, &self.limits, &self.ids).map_err(|err| match err {
            JsonError::Topic(correlation, _) => {
                let message = err.to_string();
                AdapterError::Refused { correlation, code: ErrorCode::INVALID_TOPIC, message }
                    .into_io()
            }
            other => invalid(other.to_string()),
        })?;
        let mut bytes = BytesMut::new();
        let first = !std::mem::replace(&mut self.greeted, true);
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
                    self.enter(JSON)?;
                    self.pending = self.translate(text.as_str())?;
                }
                // tungstenite answers pings itself; pongs and raw frames carry nothing for us.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => self.done = true,
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                    // The rest of the message is still unread: nothing more can be read, but
                    // the error and the close frame can still be written.
                    self.done = true;
                    let message = format!(
                        "WebSocket message of {size} bytes exceeds the limit of {max_size} bytes"
                    );
                    let reason = format!("message too big: the limit is {max_size} bytes");
                    let _ = self
                        .close
                        .set(CloseFrame { code: CloseCode::Size, reason: Utf8Bytes::from(reason) });
                    let fatal = AdapterError::Fatal { code: ErrorCode::TOO_LARGE, message };
                    return Poll::Ready(Err(fatal.into_io()));
                }
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
    /// A close frame with a code, sent last when set (otherwise closing sends a bare one).
    close: Arc<OnceLock<CloseFrame>>,
    closing: bool,
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
        if !self.closing {
            self.closing = true;
            if let Some(frame) = self.close.get().cloned() {
                self.queue.push_back(Message::Close(Some(frame)));
            }
        }
        ready!(self.as_mut().poll_flush(cx))?;
        Pin::new(&mut self.sink).poll_close(cx).map_err(io::Error::other)
    }
}
