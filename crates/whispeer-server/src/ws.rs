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
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;
use whispeer_transport::{Incoming, Outgoing};

use whispeer_proto::{Body, ErrorCode, Frame, Limits};

use super::adapter::AdapterError;
use super::json::{JsonError, JsonIds, frame_to_json, request_to_frame};
use super::{ServerConfig, connection};
use whispeer_core::Broker;

/// Where MQTT clients connect on the WebSocket listener (subprotocol `mqtt`).
#[cfg(feature = "mqtt")]
pub(crate) const MQTT_PATH: &str = "/mqtt";

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
    // Set when an over-size message is refused: the socket then lingers as it closes.
    let close = Arc::new(OnceLock::new());
    let stream = Lingering { stream: Some(stream), close: Arc::clone(&close) };
    #[cfg(feature = "tls")]
    if let Some(tls) = &config.tls {
        let Some(stream) = super::tls::accept(tls, stream, peer, config.idle_timeout()).await
        else {
            return;
        };
        return upgrade_and_serve(stream, peer, broker, config, stop, close).await;
    }
    upgrade_and_serve(stream, peer, broker, config, stop, close).await;
}

/// Most bytes read and dropped after refusing an over-size message, and for how long.
const LINGER_BYTES: usize = 64 << 20;
const LINGER: Duration = Duration::from_secs(2);

/// A connection's socket. Dropped after an over-size message was refused (its close frame is
/// set), it is not closed at once but handed to `linger` on the runtime: closing with the rest
/// of that message unread would reset the connection, and the peer would lose the error and
/// the close frame written just before. Below TLS, so both paths share it.
struct Lingering {
    stream: Option<TcpStream>,
    close: Arc<OnceLock<CloseFrame>>,
}

impl Lingering {
    fn stream(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        self.stream.as_mut().map(Pin::new).ok_or_else(|| io::ErrorKind::NotConnected.into())
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream()?.poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream()?.poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream()?.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream()?.poll_shutdown(cx)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        if self.close.get().is_none() {
            return;
        }
        if let (Some(stream), Ok(runtime)) = (self.stream.take(), Handle::try_current()) {
            runtime.spawn(linger(stream));
        }
    }
}

/// Sends FIN, then reads and drops what arrives until the peer closes, for a bounded time and
/// size.
async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut scratch = vec![0u8; 64 * 1024];
    let drain = async {
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// Upgrades and serves the connection.
async fn upgrade_and_serve<S>(
    stream: S,
    peer: SocketAddr,
    broker: Broker,
    config: Arc<ServerConfig>,
    stop: CancellationToken,
    close: Arc<OnceLock<CloseFrame>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = &broker.options().limits;
    let mut ws_config = WebSocketConfig::default();
    // A message never needs to be larger than the largest frame plus its length prefix.
    ws_config.max_message_size = Some(limits.max_frame_bytes + 4);
    ws_config.max_frame_size = Some(limits.max_frame_bytes + 4);
    let path = config.websocket_path.clone();
    #[cfg(feature = "relay")]
    let relay = Arc::new(std::sync::atomic::AtomicBool::new(false));
    #[cfg(feature = "relay")]
    let (is_relay, relay_auth) = (Arc::clone(&relay), Arc::clone(&config));
    #[cfg(feature = "mqtt")]
    let mqtt = Arc::new(std::sync::atomic::AtomicBool::new(false));
    #[cfg(feature = "mqtt")]
    let is_mqtt = Arc::clone(&mqtt);
    #[expect(
        clippy::result_large_err,
        reason = "tungstenite's handshake callback returns this type"
    )]
    let check_path = move |request: &Request,
                           response: Response|
          -> Result<Response, ErrorResponse> {
        if request.uri().path() == path {
            return Ok(response);
        }
        #[cfg(feature = "relay")]
        if request.uri().path() == super::relay::RELAY_PATH && relay_auth.relay.is_some() {
            super::relay::admit(request, &relay_auth)?;
            is_relay.store(true, Ordering::Release);
            return Ok(response);
        }
        #[cfg(feature = "mqtt")]
        if request.uri().path() == MQTT_PATH {
            // MQTT over WebSocket: the subprotocol is `mqtt`, echoed when the client offers it.
            let offered = request.headers().get_all("sec-websocket-protocol").iter().any(|value| {
                value
                    .to_str()
                    .is_ok_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("mqtt")))
            });
            let mut response = response;
            if offered {
                let mqtt = tokio_tungstenite::tungstenite::http::HeaderValue::from_static("mqtt");
                response.headers_mut().insert("sec-websocket-protocol", mqtt);
            }
            is_mqtt.store(true, Ordering::Release);
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
    #[cfg(feature = "relay")]
    if let (true, Some(hub)) = (relay.load(Ordering::Acquire), &config.relay) {
        return super::relay::serve(ws, peer, Arc::clone(hub), stop).await;
    }
    #[cfg(feature = "mqtt")]
    if mqtt.load(Ordering::Acquire) {
        let (reader, writer) =
            whispeer_transport::split(ws, whispeer_transport::Binary, whispeer_transport::Binary);
        return super::mqtt::serve_halves(reader, writer, peer, broker, config, stop).await;
    }
    let mode = Arc::new(AtomicU8::new(UNKNOWN));
    let inbound = Inbound {
        mode: Arc::clone(&mode),
        limits: broker.options().limits.clone(),
        ids: JsonIds::new(),
        greeted: false,
        close: Arc::clone(&close),
    };
    let outbound = Outbound { mode, close: Arc::clone(&close) };
    let (reader, writer) = whispeer_transport::split(ws, inbound, outbound);
    connection::run(reader, writer, peer, broker, config, stop).await;
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// What arrives: binary messages carry frames; text messages are JSON requests, each
/// translated into its frame. The first message fixes the mode.
struct Inbound {
    mode: Arc<AtomicU8>,
    limits: Limits,
    ids: JsonIds,
    /// Whether a HELLO went to the connection (a JSON client's is implied by its first request
    /// that becomes a frame).
    greeted: bool,
    /// The close frame the writer sends last, when the reader ends the connection.
    close: Arc<OnceLock<CloseFrame>>,
}

impl Inbound {
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

impl Incoming for Inbound {
    fn binary(&mut self, bytes: Bytes) -> io::Result<Bytes> {
        self.enter(BINARY)?;
        Ok(bytes)
    }

    fn text(&mut self, text: Utf8Bytes) -> io::Result<Bytes> {
        self.enter(JSON)?;
        self.translate(text.as_str())
    }

    fn error(&mut self, err: WsError) -> io::Error {
        let WsError::Capacity(CapacityError::MessageTooLong { size, max_size }) = err else {
            return io::Error::other(err);
        };
        // The rest of the message is still unread: nothing more can be read, but the error and
        // the close frame can still be written.
        let message =
            format!("WebSocket message of {size} bytes exceeds the limit of {max_size} bytes");
        let reason = format!("message too big: the limit is {max_size} bytes");
        let _ =
            self.close.set(CloseFrame { code: CloseCode::Size, reason: Utf8Bytes::from(reason) });
        AdapterError::Fatal { code: ErrorCode::TOO_LARGE, message }.into_io()
    }
}

/// What goes out: each write as one binary message, or, for a JSON client, each frame in it as
/// one JSON text message; a close frame with a code last, when the reader set one.
struct Outbound {
    mode: Arc<AtomicU8>,
    close: Arc<OnceLock<CloseFrame>>,
}

impl Outgoing for Outbound {
    fn write(&mut self, buf: &[u8], queue: &mut VecDeque<Message>) {
        if self.mode.load(Ordering::Acquire) != JSON {
            queue.push_back(Message::Binary(Bytes::copy_from_slice(buf)));
            return;
        }
        let mut frames = BytesMut::from(buf);
        let mut limits = Limits::default();
        limits.max_frame_bytes = usize::MAX;
        while let Ok(Some(frame)) = Frame::decode(&mut frames, &limits) {
            queue.push_back(Message::text(frame_to_json(&frame).to_string()));
        }
    }

    fn closing(&mut self) -> Option<Message> {
        self.close.get().cloned().map(|frame| Message::Close(Some(frame)))
    }
}
