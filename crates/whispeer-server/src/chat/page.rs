//! The chat page (`[chat] page_dir`, `--chat-page`): on the chat listener, a plain HTTP `GET`
//! that is not a WebSocket upgrade gets the page (`/`), or the WASM client's web package from
//! the directory (`/pkg/whispeer_wasm.js`, `/pkg/whispeer_wasm_bg.wasm`; nothing else). The
//! request is peeked, so an upgrade reaches the WebSocket handshake untouched. Not over TLS.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PAGE: &str = include_str!("page.html");
/// The most of a request head looked at.
const HEAD_BYTES: usize = 8 * 1024;

/// What the connection is.
pub(super) enum Peeked {
    /// A WebSocket upgrade (or something else for the handshake to refuse).
    Upgrade,
    /// A page request, answered and closed.
    Served,
}

/// Peeks at the request head; answers a plain `GET` from the page or `dir`.
pub(super) async fn serve_if_page(
    stream: &mut TcpStream,
    dir: &Path,
    chat_path: &str,
    patience: Duration,
) -> Peeked {
    let mut head = vec![0u8; HEAD_BYTES];
    let peeked = tokio::time::timeout(patience, async {
        loop {
            let n = stream.peek(&mut head).await.ok()?;
            let seen = &head[..n];
            if seen.windows(4).any(|w| w == b"\r\n\r\n") || n == HEAD_BYTES {
                return Some(n);
            }
            if n == 0 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let Ok(Some(n)) = peeked else { return Peeked::Upgrade };
    let text = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
    if text.contains("\r\nupgrade: websocket") || !text.starts_with("get ") {
        return Peeked::Upgrade;
    }
    let path = text.split_whitespace().nth(1).unwrap_or("/").split('?').next().unwrap_or("/");
    let (status, kind, body): (&str, &str, Vec<u8>) = match path {
        "/" | "/index.html" => {
            ("200 OK", "text/html; charset=utf-8", PAGE.replace("__PATH__", chat_path).into_bytes())
        }
        "/pkg/whispeer_wasm.js" | "/pkg/whispeer_wasm_bg.wasm" => {
            let name = &path[5..];
            let kind = if name.ends_with(".js") { "text/javascript" } else { "application/wasm" };
            match tokio::fs::read(dir.join(name)).await {
                Ok(body) => ("200 OK", kind, body),
                Err(_) => ("404 Not Found", "text/plain", b"the WASM package is missing".to_vec()),
            }
        }
        "/favicon.ico" => ("204 No Content", "text/plain", Vec::new()),
        _ => ("404 Not Found", "text/plain", b"not found".to_vec()),
    };
    // The request head is consumed before answering, so closing does not reset the answer.
    let mut consumed = vec![0u8; n];
    let _ = stream.read_exact(&mut consumed).await;
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
    Peeked::Served
}
