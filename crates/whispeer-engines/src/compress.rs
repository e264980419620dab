//! Compression: zstd (default) or lz4, skipped when it would not help, and always bounded on
//! the way back.
//!
//! Payloads under the threshold, and payloads that do not shrink, travel as they are; the
//! envelope flags record what was done. Decompression never produces more than the caller's
//! maximum: a zstd frame's declared size and an lz4 length prefix are checked before anything
//! is allocated, and a zstd frame without a declared size is inflated through a reader that
//! stops one byte past the maximum.

#[cfg(any(feature = "zstd", feature = "pure-zstd"))]
use std::io::Read;

use whispeer_proto::CompressionAlgorithm;

use crate::error::OpenError;

/// Default zstd level: a good ratio at several hundred MB/s.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Default threshold: payloads smaller than this are not worth compressing.
pub const DEFAULT_THRESHOLD: usize = 256;

/// The compression stage of the pipeline.
///
/// ```
/// use whispeer_engines::Compression;
/// let fast = Compression::lz4().threshold(512);
/// let default = Compression::new(); // zstd level 3, payloads of 256 bytes and more
/// # let _ = (fast, default);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Compression {
    algorithm: CompressionAlgorithm,
    level: i32,
    threshold: usize,
}

impl Default for Compression {
    fn default() -> Self {
        Self::new()
    }
}

impl Compression {
    /// zstd at level 3 for payloads of 256 bytes and more.
    pub fn new() -> Self {
        Self::zstd(DEFAULT_ZSTD_LEVEL)
    }

    /// zstd at `level` (1 to 22; higher is smaller and slower; negative levels are faster).
    /// Builds with only the `pure-zstd` feature compress at zstd's fastest level whatever
    /// `level` says.
    pub fn zstd(level: i32) -> Self {
        Self { algorithm: CompressionAlgorithm::Zstd, level, threshold: DEFAULT_THRESHOLD }
    }

    /// lz4: less compression, much less CPU.
    pub fn lz4() -> Self {
        Self { algorithm: CompressionAlgorithm::Lz4, level: 0, threshold: DEFAULT_THRESHOLD }
    }

    /// No compression (to opt a topic out in a `TopicRule`).
    pub fn none() -> Self {
        Self { algorithm: CompressionAlgorithm::None, level: 0, threshold: DEFAULT_THRESHOLD }
    }

    /// Payloads shorter than `bytes` are sent uncompressed.
    pub fn threshold(mut self, bytes: usize) -> Self {
        self.threshold = bytes;
        self
    }

    /// The algorithm.
    pub fn algorithm(&self) -> CompressionAlgorithm {
        self.algorithm
    }

    /// Compresses `input` if that is worth it: `None` if the input is under the threshold, the
    /// algorithm is `None`, or the output would not be shorter.
    pub(crate) fn compress(&self, input: &[u8]) -> Option<Vec<u8>> {
        if input.len() < self.threshold {
            return None;
        }
        let output = match self.algorithm {
            CompressionAlgorithm::Zstd => zstd_compress(input, self.level)?,
            CompressionAlgorithm::Lz4 => lz4_flex::block::compress_prepend_size(input),
            _ => return None,
        };
        (output.len() < input.len()).then_some(output)
    }
}

/// Decompresses `input`, refusing to produce more than `max` bytes.
///
/// # Errors
/// [`OpenError::TooLarge`] when the output would exceed `max`; [`OpenError::Decompress`] when the
/// input is not valid for `algorithm`; [`OpenError::Unsupported`] for an algorithm this build
/// lacks.
pub(crate) fn decompress(
    algorithm: CompressionAlgorithm,
    input: &[u8],
    max: usize,
) -> Result<Vec<u8>, OpenError> {
    match algorithm {
        CompressionAlgorithm::None => Ok(input.to_vec()),
        CompressionAlgorithm::Lz4 => lz4_decompress(input, max),
        CompressionAlgorithm::Zstd => zstd_decompress(input, max),
        _ => Err(OpenError::Unsupported { what: "compression algorithm" }),
    }
}

fn lz4_decompress(input: &[u8], max: usize) -> Result<Vec<u8>, OpenError> {
    let corrupt = OpenError::Decompress { algorithm: CompressionAlgorithm::Lz4 };
    let Some((prefix, block)) = input.split_first_chunk::<4>() else { return Err(corrupt) };
    let len = u32::from_le_bytes(*prefix) as usize;
    // lz4_flex would allocate whatever the prefix says: check it against the limit first.
    if len > max {
        return Err(OpenError::TooLarge { max });
    }
    let mut output = vec![0; len];
    match lz4_flex::block::decompress_into(block, &mut output) {
        Ok(written) if written == len => Ok(output),
        _ => Err(corrupt),
    }
}

/// Reads at most `max + 1` bytes from a decoder; more than `max` is refused.
#[cfg(any(feature = "zstd", feature = "pure-zstd"))]
fn read_bounded(decoder: impl Read, max: usize) -> Result<Vec<u8>, OpenError> {
    let corrupt = OpenError::Decompress { algorithm: CompressionAlgorithm::Zstd };
    let mut output = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    decoder.take(limit).read_to_end(&mut output).map_err(|_| corrupt)?;
    if output.len() > max {
        return Err(OpenError::TooLarge { max });
    }
    Ok(output)
}

#[cfg(feature = "zstd")]
mod zstd_impl {
    use std::cell::RefCell;

    use super::{OpenError, read_bounded};
    use whispeer_proto::CompressionAlgorithm;

    /// Largest zstd window a decoder accepts (2^23 = 8 MiB), bounding its memory.
    const WINDOW_LOG_MAX: u32 = 23;

    thread_local! {
        /// zstd contexts are costly to create; keep one per thread (and level).
        static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
        static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    }

    pub(super) fn compress(input: &[u8], level: i32) -> Option<Vec<u8>> {
        COMPRESSOR.with(|cell| {
            let mut cell = cell.try_borrow_mut().ok()?;
            if cell.as_ref().is_none_or(|(l, _)| *l != level) {
                *cell = Some((level, zstd::bulk::Compressor::new(level).ok()?));
            }
            let (_, compressor) = cell.as_mut()?;
            compressor.compress(input).ok()
        })
    }

    pub(super) fn decompress(input: &[u8], max: usize) -> Result<Vec<u8>, OpenError> {
        let corrupt = OpenError::Decompress { algorithm: CompressionAlgorithm::Zstd };
        match zstd::zstd_safe::get_frame_content_size(input) {
            Ok(Some(declared)) => {
                let declared =
                    usize::try_from(declared).map_err(|_| OpenError::TooLarge { max })?;
                if declared > max {
                    return Err(OpenError::TooLarge { max });
                }
                // The frame says how large it is: decompress into exactly that much room; a
                // frame that lies about its size fails here instead of growing the buffer.
                DECOMPRESSOR.with(|cell| {
                    let mut cell = cell.try_borrow_mut().map_err(|_| corrupt.clone())?;
                    if cell.is_none() {
                        *cell = Some(zstd::bulk::Decompressor::new().map_err(|_| corrupt.clone())?);
                    }
                    let decompressor = cell.as_mut().ok_or_else(|| corrupt.clone())?;
                    decompressor.decompress(input, declared).map_err(|_| corrupt.clone())
                })
            }
            Ok(None) => {
                let mut decoder =
                    zstd::stream::read::Decoder::new(input).map_err(|_| corrupt.clone())?;
                decoder.window_log_max(WINDOW_LOG_MAX).map_err(|_| corrupt)?;
                read_bounded(decoder, max)
            }
            Err(_) => Err(corrupt),
        }
    }
}

#[cfg(all(feature = "pure-zstd", not(feature = "zstd")))]
mod zstd_impl {
    use super::{OpenError, read_bounded};
    use whispeer_proto::CompressionAlgorithm;

    /// Largest zstd window a decoder accepts (8 MiB), bounding its memory.
    const MAX_WINDOW: u64 = 1 << 23;

    pub(super) fn compress(input: &[u8], _level: i32) -> Option<Vec<u8>> {
        // ruzstd's encoder implements only its fastest level; other levels would panic.
        Some(ruzstd::encoding::compress_to_vec(input, ruzstd::encoding::CompressionLevel::Fastest))
    }

    pub(super) fn decompress(mut input: &[u8], max: usize) -> Result<Vec<u8>, OpenError> {
        let corrupt = OpenError::Decompress { algorithm: CompressionAlgorithm::Zstd };
        let decoder =
            ruzstd::decoding::StreamingDecoder::new_with_max_window_size(&mut input, MAX_WINDOW)
                .map_err(|_| corrupt)?;
        read_bounded(decoder, max)
    }
}

#[cfg(any(feature = "zstd", feature = "pure-zstd"))]
fn zstd_compress(input: &[u8], level: i32) -> Option<Vec<u8>> {
    zstd_impl::compress(input, level)
}

#[cfg(any(feature = "zstd", feature = "pure-zstd"))]
fn zstd_decompress(input: &[u8], max: usize) -> Result<Vec<u8>, OpenError> {
    zstd_impl::decompress(input, max)
}

/// Without a zstd feature, zstd is not applied when sealing and cannot be opened.
#[cfg(not(any(feature = "zstd", feature = "pure-zstd")))]
fn zstd_compress(_input: &[u8], _level: i32) -> Option<Vec<u8>> {
    None
}

#[cfg(not(any(feature = "zstd", feature = "pure-zstd")))]
fn zstd_decompress(_input: &[u8], _max: usize) -> Result<Vec<u8>, OpenError> {
    Err(OpenError::Unsupported { what: "zstd (built without a zstd feature)" })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(len: usize) -> Vec<u8> {
        b"the quick brown fox jumps over the lazy dog; ".iter().copied().cycle().take(len).collect()
    }

    #[test]
    fn small_or_incompressible_payloads_stay_as_they_are() {
        assert_eq!(Compression::new().compress(&text(100)), None);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        assert_eq!(Compression::lz4().compress(&noise), None);
        assert_eq!(Compression::none().compress(&text(4096)), None);
    }

    #[test]
    #[cfg(any(feature = "zstd", feature = "pure-zstd"))]
    fn round_trip_each_algorithm() {
        for compression in [Compression::new(), Compression::zstd(19), Compression::lz4()] {
            let input = text(10_000);
            let packed = compression.compress(&input).expect("text compresses");
            assert!(packed.len() < input.len() / 4);
            assert_eq!(decompress(compression.algorithm(), &packed, 10_000).unwrap(), input);
        }
    }

    #[test]
    #[cfg(any(feature = "zstd", feature = "pure-zstd"))]
    fn zstd_bomb_is_refused_before_inflating() {
        // 64 MiB of zeros compress to a few KiB.
        let bomb = Compression::zstd(19).compress(&vec![0u8; 64 << 20]).unwrap();
        assert!(bomb.len() < 64 * 1024);
        assert_eq!(
            decompress(CompressionAlgorithm::Zstd, &bomb, 1 << 20),
            Err(OpenError::TooLarge { max: 1 << 20 })
        );
    }

    #[test]
    #[cfg(feature = "zstd")]
    fn zstd_bomb_without_declared_size_stops_at_the_limit() {
        // A streaming encoder does not know the size up front, so the frame declares none.
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 19).unwrap();
        encoder.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut encoder, &vec![0u8; 16 << 20]).unwrap();
        let bomb = encoder.finish().unwrap();
        assert!(matches!(zstd::zstd_safe::get_frame_content_size(&bomb), Ok(None)));
        assert_eq!(
            decompress(CompressionAlgorithm::Zstd, &bomb, 1 << 20),
            Err(OpenError::TooLarge { max: 1 << 20 })
        );
    }

    #[test]
    fn lz4_prefix_is_checked_before_allocating() {
        // Four bytes claiming 4 GiB: refused without allocating.
        let lie = u32::MAX.to_le_bytes();
        assert_eq!(
            decompress(CompressionAlgorithm::Lz4, &lie, 1 << 20),
            Err(OpenError::TooLarge { max: 1 << 20 })
        );
        let mut packed = lz4_flex::block::compress_prepend_size(&text(1000));
        packed.truncate(packed.len() - 3);
        assert!(matches!(
            decompress(CompressionAlgorithm::Lz4, &packed, 1 << 20),
            Err(OpenError::Decompress { .. })
        ));
    }

    #[test]
    #[cfg(any(feature = "zstd", feature = "pure-zstd"))]
    fn corrupt_zstd_is_a_typed_error() {
        for bad in [&b""[..], b"\x28\xb5\x2f\xfd", b"not zstd at all"] {
            assert!(matches!(
                decompress(CompressionAlgorithm::Zstd, bad, 1024),
                Err(OpenError::Decompress { .. })
            ));
        }
    }
}
