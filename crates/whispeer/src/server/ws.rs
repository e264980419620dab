//! WebSocket transport: the binary protocol's frames carried in binary WebSocket messages.
//!
//! After the HTTP upgrade (only on the configured path), the connection is served by the same
//! reader and writer as TCP, through two adapters: incoming binary messages are read as one
//! byte stream, and each batch the writer writes goes out as one binary message. Frames may span
//! messages and a message may hold many frames. Text messages (the JSON form for plain clients)
//! are not supported yet: the connection is closed.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
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

use super::{ServerConfig, connection};
use crate::Broker;

type Ws = WebSocketStream<TcpStream>;

/// Upgrades the connection (on `config.websocket_path` only) and serves it.
pub(super) async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Broker,
    config: Arc<ServerConfig>,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
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
    let reader = WsReader { stream, pending: Bytes::new(), done: false };
    connection::run(reader, WsWriter { sink }, peer, broker, config, stop).await;
}

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
                // tungstenite answers pings itself; pongs and raw frames carry nothing for us.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text (JSON) WebSocket messages are not supported yet; send binary frames",
                    )));
                }
                Some(Ok(Message::Close(_))) | None => self.done = true,
                Some(Err(err)) => return Poll::Ready(Err(io::Error::other(err))),
            }
        }
    }
}

/// Sends each write as one binary message.
struct WsWriter {
    sink: SplitSink<Ws, Message>,
}

impl AsyncWrite for WsWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.sink).poll_ready(cx)).map_err(io::Error::other)?;
        Pin::new(&mut self.sink)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.sink).poll_flush(cx).map_err(io::Error::other)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.sink).poll_close(cx).map_err(io::Error::other)
    }
}
