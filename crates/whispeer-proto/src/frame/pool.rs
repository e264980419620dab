//! A connection's earlier read allocations, kept to read into again.
//!
//! Frames are cut from the read buffer without copying, so a buffer stays in use while any
//! payload cut from it is, and the next read goes to a new allocation. Freed by whichever
//! thread drops its last payload, such an allocation costs more than its `malloc`: the pages
//! of a fresh one fault in as the kernel copies a read into them, and the allocator hands
//! memory freed on another thread back to the system (`madvise`) often. [`ReadPool`] keeps the
//! last few allocations of a connection and reads into one again as soon as nothing cut from
//! it is in use (`BytesMut::try_reclaim`), so a connection that streams small frames settles on
//! two or three allocations.

use std::ops::RangeInclusive;

use bytes::BytesMut;

use super::READ_CHUNK;

/// Allocations kept besides the one being read into, unless said otherwise.
const SPARES: usize = 2;

/// The capacity of a pooled allocation: a read chunk, and room for a frame begun in the last
/// one.
const POOLED: usize = READ_CHUNK + READ_CHUNK / 8;

/// A connection's spare read allocations (by default at most two, each of a read chunk and an
/// eighth): see the module's documentation. Use [`ReadPool::reserve`] before each read
/// instead of [`reserve_for_read`](super::reserve_for_read).
#[derive(Debug)]
pub struct ReadPool {
    spares: Vec<BytesMut>,
    /// Most spares kept.
    keep: usize,
    /// The addresses of the allocation this pool gave the buffer last: whether the buffer is
    /// still in it (decoding a large frame reserves a larger one of its own, not pooled).
    given: Option<RangeInclusive<usize>>,
    /// Allocations this pool made.
    allocated: u64,
}

impl Default for ReadPool {
    fn default() -> Self {
        Self::with_spares(SPARES)
    }
}

impl ReadPool {
    /// A pool keeping up to `spares` earlier allocations: as many as a connection's reader may
    /// be ahead of the code that drops what it read, in read chunks, and at most
    /// `spares × 72 KiB` held for a connection that has gone quiet.
    pub fn with_spares(spares: usize) -> Self {
        Self { spares: Vec::new(), keep: spares, given: None, allocated: 0 }
    }

    /// Makes sure `buf` has room for a large read: its own allocation again when nothing cut
    /// from it is in use, else a spare that is free by now, else a new one. What `buf` holds
    /// (the start of a frame) moves with it.
    pub fn reserve(&mut self, buf: &mut BytesMut) {
        if buf.capacity() - buf.len() >= READ_CHUNK / 8 || buf.try_reclaim(READ_CHUNK) {
            return;
        }
        if buf.len() > READ_CHUNK / 8 {
            // A large frame under way: decoding reserves room for it (see `room_for`).
            buf.reserve(READ_CHUNK);
            return;
        }
        let pooled = self.given.as_ref().is_some_and(|given| given.contains(&addr(buf)));
        let free = self.spares.iter_mut().position(|spare| spare.try_reclaim(POOLED));
        let mut next = match free {
            Some(at) => self.spares.swap_remove(at),
            None => {
                self.allocated += 1;
                BytesMut::with_capacity(POOLED)
            }
        };
        next.extend_from_slice(buf);
        let mut last = std::mem::replace(buf, next);
        let start = addr(buf);
        self.given = Some(start..=start + buf.capacity());
        if pooled && self.spares.len() < self.keep {
            last.clear();
            self.spares.push(last);
        }
    }
}

/// Where `buf`'s bytes start, as an address: only compared, never followed.
fn addr(buf: &BytesMut) -> usize {
    buf.as_ptr() as usize
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    /// Reads `reads` times 1,000 bytes through `pool`, cutting all but 10 off as a frame would
    /// be (the rest is the start of the next) and keeping the last `keep` of them; checks the
    /// room each reservation leaves, and gives the frames kept.
    fn read_through(pool: &mut ReadPool, reads: u32, keep: usize) -> Vec<Bytes> {
        let (mut buf, mut kept) = (BytesMut::new(), Vec::new());
        for n in 0..reads {
            pool.reserve(&mut buf);
            assert!(buf.capacity() - buf.len() >= READ_CHUNK / 8, "room for a read");
            buf.extend_from_slice(&n.to_le_bytes().repeat(250));
            kept.push(buf.split_to(buf.len() - 10).freeze());
            if kept.len() > keep {
                kept.remove(0);
            }
        }
        kept
    }

    #[test]
    fn a_connection_whose_frames_are_dropped_reads_into_few_allocations() {
        let mut pool = ReadPool::default();
        read_through(&mut pool, 2000, 1);
        // 2,000 reads of 1,000 bytes fill about 30 chunks: each a new allocation without the
        // pool.
        assert!(pool.allocated <= 3, "{} allocations", pool.allocated);
    }

    #[test]
    fn an_allocation_still_in_use_is_not_read_into() {
        let mut pool = ReadPool::default();
        read_through(&mut pool, 2000, 2000);
        assert!(pool.allocated >= 25, "{} allocations", pool.allocated);
    }

    #[test]
    fn what_the_buffer_holds_moves_with_it() {
        let mut pool = ReadPool::default();
        let (mut buf, mut stream, mut read) = (BytesMut::new(), Vec::new(), Vec::new());
        let mut in_use = std::collections::VecDeque::new();
        for n in 0..3000u32 {
            pool.reserve(&mut buf);
            let bytes = n.to_le_bytes().repeat(97);
            stream.extend_from_slice(&bytes);
            buf.extend_from_slice(&bytes);
            // Cut a little less than was read: the rest is a frame's start, read on. The
            // last 100 cuts stay in use, so allocations are both new and reused.
            let cut = buf.len() - buf.len() % 333;
            in_use.push_back(buf.split_to(cut).freeze());
            if in_use.len() > 100 {
                read.extend_from_slice(&in_use.pop_front().unwrap_or_default());
            }
        }
        in_use.iter().for_each(|cut| read.extend_from_slice(cut));
        read.extend_from_slice(&buf);
        // 1.16 MB read through 72 KiB allocations, about 38 KB of it in use at a time.
        assert!(pool.allocated <= 3, "{} allocations", pool.allocated);
        assert_eq!(read, stream);
    }
}
