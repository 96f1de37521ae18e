//! The binary frame that carries one sealed chunk (or a refusal) on a device's `chunk/resp`
//! topic (PROTOCOL.md §Chunk frames). Binary because chunks are most of the bytes on the wire
//! and base64 would add a third.
//!
//! ```text
//! offset  size  field
//! 0       4     magic "ALC1"
//! 4       1     kind: 0 = data, 1 = error
//! 5       1     n = artifact id length (1..=64)
//! 6       n     artifact id, ASCII
//! 6+n     4     chunk index, u32 big-endian
//! 10+n    4     chunk count, u32 big-endian
//! 14+n    ..    data: the sealed chunk (kind 0) or an error code in ASCII (kind 1)
//! ```

use crate::ids::{ArtifactId, MAX_ID_LEN};

pub const MAGIC: &[u8; 4] = b"ALC1";
/// Largest frame a device needs to accept: a maximal chunk plus header.
pub const MAX_FRAME_BYTES: usize =
    crate::manifest::MAX_CHUNK_BYTES as usize + crate::crypto::TAG_LEN + 14 + MAX_ID_LEN;

/// Error codes the orchestrator sends in error frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkErrorCode {
    /// The artifact is unknown or not part of a campaign this device is in.
    UnknownArtifact,
    /// The index is beyond the artifact's chunk count.
    OutOfRange,
    /// The device's state in the campaign does not allow downloading.
    NotDownloading,
    /// The orchestrator is serving as many bytes as it will at once: the chunk was not sent.
    /// The frame's count field carries how long to wait before asking again, in ms (1.4).
    Busy,
}

impl ChunkErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkErrorCode::UnknownArtifact => "unknown_artifact",
            ChunkErrorCode::OutOfRange => "out_of_range",
            ChunkErrorCode::NotDownloading => "not_downloading",
            ChunkErrorCode::Busy => "busy",
        }
    }

    fn parse(s: &[u8]) -> Option<Self> {
        match s {
            b"unknown_artifact" => Some(Self::UnknownArtifact),
            b"out_of_range" => Some(Self::OutOfRange),
            b"not_downloading" => Some(Self::NotDownloading),
            b"busy" => Some(Self::Busy),
            _ => None,
        }
    }
}

/// A decoded frame, borrowing its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkFrame<'a> {
    Data {
        artifact: ArtifactId,
        index: u32,
        count: u32,
        sealed: &'a [u8],
    },
    Error {
        artifact: ArtifactId,
        index: u32,
        code: ChunkErrorCode,
        /// For `busy`: milliseconds to wait before asking for `index` again (the count field);
        /// 0 for every other code.
        retry_after_ms: u32,
    },
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame is truncated")]
    Truncated,
    #[error("frame does not start with ALC1")]
    BadMagic,
    #[error("unknown frame kind {0}")]
    BadKind(u8),
    #[error("frame's artifact id is invalid")]
    BadArtifact,
    #[error("frame is larger than {MAX_FRAME_BYTES} bytes")]
    TooLarge,
    #[error("unknown error code in frame")]
    BadErrorCode,
}

fn header(kind: u8, artifact: &ArtifactId, index: u32, count: u32, extra: usize) -> Vec<u8> {
    let a = artifact.as_str().as_bytes();
    let mut f = Vec::with_capacity(14 + a.len() + extra);
    f.extend_from_slice(MAGIC);
    f.push(kind);
    f.push(a.len() as u8);
    f.extend_from_slice(a);
    f.extend_from_slice(&index.to_be_bytes());
    f.extend_from_slice(&count.to_be_bytes());
    f
}

/// The length of a frame's header for `artifact`: everything before the data.
pub fn header_len(artifact: &ArtifactId) -> usize {
    14 + artifact.as_str().len()
}

/// Encodes a data frame.
pub fn encode_data(artifact: &ArtifactId, index: u32, count: u32, sealed: &[u8]) -> Vec<u8> {
    let mut f = header(0, artifact, index, count, sealed.len());
    f.extend_from_slice(sealed);
    f
}

/// Encodes an error frame about chunk `index`.
pub fn encode_error(artifact: &ArtifactId, index: u32, code: ChunkErrorCode) -> Vec<u8> {
    let code = code.as_str().as_bytes();
    let mut f = header(1, artifact, index, 0, code.len());
    f.extend_from_slice(code);
    f
}

/// Encodes a `busy` frame: chunk `index` (and those requested after it) was not sent; ask
/// again after `retry_after_ms`.
pub fn encode_busy(artifact: &ArtifactId, index: u32, retry_after_ms: u32) -> Vec<u8> {
    let code = ChunkErrorCode::Busy.as_str().as_bytes();
    let mut f = header(1, artifact, index, retry_after_ms, code.len());
    f.extend_from_slice(code);
    f
}

/// Decodes a frame received from the network.
pub fn decode(frame: &[u8]) -> Result<ChunkFrame<'_>, FrameError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge);
    }
    let magic = frame.get(..4).ok_or(FrameError::Truncated)?;
    if magic != MAGIC {
        return Err(FrameError::BadMagic);
    }
    let kind = *frame.get(4).ok_or(FrameError::Truncated)?;
    let n = *frame.get(5).ok_or(FrameError::Truncated)? as usize;
    let id = frame.get(6..6 + n).ok_or(FrameError::Truncated)?;
    let artifact = std::str::from_utf8(id)
        .ok()
        .and_then(|s| ArtifactId::new(s).ok())
        .ok_or(FrameError::BadArtifact)?;
    let word = |at: usize| -> Result<u32, FrameError> {
        let b = frame.get(at..at + 4).ok_or(FrameError::Truncated)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let index = word(6 + n)?;
    let count = word(10 + n)?;
    let data = frame.get(14 + n..).ok_or(FrameError::Truncated)?;
    match kind {
        0 => Ok(ChunkFrame::Data {
            artifact,
            index,
            count,
            sealed: data,
        }),
        1 => {
            let code = ChunkErrorCode::parse(data).ok_or(FrameError::BadErrorCode)?;
            let retry_after_ms = if code == ChunkErrorCode::Busy {
                count
            } else {
                0
            };
            Ok(ChunkFrame::Error {
                artifact,
                index,
                code,
                retry_after_ms,
            })
        }
        k => Err(FrameError::BadKind(k)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn data_and_error_frames_round_trip() {
        let a = ArtifactId::new("fw-1").unwrap();
        let f = encode_data(&a, 7, 9, b"sealed");
        assert_eq!(
            decode(&f).unwrap(),
            ChunkFrame::Data {
                artifact: a.clone(),
                index: 7,
                count: 9,
                sealed: b"sealed"
            }
        );
        let e = encode_error(&a, 3, ChunkErrorCode::OutOfRange);
        assert!(matches!(
            decode(&e).unwrap(),
            ChunkFrame::Error {
                code: ChunkErrorCode::OutOfRange,
                index: 3,
                ..
            }
        ));
    }

    #[test]
    fn a_busy_frame_carries_its_wait_in_the_count_field() {
        let a = ArtifactId::new("fw-1").unwrap();
        let f = encode_busy(&a, 5, 750);
        assert_eq!(
            hex::encode(&f),
            "414c4331010466772d3100000005000002ee62757379"
        );
        assert_eq!(
            decode(&f).unwrap(),
            ChunkFrame::Error {
                artifact: a.clone(),
                index: 5,
                code: ChunkErrorCode::Busy,
                retry_after_ms: 750,
            }
        );
        // Every other error code ignores the count field.
        let mut e = encode_error(&a, 3, ChunkErrorCode::OutOfRange);
        e[13] = 9;
        assert!(matches!(
            decode(&e).unwrap(),
            ChunkFrame::Error {
                retry_after_ms: 0,
                ..
            }
        ));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let a = ArtifactId::new("fw-1").unwrap();
        let f = encode_data(&a, 7, 9, b"");
        for cut in 0..f.len() {
            assert!(decode(&f[..cut]).is_err(), "cut at {cut}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }
    }
}
