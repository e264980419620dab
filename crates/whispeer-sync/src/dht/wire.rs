//! One libp2p stream as a [`Wire`]: each message a 4-byte big-endian length and its bytes. The
//! libp2p connection under it is already encrypted and authenticated (Noise XX, the peer's
//! ed25519 key is its id), so the connection on top needs no second handshake.

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio_util::compat::Compat;

use crate::noise::Wire;

/// Largest message on a stream: a chunk of a connection (64 KiB) and its flag.
const MAX_FRAME: usize = 80 << 10;

type Io = Compat<libp2p::Stream>;

/// A stream's two halves, and what to run when it closes.
pub(super) struct StreamWire {
    reader: ReadHalf<Io>,
    writer: WriteHalf<Io>,
    on_close: Option<Box<dyn FnOnce() + Send>>,
}

impl StreamWire {
    pub(super) fn new(stream: libp2p::Stream, on_close: impl FnOnce() + Send + 'static) -> Self {
        use tokio_util::compat::FuturesAsyncReadCompatExt;
        let (reader, writer) = tokio::io::split(stream.compat());
        Self { reader, writer, on_close: Some(Box::new(on_close)) }
    }
}

#[async_trait]
impl Wire for StreamWire {
    async fn send(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        let len = u32::try_from(bytes.len())?;
        self.writer.write_all(&len.to_be_bytes()).await?;
        self.writer.write_all(&bytes).await?;
        self.writer.flush().await?;
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
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

    fn close(&mut self) {
        if let Some(on_close) = self.on_close.take() {
            on_close();
        }
    }
}
