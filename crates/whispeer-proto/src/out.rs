//! What goes out next on a connection, for the server's writers and the SDK's alike: frames
//! encoded into one buffer, and large payloads that travel by reference. A payload of
//! [`BY_REFERENCE`] bytes or more need not be copied into the buffer: its frame's head is
//! ([`Frame::encode_publish_head`](crate::Frame::encode_publish_head),
//! [`Frame::encode_deliver_head`](crate::Frame::encode_deliver_head)) and the payload's shared
//! bytes follow it in the same vectored write, as `OutBuf` is a [`Buf`] whose
//! [`chunks_vectored`](Buf::chunks_vectored) gives them all (tokio's `write_all_buf` hands
//! them to one `writev`). On a transport that does not write vectored (WebSocket, which copies
//! into its messages anyway) the callers encode everything into the buffer.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

/// Payloads at least this large travel by reference on a transport that writes vectored.
pub const BY_REFERENCE: usize = 16 * 1024;

/// Bytes to write, in order: `queue` (frames cut off before a large payload, and the
/// payloads), then `frames`.
#[derive(Debug, Default)]
pub struct OutBuf {
    /// Each with whether it is a payload held by reference.
    queue: VecDeque<(Bytes, bool)>,
    /// Bytes in `queue`.
    queued: usize,
    /// Bytes of the payloads in `queue` held by reference.
    referenced: usize,
    frames: BytesMut,
}

impl OutBuf {
    /// An empty buffer with room for `capacity` bytes of frames.
    pub fn with_capacity(capacity: usize) -> Self {
        let frames = BytesMut::with_capacity(capacity);
        Self { queue: VecDeque::new(), queued: 0, referenced: 0, frames }
    }

    /// Where the next frame is encoded: after everything held.
    pub fn frames(&mut self) -> &mut BytesMut {
        &mut self.frames
    }

    /// Sends `payload` right after what is encoded so far (a frame head that counted it): by
    /// reference when the connection writes `vectored` and it has [`BY_REFERENCE`] bytes or
    /// more, else copied after the head.
    pub fn put_payload(&mut self, payload: &Bytes, vectored: bool) {
        if !vectored || payload.len() < BY_REFERENCE {
            self.frames.extend_from_slice(payload);
            return;
        }
        self.push_payload(payload.clone());
    }

    /// Queues `payload` by reference after what is encoded so far.
    fn push_payload(&mut self, payload: Bytes) {
        self.cut();
        self.queued += payload.len();
        self.referenced += payload.len();
        self.queue.push_back((payload, true));
    }

    /// Moves the encoded frames to the queue.
    fn cut(&mut self) {
        if !self.frames.is_empty() {
            let frames = self.frames.split().freeze();
            self.queued += frames.len();
            self.queue.push_back((frames, false));
        }
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.queued + self.frames.len()
    }

    /// Bytes held in copies: all but the payloads held by reference (what a batch's memory
    /// and the copying into it grow with).
    pub fn copied(&self) -> usize {
        self.len() - self.referenced
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves everything `other` holds after what this holds, copying no payload (and nothing
    /// at all when this holds nothing).
    pub fn append(&mut self, other: &mut Self) {
        if self.is_empty() {
            // Trade: no copy, and each side keeps a buffer that has grown already.
            std::mem::swap(self, other);
            return;
        }
        if other.queue.is_empty() {
            self.frames.extend_from_slice(&other.frames);
            other.frames.clear();
            return;
        }
        self.cut();
        self.queue.append(&mut other.queue);
        self.queued += std::mem::take(&mut other.queued);
        self.referenced += std::mem::take(&mut other.referenced);
        std::mem::swap(&mut self.frames, &mut other.frames);
    }
}

impl Buf for OutBuf {
    fn remaining(&self) -> usize {
        self.len()
    }

    fn chunk(&self) -> &[u8] {
        self.queue.front().map_or(&self.frames[..], |(first, _)| &first[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 {
            let Some((first, referenced)) = self.queue.front_mut() else {
                self.frames.advance(cnt);
                if self.frames.is_empty() {
                    // Start the next batch at the allocation's start again (moving nothing):
                    // else it begins where this one ended, and once it reaches the end of the
                    // allocation `bytes` moves everything not yet written back to the front.
                    let _ = self.frames.try_reclaim(self.frames.capacity() + 1);
                }
                return;
            };
            let n = cnt.min(first.len());
            first.advance(n);
            self.queued -= n;
            if *referenced {
                self.referenced -= n;
            }
            cnt -= n;
            if first.is_empty() {
                self.queue.pop_front();
            }
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let chunks =
            self.queue.iter().map(|(b, _)| &b[..]).chain(std::iter::once(&self.frames[..]));
        let mut filled = 0;
        for chunk in chunks.filter(|c| !c.is_empty()) {
            let Some(slot) = dst.get_mut(filled) else { break };
            *slot = IoSlice::new(chunk);
            filled += 1;
        }
        filled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames and payloads in two buffers, the second appended to the first.
    fn sample() -> OutBuf {
        let mut out = OutBuf::default();
        out.frames().extend_from_slice(b"head1");
        out.push_payload(Bytes::from_static(b"PAYLOAD1"));
        out.frames().extend_from_slice(b"head2");
        out.push_payload(Bytes::from_static(b"PAYLOAD2"));
        out.frames().extend_from_slice(b"tail");
        let mut other = OutBuf::default();
        other.frames().extend_from_slice(b"more");
        other.push_payload(Bytes::from_static(b"P3"));
        other.frames().extend_from_slice(b"end");
        out.append(&mut other);
        assert!(other.is_empty());
        out
    }

    /// Writes `out` as `writev` calls that each take at most `step` bytes of three slices.
    fn written(mut out: OutBuf, step: usize) -> Vec<u8> {
        let mut all = Vec::new();
        while out.has_remaining() {
            let mut slices = [IoSlice::new(&[]); 3];
            let n = out.chunks_vectored(&mut slices);
            assert!(n > 0, "a chunk while bytes remain");
            assert_eq!(&*slices[0], out.chunk(), "the first slice is the chunk");
            let took: Vec<u8> =
                slices[..n].iter().flat_map(|s| s.iter().copied()).take(step).collect();
            all.extend_from_slice(&took);
            out.advance(took.len());
        }
        assert_eq!(out.len(), 0);
        all
    }

    #[test]
    fn payloads_go_out_in_place_between_the_frames_around_them() {
        assert_eq!(sample().len(), 39);
        for step in [1, 3, 7, 100] {
            assert_eq!(written(sample(), step), b"head1PAYLOAD1head2PAYLOAD2tailmoreP3end");
        }
    }

    #[test]
    fn a_payload_goes_by_reference_only_when_large_on_a_vectored_connection() {
        let (small, large) = (Bytes::from(vec![1; 8]), Bytes::from(vec![2; BY_REFERENCE]));
        for (payload, vectored, by_reference) in
            [(&small, true, false), (&large, false, false), (&large, true, true)]
        {
            let mut out = OutBuf::default();
            out.frames().extend_from_slice(b"head");
            out.put_payload(payload, vectored);
            let mut slices = [IoSlice::new(&[]); 4];
            let n = out.chunks_vectored(&mut slices);
            let shared = slices[..n].iter().any(|s| s.as_ptr() == payload.as_ptr());
            assert_eq!(shared, by_reference, "{} bytes, vectored {vectored}", payload.len());
            assert_eq!(out.len(), 4 + payload.len());
        }
    }

    #[test]
    fn copied_counts_all_but_the_payloads_held_by_reference_as_they_go_out() {
        let mut out = sample();
        // head1 head2 tail more end are copied; PAYLOAD1 PAYLOAD2 P3 are held by reference.
        assert_eq!((out.len(), out.copied()), (39, 21));
        let mut copied = vec![out.copied()];
        while out.has_remaining() {
            out.advance(3);
            copied.push(out.copied());
        }
        // Written three bytes at a time: what is left of the copies after each step.
        assert_eq!(copied, [21, 18, 16, 16, 16, 14, 11, 11, 11, 10, 7, 4, 3, 0]);
        let (small, large) = (Bytes::from(vec![1; 8]), Bytes::from(vec![2; BY_REFERENCE]));
        out.put_payload(&small, true);
        out.put_payload(&large, false);
        assert_eq!(out.copied(), 8 + BY_REFERENCE, "copied when small or not vectored");
        out.put_payload(&large, true);
        assert_eq!((out.len(), out.copied()), (8 + 2 * BY_REFERENCE, 8 + BY_REFERENCE));
    }

    #[test]
    fn a_batch_written_out_leaves_its_whole_allocation_to_the_next() {
        let mut out = OutBuf::with_capacity(1024);
        for written in [1000, 600, 1024] {
            let start = out.frames().as_ptr();
            out.frames().extend_from_slice(&vec![5; written]);
            assert_eq!(out.frames().as_ptr(), start, "{written} bytes fit where the last began");
            out.advance(written / 2);
            out.advance(written - written / 2);
            assert_eq!(out.frames().capacity(), 1024, "all of it free after {written} bytes");
        }
    }

    #[test]
    fn appending_to_nothing_trades_and_frames_alone_are_copied() {
        let mut out = OutBuf::default();
        let mut other = OutBuf::with_capacity(1024);
        other.frames().extend_from_slice(b"abc");
        out.append(&mut other);
        assert_eq!((out.chunk(), other.len()), (&b"abc"[..], 0));
        other.frames().extend_from_slice(b"def");
        out.append(&mut other);
        assert_eq!(out.chunk(), b"abcdef", "frames alone are appended to the frames");
    }
}
