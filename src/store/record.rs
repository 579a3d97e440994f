//! The on-disk record format of document updates and snapshots.
//!
//! Log record, one update:     `[version=1][crc32 LE u32 of payload][payload: Yjs update v1]`
//! Log record, a batch:        `[version=2][crc32 LE u32 of payload][payload]`, the payload being
//!                             `([len LE u32][Yjs update v1])*`: the updates of one group commit
//!                             in order, so a commit costs one insert per document, not per update
//! Snapshot record:            `[version=1][upto seq BE u64][crc32 LE u32 of payload][payload]`
//!
//! The checksum catches torn or bit-rotted records before yrs ever sees them.

const VERSION: u8 = 1;
const VERSION_BATCH: u8 = 2;

/// Why a stored record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("unknown record version {0}")]
    UnknownVersion(u8),
    #[error("checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("batch record framing is broken at byte {0}")]
    BadBatch(usize),
}

/// Encodes a log record holding `updates` in order (one: version 1; more: a version 2 batch).
pub fn encode_log<B: AsRef<[u8]>>(updates: &[B]) -> Vec<u8> {
    if let [one] = updates {
        let payload = one.as_ref();
        let mut out = Vec::with_capacity(5 + payload.len());
        out.push(VERSION);
        out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        out.extend_from_slice(payload);
        return out;
    }
    let len: usize = updates.iter().map(|u| 4 + u.as_ref().len()).sum();
    let mut out = Vec::with_capacity(5 + len);
    out.push(VERSION_BATCH);
    out.extend_from_slice(&[0; 4]);
    for update in updates {
        let update = update.as_ref();
        out.extend_from_slice(&(update.len() as u32).to_le_bytes());
        out.extend_from_slice(update);
    }
    let crc = crc32fast::hash(&out[5..]);
    out[1..5].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a log record into its updates, in the order they were written.
pub fn decode_log(bytes: &[u8]) -> Result<Vec<&[u8]>, RecordError> {
    let (&version, rest) = bytes
        .split_first()
        .ok_or(RecordError::Truncated(bytes.len()))?;
    match version {
        VERSION => Ok(vec![checked_payload(rest, bytes.len())?]),
        VERSION_BATCH => {
            let mut payload = checked_payload(rest, bytes.len())?;
            let mut updates = Vec::new();
            while !payload.is_empty() {
                let at = bytes.len() - payload.len();
                let (len, tail) = payload
                    .split_first_chunk::<4>()
                    .ok_or(RecordError::BadBatch(at))?;
                let len = u32::from_le_bytes(*len) as usize;
                if len > tail.len() {
                    return Err(RecordError::BadBatch(at));
                }
                let (update, tail) = tail.split_at(len);
                updates.push(update);
                payload = tail;
            }
            Ok(updates)
        }
        other => Err(RecordError::UnknownVersion(other)),
    }
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
        let rec = encode_log(&[b"hello"]);
        assert_eq!(decode_log(&rec), Ok(vec![&b"hello"[..]]));
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
    fn batch_round_trip_keeps_order_and_empty_updates() {
        let updates: [&[u8]; 3] = [b"one", b"", b"three"];
        let rec = encode_log(&updates);
        assert_eq!(rec[0], VERSION_BATCH);
        assert_eq!(decode_log(&rec), Ok(updates.to_vec()));
        let mut bad = rec.clone();
        bad[9] ^= 1;
        assert!(matches!(
            decode_log(&bad),
            Err(RecordError::Checksum { .. })
        ));
    }

    #[test]
    fn batch_with_a_length_past_its_end_is_refused() {
        // A valid checksum over broken framing: an update claims 100 bytes, 3 follow.
        let mut payload = 100u32.to_le_bytes().to_vec();
        payload.extend_from_slice(b"abc");
        let mut rec = vec![VERSION_BATCH];
        rec.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        rec.extend_from_slice(&payload);
        assert_eq!(decode_log(&rec), Err(RecordError::BadBatch(5)));
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
