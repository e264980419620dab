//! End-to-end encrypted connections over any message pipe ([`Wire`]): a Noise XX handshake
//! (`Noise_XX_25519_ChaChaPoly_BLAKE2s`), then each message cut into Noise messages of at
//! most 64 KiB, each chunk flagged as the last of its message or not.
//!
//! The handshake's prologue binds what both sides agreed on outside it (the protocol and the
//! topic), and each side's static key is its peer id, so a relay in the middle can neither read,
//! change, nor swap who is on the other end.

use async_trait::async_trait;

use crate::transport::Connection;

/// The Noise protocol.
pub(crate) const PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";

/// Largest message a connection sends or accepts (16 MiB); a peer that sends more is cut off.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Largest Noise message.
const NOISE_MAX: usize = 65535;
/// Plaintext per chunk: a Noise message less its tag and the chunk's flag byte.
const CHUNK: usize = NOISE_MAX - 16 - 1;
const MORE: u8 = 0;
const LAST: u8 = 1;

/// A pipe of whole messages (one relay link, one stream).
#[async_trait]
pub(crate) trait Wire: Send + 'static {
    /// Sends one message.
    async fn send(&mut self, bytes: Vec<u8>) -> anyhow::Result<()>;
    /// The next message; `None` once the pipe closed.
    async fn recv(&mut self) -> anyhow::Result<Option<Vec<u8>>>;
    /// Closes the pipe (best effort).
    fn close(&mut self);
}

/// The Noise session after its handshake, or plaintext when encryption is off.
enum Cipher {
    Noise(Box<snow::TransportState>),
    Plain,
}

/// A connection to one peer over a [`Wire`].
pub(crate) struct SecureConnection<W: Wire> {
    wire: W,
    cipher: Cipher,
    peer_id: String,
    partial: Vec<u8>,
    scratch: Vec<u8>,
}

impl<W: Wire> std::fmt::Debug for SecureConnection<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureConnection")
            .field("peer_id", &self.peer_id)
            .field("encrypted", &matches!(self.cipher, Cipher::Noise(_)))
            .finish_non_exhaustive()
    }
}

fn params() -> snow::params::NoiseParams {
    PARAMS.parse().unwrap_or_else(|_| unreachable!("the Noise parameters are a valid constant"))
}

impl<W: Wire> SecureConnection<W> {
    /// Runs the handshake over `wire` as the initiator or the responder, with `private` as the
    /// static key; the peer's static key must be `expected` (hex) when given. The connection's
    /// peer id is the peer's static key in hex.
    pub(crate) async fn handshake(
        mut wire: W,
        initiator: bool,
        private: &[u8],
        prologue: &[u8],
        expected: Option<&str>,
    ) -> anyhow::Result<Self> {
        let builder =
            snow::Builder::new(params()).local_private_key(private)?.prologue(prologue)?;
        let mut state =
            if initiator { builder.build_initiator()? } else { builder.build_responder()? };
        let mut buf = vec![0u8; NOISE_MAX];
        let mut payload = vec![0u8; NOISE_MAX];
        // XX: -> e; <- e, ee, s, es; -> s, se.
        let mut write_turn = initiator;
        while !state.is_handshake_finished() {
            if write_turn {
                let n = state.write_message(&[], &mut buf)?;
                wire.send(buf[..n].to_vec()).await?;
            } else {
                let message = wire
                    .recv()
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("the peer left during the handshake"))?;
                state.read_message(&message, &mut payload)?;
            }
            write_turn = !write_turn;
        }
        let remote = state
            .get_remote_static()
            .map(hex::encode)
            .ok_or_else(|| anyhow::anyhow!("the handshake gave no peer key"))?;
        if let Some(expected) = expected.filter(|e| *e != remote) {
            wire.close();
            anyhow::bail!("the peer announced as {expected} holds the key of {remote}");
        }
        let state = state.into_transport_mode()?;
        Ok(Self::new(wire, Cipher::Noise(Box::new(state)), remote))
    }

    /// A connection without encryption: `peer_id` is taken as claimed.
    pub(crate) fn plain(wire: W, peer_id: String) -> Self {
        Self::new(wire, Cipher::Plain, peer_id)
    }

    fn new(wire: W, cipher: Cipher, peer_id: String) -> Self {
        Self { wire, cipher, peer_id, partial: Vec::new(), scratch: vec![0u8; NOISE_MAX] }
    }

    fn seal(&mut self, flag: u8, chunk: &[u8]) -> anyhow::Result<Vec<u8>> {
        let mut plain = Vec::with_capacity(chunk.len() + 1);
        plain.push(flag);
        plain.extend_from_slice(chunk);
        match &mut self.cipher {
            Cipher::Plain => Ok(plain),
            Cipher::Noise(state) => {
                let n = state.write_message(&plain, &mut self.scratch)?;
                Ok(self.scratch[..n].to_vec())
            }
        }
    }
}

#[async_trait]
impl<W: Wire> Connection for SecureConnection<W> {
    fn peer_id(&self) -> &str {
        &self.peer_id
    }

    async fn send(&mut self, data: &[u8]) -> anyhow::Result<()> {
        anyhow::ensure!(
            data.len() <= MAX_MESSAGE_BYTES,
            "message of {} bytes: at most {MAX_MESSAGE_BYTES}",
            data.len()
        );
        let mut chunks = data.chunks(CHUNK).peekable();
        if chunks.peek().is_none() {
            let sealed = self.seal(LAST, &[])?;
            return self.wire.send(sealed).await;
        }
        while let Some(chunk) = chunks.next() {
            let flag = if chunks.peek().is_some() { MORE } else { LAST };
            let sealed = self.seal(flag, chunk)?;
            self.wire.send(sealed).await?;
        }
        Ok(())
    }

    async fn receive(&mut self) -> anyhow::Result<Option<Vec<u8>>> {
        loop {
            let Some(message) = self.wire.recv().await? else {
                return Ok(None);
            };
            let plain = match &mut self.cipher {
                Cipher::Plain => message,
                Cipher::Noise(state) => {
                    let n = state.read_message(&message, &mut self.scratch).map_err(|e| {
                        anyhow::anyhow!("a message from {} did not decrypt: {e}", self.peer_id)
                    })?;
                    self.scratch[..n].to_vec()
                }
            };
            let Some((&flag, body)) = plain.split_first() else {
                anyhow::bail!("an empty chunk from {}", self.peer_id);
            };
            anyhow::ensure!(
                self.partial.len() + body.len() <= MAX_MESSAGE_BYTES,
                "{} sent a message over {MAX_MESSAGE_BYTES} bytes",
                self.peer_id
            );
            self.partial.extend_from_slice(body);
            match flag {
                LAST => return Ok(Some(std::mem::take(&mut self.partial))),
                MORE => {}
                _ => anyhow::bail!("a bad chunk flag from {}", self.peer_id),
            }
        }
    }

    async fn close(&mut self) -> anyhow::Result<()> {
        self.wire.close();
        Ok(())
    }
}

impl<W: Wire> Drop for SecureConnection<W> {
    fn drop(&mut self) {
        self.wire.close();
    }
}
