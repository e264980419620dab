//! Byte streams to a server, behind one pair of `AsyncRead` / `AsyncWrite` halves: TCP
//! (`host:port` or `tcp://host:port`), TLS over TCP (`tls://host:port`), WebSocket
//! (`ws://host:port/ws`) and WebSocket over TLS (`wss://host:port/ws`).
//!
//! Over WebSocket the frames travel in binary messages, read and written as one byte stream by
//! `whispeer-transport` (shared with the server).

use std::io;
use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsConnector, rustls};
use tokio_tungstenite::tungstenite::http::Uri;
use whispeer_transport::Binary;

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
    let (reader, writer) = whispeer_transport::split(ws, Binary, Binary);
    Ok((Box::new(reader), Box::new(writer)))
}

/// A stream a WebSocket runs on: TCP, or TLS over TCP.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A WebSocket whose messages the caller reads and writes itself (the chat's JSON texts).
pub(crate) type TextSocket = tokio_tungstenite::WebSocketStream<Box<dyn Io>>;

/// Opens a WebSocket to `url` (`ws://` or `wss://`).
pub(crate) async fn websocket_text(
    url: &str,
    tls_config: Option<&Arc<rustls::ClientConfig>>,
) -> io::Result<TextSocket> {
    let uri: Uri = url.parse().map_err(|_| invalid("invalid WebSocket URL"))?;
    let secure = match uri.scheme_str() {
        Some("ws") => false,
        Some("wss") => true,
        _ => return Err(invalid("chat URLs are ws:// or wss://")),
    };
    let host = uri.host().ok_or_else(|| invalid("no host in the WebSocket URL"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let stream = tcp(host, uri.port_u16().unwrap_or(if secure { 443 } else { 80 })).await?;
    let stream: Box<dyn Io> =
        if secure { Box::new(tls(stream, host, tls_config).await?) } else { Box::new(stream) };
    let (ws, _response) =
        tokio_tungstenite::client_async(url, stream).await.map_err(io::Error::other)?;
    Ok(ws)
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
