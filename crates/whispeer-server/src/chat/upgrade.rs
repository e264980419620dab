//! A chat connection's upgrade: the path, then who connects — the principal of an API key or
//! JWT (`?token=` or a bearer header), or on a server without keys `?id=` (or later the first
//! message's `from`) — and `?device=`; then the page for plain `GET`s when it is served.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use super::hub::Hub;
use super::wire::valid_name;
use crate::ServerConfig;

/// What the upgrade request said.
#[derive(Debug, Default)]
struct Hello {
    id: Option<String>,
    device: Option<String>,
    token: Option<String>,
    /// `?ack=1`: the client acknowledges what it receives.
    acking: bool,
}

/// `%xx` and `+` decoded.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |at: usize| bytes.get(at).and_then(|b| (*b as char).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
                continue;
            }
            (b'+', _, _) => out.push(b' '),
            (byte, _, _) => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Hello {
    fn read(request: &Request) -> Self {
        let mut hello = Self::default();
        for pair in request.uri().query().unwrap_or_default().split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = Some(decode(value));
            match key {
                "id" | "user" => hello.id = value,
                "device" => hello.device = value,
                "token" => hello.token = value,
                "ack" => hello.acking = matches!(value.as_deref(), Some("1" | "true" | "yes")),
                _ => {}
            }
        }
        let bearer = request.headers().get("authorization").and_then(|v| v.to_str().ok());
        if let Some(token) = bearer.and_then(|v| v.strip_prefix("Bearer ")) {
            hello.token = Some(token.trim().to_string());
        }
        hello
    }
}

#[expect(clippy::result_large_err, reason = "tungstenite's handshake callback returns this type")]
fn refusal(status: StatusCode, reason: String) -> Result<Response, ErrorResponse> {
    let mut refusal = ErrorResponse::new(Some(reason));
    *refusal.status_mut() = status;
    Err(refusal)
}

/// Checks the upgrade: the path, then who connects. Gives the user when it is known already.
#[expect(clippy::result_large_err, reason = "tungstenite's handshake callback returns this type")]
fn admit(
    request: &Request,
    response: Response,
    hub: &Hub,
    config: &ServerConfig,
    found: &mut Option<(Option<String>, String, bool)>,
) -> Result<Response, ErrorResponse> {
    if request.uri().path() != hub.config.path {
        let reason = format!("no chat endpoint at {}", request.uri().path());
        return refusal(StatusCode::NOT_FOUND, reason);
    }
    let hello = Hello::read(request);
    let device = hello.device.unwrap_or_else(|| "default".into());
    if !valid_name(&device) {
        let reason = "device must be 1 to 64 letters, digits or -_.@".to_string();
        return refusal(StatusCode::BAD_REQUEST, reason);
    }
    let user = if config.auth_required() {
        let Some(principal) = hello.token.and_then(|token| config.principal_of(token.as_bytes()))
        else {
            crate::bump(&config.access.auth_failures);
            let reason = "chat needs ?token=<API key or JWT> or an Authorization: Bearer header";
            return refusal(StatusCode::UNAUTHORIZED, reason.into());
        };
        if hello.id.as_ref().is_some_and(|id| *id != principal.name) {
            let reason = format!("?id= must be your own name, {}", principal.name);
            return refusal(StatusCode::FORBIDDEN, reason);
        }
        Some(principal.name.clone())
    } else {
        hello.id
    };
    if let Some(user) = user.as_ref().filter(|u| !valid_name(u)) {
        let reason = format!("{user:?} cannot be a chat user: 1 to 64 letters, digits or -_.@");
        return refusal(StatusCode::BAD_REQUEST, reason);
    }
    *found = Some((user, device, hello.acking));
    Ok(response)
}

/// Serves one connection, after TLS if configured.
pub(super) async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    hub: Arc<Hub>,
    config: Arc<ServerConfig>,
    stop: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    #[cfg(feature = "tls")]
    if let Some(tls) = &config.tls {
        let Some(stream) = crate::tls::accept(tls, stream, peer, config.idle_timeout()).await
        else {
            return;
        };
        return page_or_upgrade(stream, peer, hub, config, stop).await;
    }
    page_or_upgrade(stream, peer, hub, config, stop).await;
}

/// Serves the page to a plain `GET` when it is configured, or upgrades.
async fn page_or_upgrade<S>(
    stream: S,
    peer: SocketAddr,
    hub: Arc<Hub>,
    config: Arc<ServerConfig>,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(dir) = hub.config.page_dir.clone() else {
        return upgrade(stream, peer, hub, config, stop).await;
    };
    let path = hub.config.path.clone();
    match super::page::serve_if_page(stream, &dir, &path, config.idle_timeout()).await {
        super::page::Head::Upgrade(stream) => upgrade(stream, peer, hub, config, stop).await,
        super::page::Head::Done => {}
    }
}

async fn upgrade<S>(
    stream: S,
    peer: SocketAddr,
    hub: Arc<Hub>,
    config: Arc<ServerConfig>,
    stop: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut ws_config = WebSocketConfig::default();
    // Over-size requests get an error and the connection stays; far larger ones close it.
    let cap = (hub.config.max_message_bytes * 4).max(64 * 1024);
    ws_config.max_message_size = Some(cap);
    ws_config.max_frame_size = Some(cap);
    // Requests are small: a 4 KiB read buffer (not tungstenite's 128 KiB) keeps an idle
    // connection cheap; larger messages grow it while they last.
    ws_config.read_buffer_size = 4096;
    let mut found = None;
    #[expect(
        clippy::result_large_err,
        reason = "tungstenite's handshake callback returns this type"
    )]
    let callback =
        |request: &Request, response: Response| admit(request, response, &hub, &config, &mut found);
    let handshake =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config));
    let ws = match tokio::time::timeout(config.idle_timeout(), handshake).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(err)) => return tracing::debug!(%peer, %err, "chat upgrade refused"),
        Err(_) => return tracing::debug!(%peer, "chat upgrade timed out"),
    };
    let Some(who) = found else { return };
    super::session::serve(ws, hub, config, who, stop).await;
}
