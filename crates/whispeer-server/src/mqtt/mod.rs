//! The MQTT listener (3.1.1 and 5): every MQTT client talks to the broker.
//!
//! An MQTT connection is served by the same reader and writer as a native one, through two
//! adapters around its socket: the reading one turns MQTT packets into native frames
//! (`session.rs` says which), the writing one turns the native frames the connection writes
//! into MQTT packets. So MQTT clients get the native path's authentication (the CONNECT
//! password is an API key or a JWT), ACLs, limits, bounded queues, QoS 1 credit and
//! redelivery, and metrics. The reading adapter also keeps MQTT's keep-alive (1.5 × the
//! client's interval) and publishes the will when the connection ends without DISCONNECT.
//!
//! Bad input ends the connection: a packet over the size limit is refused from its fixed header
//! (before it is buffered), a malformed one or one out of place is answered (MQTT 5) with
//! DISCONNECT and its reason code.

mod codec;
mod session;
mod sessions;

pub(crate) use sessions::MqttSessions;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use whispeer_core::Broker;
use whispeer_proto::{ErrorCode, Frame, Limits};

#[cfg(feature = "fuzzing")]
use self::codec::Version;
use self::codec::{CodecError, connect_version, decode, encode};
use self::session::{Registry, Session, Stage};
use super::adapter::AdapterError;
use super::{ServerConfig, connection};

/// MQTT bytes waiting for the socket before the writer stops taking frames.
const WRITE_HIGH: usize = 256 * 1024;

/// What both adapters share: the session, and how to wake the reader.
struct Shared {
    session: Session,
    reader: Option<Waker>,
}

fn lock(shared: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

fn fatal(code: ErrorCode, message: impl Into<String>) -> io::Error {
    io::Error::other(AdapterError::Fatal { code, message: message.into() })
}

/// Serves one MQTT connection, after TLS if configured.
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
        return serve(stream, peer, broker, config, stop).await;
    }
    serve(stream, peer, broker, config, stop).await;
}

async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    broker: Broker,
    config: Arc<ServerConfig>,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (read, write) = tokio::io::split(stream);
    serve_halves(read, write, peer, broker, config, stop).await;
}

/// Serves one MQTT connection over a byte stream's halves (a socket's, or a WebSocket's binary
/// messages at `/mqtt`).
pub(super) async fn serve_halves<R, W>(
    read: R,
    write: W,
    peer: SocketAddr,
    broker: Broker,
    config: Arc<ServerConfig>,
    stop: CancellationToken,
) where
    R: AsyncRead + Send + Unpin,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let limits = broker.options().limits.clone();
    // Its own stop: a second connection with the same client id takes the session over.
    let stop = stop.child_token();
    let sessions = Arc::clone(&config.mqtt_sessions);
    let connection = sessions.connection();
    let mut session = Session::new(limits.clone());
    let taken = CancellationToken::new();
    session.registry = Some(Registry {
        sessions: Arc::clone(&sessions),
        connection,
        stop: stop.clone(),
        taken,
        broker: broker.clone(),
        config: Arc::clone(&config),
    });
    let shared = Arc::new(Mutex::new(Shared { session, reader: None }));
    let on_end = Arc::clone(&shared);
    let reader = MqttReader {
        inner: read,
        shared: Arc::clone(&shared),
        buf: BytesMut::new(),
        out: BytesMut::new(),
        keep_alive: None,
        ended: false,
        error: None,
    };
    // The connection's own frames are trusted: no limit on their size here.
    let mut frame_limits = limits;
    frame_limits.max_frame_bytes = usize::MAX >> 1;
    frame_limits.max_message_bytes = usize::MAX >> 1;
    let writer = MqttWriter {
        inner: write,
        shared,
        frames: BytesMut::new(),
        out: BytesMut::new(),
        limits: frame_limits,
    };
    connection::run(reader, writer, peer, broker, config, stop).await;
    let mut shared = lock(&on_end);
    let client_id = shared.session.client_id().to_string();
    // A session over (not persistent, or its expiry set to zero): its groups go now.
    if !client_id.is_empty()
        && sessions.detach(&client_id, connection)
        && let Some(registry) = &shared.session.registry
    {
        registry.end_groups(&client_id, shared.session.session_filters());
    }
    shared.session.registry = None;
}

/// Reads MQTT packets off the socket and yields the native frames they stand for.
struct MqttReader<R> {
    inner: R,
    shared: Arc<Mutex<Shared>>,
    /// MQTT bytes read, not yet a whole packet.
    buf: BytesMut,
    /// Native frame bytes for the connection.
    out: BytesMut,
    keep_alive: Option<Pin<Box<Sleep>>>,
    /// The socket ended (or DISCONNECT came): after `out`, end of stream.
    ended: bool,
    /// Reported after `out` (the will) is read.
    error: Option<io::Error>,
}

impl<R: AsyncRead + Unpin> MqttReader<R> {
    /// Translates the whole packets in `buf`; an error ends the stream after the frames of
    /// the packets before it (and the will).
    fn translate(&mut self) -> io::Result<()> {
        match self.translate_packets() {
            // The will goes out too: the connection did not end with DISCONNECT.
            Err(err) => self.end(Some(err)),
            Ok(()) => Ok(()),
        }
    }

    fn translate_packets(&mut self) -> io::Result<()> {
        let mut shared = lock(&self.shared);
        loop {
            if shared.session.stage == Stage::AwaitConnect {
                match connect_version(&self.buf) {
                    Ok(Some(version)) => shared.session.version = version,
                    Ok(None) => return Ok(()),
                    Err(err) => return Err(fatal(ErrorCode::MALFORMED, err.to_string())),
                }
            }
            let version = shared.session.version;
            let max = shared.session.max_packet();
            let packet = match decode(version, &mut self.buf, max) {
                Ok(Some(packet)) => packet,
                Ok(None) => return Ok(()),
                Err(CodecError::TooLarge(size)) => {
                    let message = format!("an MQTT packet of {size} bytes; the limit is {max}");
                    return Err(fatal(ErrorCode::TOO_LARGE, message));
                }
                Err(err) => return Err(fatal(ErrorCode::MALFORMED, err.to_string())),
            };
            let disconnect = matches!(packet, codec::In::Disconnect { .. });
            let frames = shared.session.inbound(packet).map_err(|why| {
                fatal(ErrorCode::PROTOCOL_VIOLATION, format!("MQTT protocol error ({why:?})"))
            })?;
            for frame in frames {
                encode_frame(&frame, &mut self.out)?;
            }
            if disconnect {
                self.ended = true;
                return Ok(());
            }
        }
    }

    /// The socket ended: the will, if due, goes out before the end.
    fn end(&mut self, error: Option<io::Error>) -> io::Result<()> {
        self.ended = true;
        self.error = error;
        if let Some(will) = lock(&self.shared).session.will_frame() {
            encode_frame(&will, &mut self.out)?;
        }
        Ok(())
    }
}

fn encode_frame(frame: &Frame, out: &mut BytesMut) -> io::Result<()> {
    frame.encode(out, usize::MAX >> 1).map_err(|e| fatal(ErrorCode::INTERNAL, e.to_string()))
}

impl<R: AsyncRead + Unpin> AsyncRead for MqttReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            {
                let mut shared = lock(&this.shared);
                while let Some(frame) = shared.session.inject.pop_front() {
                    encode_frame(&frame, &mut this.out)?;
                }
                if shared.session.stage == Stage::Closing {
                    this.ended = true;
                }
                shared.reader = Some(cx.waker().clone());
                if this.keep_alive.is_none()
                    && shared.session.keep_alive > 0
                    && shared.session.stage != Stage::AwaitConnect
                {
                    let interval =
                        Duration::from_millis(u64::from(shared.session.keep_alive) * 1500);
                    this.keep_alive = Some(Box::pin(tokio::time::sleep(interval)));
                }
            }
            if !this.out.is_empty() {
                continue;
            }
            if this.ended {
                return Poll::Ready(this.error.take().map_or(Ok(()), Err));
            }
            this.translate()?;
            if !this.out.is_empty() || this.ended {
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let n = read.filled().len();
                    if n == 0 {
                        this.end(None)?;
                        continue;
                    }
                    this.buf.extend_from_slice(read.filled());
                    let keep_alive = lock(&this.shared).session.keep_alive;
                    if let Some(sleep) = this.keep_alive.as_mut() {
                        let interval = Duration::from_millis(u64::from(keep_alive) * 1500);
                        sleep.as_mut().reset(Instant::now() + interval);
                    }
                }
                Poll::Ready(Err(err)) => this.end(Some(err))?,
                Poll::Pending => {
                    if let Some(sleep) = this.keep_alive.as_mut()
                        && sleep.as_mut().poll(cx).is_ready()
                    {
                        let message = "no MQTT packet within 1.5 times the keep-alive";
                        this.end(Some(fatal(ErrorCode::IDLE_TIMEOUT, message)))?;
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Takes the native frames the connection writes and writes the MQTT packets they stand for.
struct MqttWriter<W> {
    inner: W,
    shared: Arc<Mutex<Shared>>,
    /// Native frame bytes, not yet a whole frame.
    frames: BytesMut,
    /// MQTT bytes for the socket.
    out: BytesMut,
    limits: Limits,
}

impl<W: AsyncWrite + Unpin> MqttWriter<W> {
    fn flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.out) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.out.advance(n),
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for MqttWriter<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.out.len() >= WRITE_HIGH {
            match this.flush_out(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending if this.out.len() >= WRITE_HIGH => return Poll::Pending,
                Poll::Pending => {}
            }
        }
        this.frames.extend_from_slice(buf);
        {
            let mut shared = lock(&this.shared);
            loop {
                let frame = match Frame::decode(&mut this.frames, &this.limits) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(err) => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            err.to_string(),
                        )));
                    }
                };
                let (version, max) = (shared.session.version, shared.session.client_max_packet());
                for packet in shared.session.outbound(frame) {
                    encode(version, packet, &mut this.out, max);
                }
            }
            let wake = !shared.session.inject.is_empty() || shared.session.stage == Stage::Closing;
            if wake && let Some(reader) = shared.reader.take() {
                reader.wake();
            }
        }
        if let Poll::Ready(Err(err)) = this.flush_out(cx) {
            return Poll::Ready(Err(err));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.flush_out(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_flush(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.flush_out(cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut self.inner).poll_shutdown(cx),
            other => other,
        }
    }
}

/// For the fuzz target: decodes `data` as a client's packets (3.1.1, or 5 when `v5`) with the
/// default size limit, and translates each; never panics.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz_packets(data: &[u8], v5: bool) {
    let version = if v5 { Version::V5 } else { Version::V4 };
    let mut session = Session::new(Limits::DEFAULT);
    session.version = version;
    let mut buf = BytesMut::from(data);
    while let Ok(Some(packet)) = decode(version, &mut buf, Limits::DEFAULT.max_frame_bytes) {
        if session.inbound(packet).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use whispeer_proto::Limits;

    use super::codec::{Version, decode};
    use super::session::Session;

    /// Bytes from a fixed generator: the decoder and the translation never panic on them, a
    /// valid CONNECT first or not.
    #[test]
    fn garbage_never_panics_the_decoder_or_the_session() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let connect = [0x10u8, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 0];
        for round in 0..20_000 {
            let length = (next() % 64) as usize;
            let mut data: Vec<u8> = (0..length).map(|_| next() as u8).collect();
            if round % 2 == 0 {
                data.splice(0..0, connect);
            }
            for version in [Version::V4, Version::V5] {
                let mut session = Session::new(Limits::DEFAULT);
                session.version = version;
                let mut buf = BytesMut::from(&data[..]);
                while let Ok(Some(packet)) = decode(version, &mut buf, 1 << 20) {
                    if session.inbound(packet).is_err() {
                        break;
                    }
                }
            }
        }
    }
}
