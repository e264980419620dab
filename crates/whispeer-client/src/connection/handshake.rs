//! Connecting: the first node of the options' addresses that answers, the `Hello` / `Welcome`
//! handshake (and `Auth`), and reading one frame at a time until it is done.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use whispeer_proto::{
    Body, CAP_COMPACT_DELIVER, CAP_COMPACT_PUBLISH, ErrorCode, Frame, Limits, PROTOCOL_VERSION,
    reserve_for_read,
};

use super::encode;
use crate::transport::{self, Reader, Writer};
use crate::{ClientError, ClientOptions};

/// A connection after the handshake.
pub(crate) struct Established {
    /// Which of the options' addresses this is (0: `addr`).
    pub(super) node: usize,
    pub(super) reader: Reader,
    pub(super) writer: Writer,
    pub(super) leftover: BytesMut,
    pub(super) heartbeat: Duration,
    pub(crate) max_frame_bytes: usize,
    pub(crate) max_message_bytes: usize,
    /// The server reads PUBLISH_COMPACT frames (its WELCOME said so).
    pub(crate) compact_publish: bool,
}

impl Established {
    /// Sets `outbox` for this connection (its frame limit, whether it writes vectored, whether
    /// its server reads compact publishes) before anything is published on it: the client's
    /// first connection, set before the client is handed out. The connection task sets every
    /// later one.
    pub(crate) fn prepare(&self, outbox: &super::Outbox) {
        let vectored = self.writer.is_write_vectored();
        outbox.set_connection(self.max_frame_bytes, vectored, self.compact_publish);
    }
}

/// Connects to the first of the options' addresses that answers (`addr`, then the failover
/// nodes in order); the error of the last one tried if none does.
pub(crate) async fn connect_any(options: &ClientOptions) -> Result<Established, ClientError> {
    let mut failed = None;
    for node in 0..options.addresses().count() {
        match handshake(options, node).await {
            Ok(established) => return Ok(established),
            Err(err) => {
                tracing::debug!(%err, "cannot connect; trying the next node");
                failed = Some(err);
            }
        }
    }
    Err(failed.unwrap_or(ClientError::Closed))
}

/// Connects to address `node` of the options, sends `Hello` (and `Auth`), and waits for
/// `Welcome` (and the auth reply).
pub(super) async fn handshake(
    options: &ClientOptions,
    node: usize,
) -> Result<Established, ClientError> {
    let limit = options.connect_timeout;
    let addr = options.addresses().nth(node).unwrap_or(&options.addr);
    timeout(limit, handshake_inner(options, node, addr))
        .await
        .map_err(|_| ClientError::Timeout(limit))?
}

async fn handshake_inner(
    options: &ClientOptions,
    node: usize,
    addr: &str,
) -> Result<Established, ClientError> {
    let connect_error = |source| ClientError::Connect { addr: addr.to_string(), source };
    let (mut reader, mut writer) =
        transport::open(addr, options.tls.as_ref()).await.map_err(connect_error)?;
    let mut out = BytesMut::new();
    // Compact deliveries: a server that does not know them says nothing and sends DELIVERs.
    let (capabilities, name) = (CAP_COMPACT_DELIVER, options.name.clone());
    let hello = Body::Hello { version: PROTOCOL_VERSION, capabilities, name };
    encode(&Frame::new(1, hello), &mut out, usize::MAX)?;
    if let Some(key) = &options.api_key {
        encode(
            &Frame::new(2, Body::Auth { key: key.clone().into_bytes().into() }),
            &mut out,
            usize::MAX,
        )?;
    }
    writer.write_all(&out).await.map_err(connect_error)?;
    writer.flush().await.map_err(connect_error)?;

    let mut buf = BytesMut::new();
    let mut welcome = None;
    let mut authed = options.api_key.is_none();
    while welcome.is_none() || !authed {
        let frame = read_frame(&mut reader, &mut buf, &options.limits).await?;
        match (frame.correlation, frame.body) {
            (
                1,
                Body::Welcome {
                    version,
                    capabilities,
                    max_frame_bytes,
                    max_message_bytes,
                    heartbeat_ms,
                    ..
                },
            ) => {
                if version != PROTOCOL_VERSION {
                    return Err(ClientError::Protocol(format!("server speaks version {version}")));
                }
                if capabilities & 1 != 0 && options.api_key.is_none() {
                    let message = "the server requires an API key".to_string();
                    return Err(ClientError::Server { code: ErrorCode::UNAUTHENTICATED, message });
                }
                let compact = capabilities & CAP_COMPACT_PUBLISH != 0;
                let limits = (max_frame_bytes as usize, max_message_bytes as usize);
                welcome = Some((limits, heartbeat_ms, compact));
            }
            (2, Body::Ok) => authed = true,
            (_, Body::Error { code, message }) => {
                return Err(ClientError::Server { code, message });
            }
            (_, Body::Ping) => {}
            (_, other) => {
                return Err(ClientError::Protocol(format!(
                    "unexpected frame during handshake: {other:?}"
                )));
            }
        }
    }
    let ((max_frame_bytes, max_message_bytes), heartbeat_ms, compact_publish) =
        welcome.unwrap_or(((0, 0), 0, false));
    Ok(Established {
        node,
        reader,
        writer,
        leftover: buf,
        heartbeat: Duration::from_millis(u64::from(heartbeat_ms).max(100)),
        max_frame_bytes,
        max_message_bytes,
        compact_publish,
    })
}

/// Whether `bytes` start like a TLS record (a handshake or an alert, TLS 1.0 to 1.3): what a
/// TLS server answers a plain client with, read as a frame's length it is absurdly large.
fn looks_like_tls(bytes: &[u8]) -> bool {
    matches!(bytes, [0x15 | 0x16, 0x03, 0x00..=0x04, ..])
}

async fn read_frame(
    stream: &mut Reader,
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Frame, ClientError> {
    loop {
        match Frame::decode(buf, limits) {
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
            Err(_) if looks_like_tls(buf) => {
                return Err(ClientError::Protocol(
                    "this server speaks TLS: use tls:// (or wss:// for WebSocket)".into(),
                ));
            }
            Err(err) => return Err(ClientError::Protocol(err.to_string())),
        }
        reserve_for_read(buf);
        match stream.read_buf(buf).await {
            Ok(0) => return Err(ClientError::Disconnected),
            Ok(_) => {}
            Err(_) => return Err(ClientError::Disconnected),
        }
    }
}
