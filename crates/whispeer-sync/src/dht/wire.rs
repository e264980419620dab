//! One libp2p stream as a [`Wire`]: each message a 4-byte big-endian length and its bytes. The
//! libp2p connection under it is already encrypted and authenticated (Noise XX, the peer's
//! ed25519 key is its id), so the connection on top needs no second handshake.
//!
//! A writer task owns the stream's writing half: `send` queues (64 messages, then it waits),
//! and the task writes into a 64 KiB buffer while more wait, flushing once the queue is empty —
//! one yamux frame, Noise message and syscall per burst rather than per message.

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf};
use tokio::sync::mpsc;
use tokio_util::compat::Compat;
use tokio_util::sync::CancellationToken;

use crate::noise::Wire;

/// Largest message on a stream: a chunk of a connection (64 KiB) and its flag.
const MAX_FRAME: usize = 80 << 10;
/// Messages queued for the writer task.
const QUEUE: usize = 64;

type Io = Compat<libp2p::Stream>;

/// A stream's reading half, its writer task's queue, and what to run when it closes.
pub(super) struct StreamWire {
    reader: ReadHalf<Io>,
    /// Cancelled when the stream should end (its connection was upgraded to a direct one).
    ended: CancellationToken,
    out: Option<mpsc::Sender<Vec<u8>>>,
    on_close: Option<Box<dyn FnOnce() + Send>>,
}

impl StreamWire {
    pub(super) fn new(
        stream: libp2p::Stream,
        ended: CancellationToken,
        on_close: impl FnOnce() + Send + 'static,
    ) -> Self {
        use tokio_util::compat::FuturesAsyncReadCompatExt;
        let (reader, writer) = tokio::io::split(stream.compat());
        // Buffered: a burst becomes one yamux frame (and one Noise message) per 64 KiB, not
        // one per message.
        let mut writer = tokio::io::BufWriter::with_capacity(64 << 10, writer);
        let (out, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if writer.write_all(&frame).await.is_err() {
                    break;
                }
                if rx.is_empty() && writer.flush().await.is_err() {
                    break;
                }
            }
            let _ = writer.shutdown().await;
        });
        Self { reader, ended, out: Some(out), on_close: Some(Box::new(on_close)) }
    }
}

#[async_trait]
impl Wire for StreamWire {
    async fn send(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        let len = u32::try_from(bytes.len())?;
        let mut frame = Vec::with_capacity(4 + bytes.len());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(&bytes);
        let out = self.out.as_ref().ok_or_else(|| anyhow::anyhow!("the connection is closed"))?;
        out.send(frame).await.map_err(|_| anyhow::anyhow!("the connection is closed"))
    }

    async fn recv(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        let ended = self.ended.clone();
        tokio::select! {
            () = ended.cancelled() => {
                self.close();
                Ok(None)
            }
            frame = self.frame() => frame,
        }
    }

    fn close(&mut self) {
        // The writer task flushes what is queued, then closes the stream.
        self.out = None;
        if let Some(on_close) = self.on_close.take() {
            on_close();
        }
    }
}

impl StreamWire {
    async fn frame(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        let mut len = [0u8; 4];
        match self.reader.read_exact(&mut len).await {
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
            Err(err) => return Err(err.into()),
        }
        let len = u32::from_be_bytes(len) as usize;
        anyhow::ensure!(len <= MAX_FRAME, "the peer sent a frame of {len} bytes");
        let mut bytes = vec![0u8; len];
        self.reader.read_exact(&mut bytes).await?;
        Ok(Some(bytes))
    }
}
