//! A hand-driven client of the server's protocol, for the misbehaviours the SDK will not
//! commit, and a PUBLISH frame to send with it.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use whispeer_client::proto::{
    Body, Envelope, ErrorCode, Flags, Frame, Limits, MessageId, Qos, Topic,
};

async fn soon<F: Future>(f: F) -> F::Output {
    timeout(Duration::from_secs(10), f).await.expect("timed out")
}

/// A QoS 0 PUBLISH of `payload` to `topic`, with id `id`.
pub(crate) fn publish(topic: &str, id: u128, payload: impl Into<Bytes>) -> Frame {
    let topic = Topic::parse(topic).unwrap();
    let envelope = Envelope::new(MessageId(id), topic, 0, Flags::default(), payload.into());
    Frame::new(0, Body::Publish { qos: Qos::AtMostOnce, envelope })
}

/// A hand-driven client, for the misbehaviours the SDK will not commit.
pub(crate) struct RawClient {
    pub(crate) stream: TcpStream,
    buf: BytesMut,
}

impl RawClient {
    pub(crate) async fn connect(addr: SocketAddr) -> Self {
        Self { stream: TcpStream::connect(addr).await.unwrap(), buf: BytesMut::new() }
    }

    pub(crate) async fn send(&mut self, frame: Frame) {
        let mut out = BytesMut::new();
        frame.encode(&mut out, usize::MAX).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    pub(crate) async fn hello(&mut self) {
        self.send(Frame::new(1, Body::Hello { version: 1, capabilities: 0, name: "raw".into() }))
            .await;
        let welcome = self.next_frame().await.unwrap();
        assert!(matches!(welcome.body, Body::Welcome { .. }), "{welcome:?}");
    }

    /// The next frame other than a ping, or `None` once the server closes the connection.
    pub(crate) async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = Frame::decode(&mut self.buf, &Limits::default()).unwrap() {
                if frame.body == Body::Ping {
                    continue;
                }
                return Some(frame);
            }
            if self.stream.read_buf(&mut self.buf).await.unwrap_or(0) == 0 {
                return None;
            }
        }
    }

    /// Reads until the server closes; returns the error codes it sent.
    pub(crate) async fn drain_errors(&mut self) -> Vec<ErrorCode> {
        let mut codes = Vec::new();
        while let Some(frame) = soon(self.next_frame()).await {
            if let Body::Error { code, .. } = frame.body {
                codes.push(code);
            }
        }
        codes
    }
}
