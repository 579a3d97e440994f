//! The on-disk record format of document updates and snapshots.
//!
//! Log record:      `[version=1][crc32 LE u32 of payload][payload: Yjs update v1]`
//! Snapshot record: `[version=1][upto seq BE u64][crc32 LE u32 of payload][payload: Yjs update v1]`
//!
//! The checksum catches torn or bit-rotted records before yrs ever sees them.

const VERSION: u8 = 1;

/// Why a stored record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("unknown record version {0}")]
    UnknownVersion(u8),
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
}

pub fn encode_log(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(VERSION);
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

pub fn decode_log(bytes: &[u8]) -> Result<&[u8], RecordError> {
    let (&version, rest) = bytes
        .split_first()
        .ok_or(RecordError::Truncated(bytes.len()))?;
    if version != VERSION {
        return Err(RecordError::UnknownVersion(version));
    }
    checked_payload(rest, bytes.len())
}

pub fn encode_snapshot(upto: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + payload.len());
    out.push(VERSION);
    out.extend_from_slice(&upto.to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

pub fn decode_snapshot(bytes: &[u8]) -> Result<(u64, &[u8]), RecordError> {
    let (&version, rest) = bytes
        .split_first()
        .ok_or(RecordError::Truncated(bytes.len()))?;
    if version != VERSION {
        return Err(RecordError::UnknownVersion(version));
    }
    let (upto, rest) = rest
        .split_first_chunk::<8>()
        .ok_or(RecordError::Truncated(bytes.len()))?;
    Ok((
        u64::from_be_bytes(*upto),
        checked_payload(rest, bytes.len())?,
    ))
}

fn checked_payload(rest: &[u8], total: usize) -> Result<&[u8], RecordError> {
    let (crc, payload) = rest
        .split_first_chunk::<4>()
        .ok_or(RecordError::Truncated(total))?;
    let stored = u32::from_le_bytes(*crc);
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(RecordError::Checksum { stored, computed });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn log_round_trip_and_corruption() {
        let rec = encode_log(b"hello");
        assert_eq!(decode_log(&rec), Ok(&b"hello"[..]));
        let mut bad = rec.clone();
        bad[6] ^= 1;
        assert!(matches!(
            decode_log(&bad),
            Err(RecordError::Checksum { .. })
        ));
        assert_eq!(decode_log(&[]), Err(RecordError::Truncated(0)));
        assert_eq!(
            decode_log(&[9, 0, 0, 0, 0]),
            Err(RecordError::UnknownVersion(9))
        );
    }

    #[test]
    fn snapshot_round_trip() {
        let rec = encode_snapshot(42, b"state");
        assert_eq!(decode_snapshot(&rec), Ok((42, &b"state"[..])));
        assert!(decode_snapshot(&rec[..5]).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_log(&bytes);
            let _ = decode_snapshot(&bytes);
        }
    }
}
