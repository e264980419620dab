//! The chat page (`[chat] page_dir`, `--chat-page`): on the chat listener, a plain HTTP `GET`
//! that is not a WebSocket upgrade gets the page (`/`), or the WASM client's web package from
//! the directory (`/pkg/whispeer_wasm.js`, `/pkg/whispeer_wasm_bg.wasm`; nothing else). The
//! request head is read once; an upgrade reaches the WebSocket handshake with those bytes
//! replayed (`Prefixed`). With `[tls]`, after the TLS handshake: the page is `https://`.

use std::path::Path;
use std::time::Duration;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

const PAGE: &str = include_str!("page.html");
/// The most of a request head looked at.
const HEAD_BYTES: usize = 8 * 1024;

/// What the connection is.
pub(super) enum Head<S> {
    /// A WebSocket upgrade (or something else for the handshake to refuse): the connection,
    /// replaying the bytes read so far.
    Upgrade(Prefixed<S>),
    /// A page request, answered and closed; or a connection that ended or stalled.
    Done,
}

/// A socket whose first bytes were already read: they are read again first.
pub(super) struct Prefixed<S> {
    head: Bytes,
    stream: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.head.is_empty() {
            return Pin::new(&mut self.stream).poll_read(cx, buf);
        }
        let n = self.head.len().min(buf.remaining());
        buf.put_slice(&self.head.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Reads the request head (up to 8 KiB, within `patience`); answers a plain `GET` from the page
/// or `dir`, and hands anything else on with the bytes read.
pub(super) async fn serve_if_page<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    dir: &Path,
    chat_path: &str,
    patience: Duration,
) -> Head<S> {
    let mut head = BytesMut::with_capacity(1024);
    let read = tokio::time::timeout(patience, async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < HEAD_BYTES {
            let mut chunk = [0u8; 1024];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return Head::Done;
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if text.contains("\r\nupgrade: websocket") || !text.starts_with("get ") {
        return Head::Upgrade(Prefixed { head: head.freeze(), stream });
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
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
    Head::Done
}
