//! Content codings of ingest bodies: `identity` and `zstd` (RFC 8878,
//! `Content-Encoding: zstd` over HTTP; `$.ce=zstd` on MQTT).
//!
//! Decompression is bounded: the decoder streams into a buffer and stops
//! one byte past the limit, and its window is capped, so a small body that
//! expands to gigabytes ("zip bomb") costs at most the limit plus the window
//! in memory and is refused as too large.

use std::io::Read;

/// A content coding the hub accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentCoding {
    Identity,
    Zstd,
}

/// The value of an `Accept-Encoding` answer listing what the hub accepts.
pub const ACCEPTED: &str = "zstd, identity";

/// Why a body could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("unsupported Content-Encoding {0:?} (accepted: zstd, identity)")]
    Unsupported(String),
    #[error("decompressed body larger than {max} bytes")]
    TooLarge { max: usize },
    #[error("body is not valid zstd: {0}")]
    Corrupt(String),
}

impl ContentCoding {
    /// Parses a `Content-Encoding` header value (absent = identity). One
    /// coding only; names are case-insensitive.
    pub fn parse(header: Option<&str>) -> Result<Self, DecodeError> {
        let Some(v) = header else {
            return Ok(Self::Identity);
        };
        match v.trim().to_ascii_lowercase().as_str() {
            "" | "identity" => Ok(Self::Identity),
            "zstd" => Ok(Self::Zstd),
            _ => Err(DecodeError::Unsupported(v.chars().take(64).collect())),
        }
    }
}

/// The decoder's window limit for a decompressed-size limit of `max` bytes:
/// the limit rounded up to a power of two, between 2 MiB (what common
/// encoders use at their default levels) and 128 MiB (libzstd's default).
fn window_log_max(max: usize) -> u32 {
    let log = usize::BITS - max.saturating_sub(1).leading_zeros();
    log.clamp(21, 27)
}

/// Decodes `body` per `coding`, refusing output larger than `max` bytes
/// without ever holding more than `max + 1` of it.
pub fn decode(
    coding: ContentCoding,
    body: bytes::Bytes,
    max: usize,
) -> Result<bytes::Bytes, DecodeError> {
    match coding {
        ContentCoding::Identity => {
            if body.len() > max {
                return Err(DecodeError::TooLarge { max });
            }
            Ok(body)
        }
        ContentCoding::Zstd => {
            let corrupt = |e: std::io::Error| {
                // libzstd's "frameParameter_windowTooLarge": the frame wants
                // a window beyond the cap, i.e. more memory than the limit.
                if e.to_string().contains("too much memory") {
                    DecodeError::TooLarge { max }
                } else {
                    DecodeError::Corrupt(e.to_string())
                }
            };
            let mut dec = zstd::stream::read::Decoder::with_buffer(&body[..]).map_err(corrupt)?;
            dec.window_log_max(window_log_max(max)).map_err(corrupt)?;
            let mut out = Vec::with_capacity(body.len().saturating_mul(4).min(max));
            dec.take(max as u64 + 1)
                .read_to_end(&mut out)
                .map_err(corrupt)?;
            if out.len() > max {
                return Err(DecodeError::TooLarge { max });
            }
            Ok(out.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codings_are_parsed_case_insensitively_and_others_refused() {
        assert_eq!(ContentCoding::parse(None).unwrap(), ContentCoding::Identity);
        assert_eq!(
            ContentCoding::parse(Some("identity")).unwrap(),
            ContentCoding::Identity
        );
        assert_eq!(
            ContentCoding::parse(Some(" ZSTD ")).unwrap(),
            ContentCoding::Zstd
        );
        for bad in ["gzip", "br", "zstd, gzip", "deflate"] {
            assert!(matches!(
                ContentCoding::parse(Some(bad)),
                Err(DecodeError::Unsupported(_))
            ));
        }
    }

    #[test]
    fn zstd_round_trips_and_the_limit_applies_to_the_decompressed_size() {
        let data: Vec<u8> = (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let z = zstd::bulk::compress(&data, 3).unwrap();
        let out = decode(ContentCoding::Zstd, z.clone().into(), data.len()).unwrap();
        assert_eq!(&out[..], &data[..]);
        assert!(matches!(
            decode(ContentCoding::Zstd, z.into(), data.len() - 1),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(matches!(
            decode(ContentCoding::Zstd, b"not zstd at all"[..].into(), 1000),
            Err(DecodeError::Corrupt(_))
        ));
        assert!(matches!(
            decode(ContentCoding::Identity, vec![0u8; 11].into(), 10),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    /// `mib` MiB of zeros streamed at `level` (no content size in the frame
    /// header, as a hostile client would send it).
    fn bomb(level: i32, mib: usize) -> Vec<u8> {
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), level).unwrap();
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..mib {
            std::io::Write::write_all(&mut enc, &chunk).unwrap();
        }
        enc.finish().unwrap()
    }

    #[test]
    fn a_bomb_is_refused_after_reading_just_past_the_limit() {
        let max = 4 * 1024 * 1024;
        // A window within the cap: decoding stops one byte past the limit.
        let b = bomb(1, 256);
        assert!(b.len() < 64 * 1024, "{}", b.len());
        match decode(ContentCoding::Zstd, b.into(), max) {
            Err(DecodeError::TooLarge { max: m }) => assert_eq!(m, max),
            other => panic!("expected TooLarge, got {other:?}"),
        }
        // A frame asking for a bigger window than the limit warrants (8 MiB
        // at level 19) is refused before any output.
        let b = bomb(19, 16);
        assert!(matches!(
            decode(ContentCoding::Zstd, b.into(), max),
            Err(DecodeError::TooLarge { .. })
        ));
        assert_eq!(window_log_max(max), 22);
        assert_eq!(window_log_max(max + 1), 23);
        assert_eq!(window_log_max(1000), 21);
        assert_eq!(window_log_max(usize::MAX), 27);
    }
}
