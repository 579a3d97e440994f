//! Bounds what a Yjs v1 update, state vector or awareness update may ask of yrs, checked on the
//! raw bytes before yrs decodes them: how deeply values nest, and how many items a count
//! declares.
//!
//! Counts: yrs reserves memory for a declared count before reading the items (a state vector
//! of "250 million clients" in five bytes reserves gigabytes). Every item takes at least one byte,
//! so a count larger than the bytes that follow is a lie; it is refused
//! ([`NestingError::Count`]) before yrs sees it.
//!
//! yrs decodes, renders (JSON), encodes and drops nested values recursively: an update of a few
//! kilobytes holding an array nested 25,000 deep overflows the stack and aborts the process. This
//! scan walks the update with an explicit stack (no recursion) and refuses values nested deeper
//! than [`MAX_VALUE_DEPTH`] and shared types nested deeper than [`MAX_TYPE_DEPTH`] within one
//! update (protocol/README.md §12). It only refuses what it fully understood: bytes it cannot
//! parse are left to yrs, which rejects malformed updates itself.

/// Deepest nesting of a value (`Any` arrays and maps) inside an update.
pub const MAX_VALUE_DEPTH: usize = 128;

/// Deepest chain of shared types (a Y.Array in a Y.Map in ...) created by one update.
pub const MAX_TYPE_DEPTH: usize = 128;

/// An update nests deeper than the limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NestingError {
    #[error("a value nests deeper than {MAX_VALUE_DEPTH} levels (arrays or maps inside each other); refused")]
    Value,
    #[error("shared types nest deeper than {MAX_TYPE_DEPTH} levels; refused")]
    Type,
    #[error("declares {declared} {what} in {bytes} bytes, more than they can hold; refused")]
    Count {
        what: &'static str,
        declared: u64,
        bytes: usize,
    },
}

/// Checks a Yjs v1 update's nesting. `Ok` also for bytes that are not a well-formed update
/// (yrs reports those).
pub fn check_update_v1(bytes: &[u8]) -> Result<(), NestingError> {
    let mut reader = Reader { bytes, at: 0 };
    match scan_blocks(&mut reader) {
        Err(Scan::Nesting(e)) => Err(e),
        Ok(()) | Err(Scan::Unreadable) => Ok(()),
    }
}

/// Checks a state vector (Yjs v1, as in `SyncStep1`): its client count fits its bytes.
pub fn check_state_vector_v1(bytes: &[u8]) -> Result<(), NestingError> {
    let mut reader = Reader { bytes, at: 0 };
    // Each entry is a client id and a clock: two variable-length integers.
    match reader.count("state vector entries", 2) {
        Err(Scan::Nesting(e)) => Err(e),
        _ => Ok(()),
    }
}

/// Checks a y-protocols awareness update: its client count fits its bytes.
pub fn check_awareness_v1(bytes: &[u8]) -> Result<(), NestingError> {
    let mut reader = Reader { bytes, at: 0 };
    // Each entry is a client id, a clock and a JSON string (its length at least).
    match reader.count("awareness entries", 3) {
        Err(Scan::Nesting(e)) => Err(e),
        _ => Ok(()),
    }
}

/// Checks every message of a y-protocols frame (y-websocket: sync step 1 and 2, updates,
/// awareness) before yrs decodes it: state vectors and awareness counts, and updates' nesting
/// and counts. Messages it does not know are left to the decoder.
pub fn check_y_protocols_frame(bytes: &[u8]) -> Result<(), NestingError> {
    let mut reader = Reader { bytes, at: 0 };
    while reader.at < bytes.len() {
        let Ok(kind) = reader.var() else {
            return Ok(());
        };
        let checked = match kind {
            // Sync: step 1 (a state vector), step 2 or update (an update).
            0 => {
                let Ok(step) = reader.var() else {
                    return Ok(());
                };
                let Ok(payload) = reader.buf() else {
                    return Ok(());
                };
                match step {
                    0 => check_state_vector_v1(payload),
                    1 | 2 => check_update_v1(payload),
                    _ => return Ok(()),
                }
            }
            1 => {
                let Ok(payload) = reader.buf() else {
                    return Ok(());
                };
                check_awareness_v1(payload)
            }
            // Read exactly as yrs reads them, so that both agree where the next message starts.
            // Auth: a permission byte, then a reason only if it is 0 (denied).
            2 => {
                match reader.var() {
                    Ok(0) => {
                        if reader.buf().is_err() {
                            return Ok(());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return Ok(()),
                }
                Ok(())
            }
            // Awareness query: nothing follows.
            3 => Ok(()),
            // Any other tag: a buffer yrs keeps as a custom message, and reads on after it.
            _ => {
                if reader.buf().is_err() {
                    return Ok(());
                }
                Ok(())
            }
        };
        checked?;
    }
    Ok(())
}

enum Scan {
    Nesting(NestingError),
    /// Not an update this scan understands: left to the decoder.
    Unreadable,
}

impl From<NestingError> for Scan {
    fn from(e: NestingError) -> Self {
        Scan::Nesting(e)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> Result<u8, Scan> {
        let byte = *self.bytes.get(self.at).ok_or(Scan::Unreadable)?;
        self.at += 1;
        Ok(byte)
    }

    /// An unsigned (or lib0 signed: same continuation bit) variable-length integer.
    fn var(&mut self) -> Result<u64, Scan> {
        let mut value: u64 = 0;
        for shift in (0..70).step_by(7) {
            let byte = self.u8()?;
            if shift < 64 {
                value |= u64::from(byte & 0x7f) << shift;
            }
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Scan::Unreadable)
    }

    fn skip(&mut self, n: u64) -> Result<(), Scan> {
        let n = usize::try_from(n).map_err(|_| Scan::Unreadable)?;
        let end = self.at.checked_add(n).ok_or(Scan::Unreadable)?;
        if end > self.bytes.len() {
            return Err(Scan::Unreadable);
        }
        self.at = end;
        Ok(())
    }

    /// A count of items that take at least `min_item_len` bytes each: refused if the bytes
    /// left cannot hold them.
    fn count(&mut self, what: &'static str, min_item_len: u64) -> Result<u64, Scan> {
        let declared = self.var()?;
        let left = self.bytes.len() - self.at;
        if declared.saturating_mul(min_item_len) > left as u64 {
            return Err(NestingError::Count {
                what,
                declared,
                bytes: left,
            }
            .into());
        }
        Ok(declared)
    }

    /// A length-prefixed buffer's bytes.
    fn buf(&mut self) -> Result<&[u8], Scan> {
        let len = self.var()?;
        let start = self.at;
        self.skip(len)?;
        Ok(&self.bytes[start..self.at])
    }

    /// A length-prefixed string or buffer.
    fn skip_buf(&mut self) -> Result<(), Scan> {
        let len = self.var()?;
        self.skip(len)
    }

    fn id(&mut self) -> Result<(u64, u64), Scan> {
        Ok((self.var()?, self.var()?))
    }
}

const HAS_ORIGIN: u8 = 0b1000_0000;
const HAS_RIGHT_ORIGIN: u8 = 0b0100_0000;
const HAS_PARENT_SUB: u8 = 0b0010_0000;

fn scan_blocks(r: &mut Reader<'_>) -> Result<(), Scan> {
    // Depth of each shared type this update creates, by its item id.
    let mut type_depth: std::collections::HashMap<(u64, u64), usize> = Default::default();
    // Each client's group: a block count, the client id and a clock.
    let clients = r.count("client groups", 3)?;
    for _ in 0..clients {
        let blocks = r.count("blocks", 1)?;
        let client = r.var()?;
        let mut clock = r.var()?;
        for _ in 0..blocks {
            let info = r.u8()?;
            let len = match info {
                0 | 10 => r.var()?, // GC, Skip
                _ => {
                    if info & HAS_ORIGIN != 0 {
                        r.id()?;
                    }
                    if info & HAS_RIGHT_ORIGIN != 0 {
                        r.id()?;
                    }
                    let mut depth = 1;
                    if info & (HAS_ORIGIN | HAS_RIGHT_ORIGIN) == 0 {
                        if r.var()? == 1 {
                            r.skip_buf()?; // a root's name
                        } else {
                            let parent = r.id()?;
                            depth = type_depth.get(&parent).map_or(1, |d| d + 1);
                        }
                        if info & HAS_PARENT_SUB != 0 {
                            r.skip_buf()?;
                        }
                    }
                    scan_content(r, info, (client, clock), depth, &mut type_depth)?
                }
            };
            clock = clock.saturating_add(len);
        }
    }
    Ok(())
}

/// Skips one item's content; returns its length in clock units.
fn scan_content(
    r: &mut Reader<'_>,
    info: u8,
    id: (u64, u64),
    depth: usize,
    type_depth: &mut std::collections::HashMap<(u64, u64), usize>,
) -> Result<u64, Scan> {
    Ok(match info & 0b1111 {
        1 => r.var()?, // deleted
        2 => {
            // JSON: yrs reads `len` and then len + 1 strings
            let count = r.count("JSON values", 1)?;
            for _ in 0..=count {
                r.skip_buf()?;
            }
            count.saturating_add(1)
        }
        4 => {
            // A string spans its UTF-16 length in clock units.
            let len = r.var()?;
            let start = r.at;
            r.skip(len)?;
            utf16_len(&r.bytes[start..r.at])
        }
        3 | 5 => {
            // binary; embed (JSON text, parsed by serde_json with its own depth limit)
            r.skip_buf()?;
            1
        }
        6 => {
            r.skip_buf()?;
            r.skip_buf()?;
            1
        }
        7 => {
            let type_ref = r.u8()?;
            match type_ref {
                3 => r.skip_buf()?, // an XML element's name
                0..=2 | 4..=6 | 9 | 15 => {}
                _ => return Err(Scan::Unreadable), // weak links and unknown types: not ours to judge
            }
            if depth > MAX_TYPE_DEPTH {
                return Err(NestingError::Type.into());
            }
            type_depth.insert(id, depth);
            1
        }
        8 => {
            let count = r.count("values", 1)?;
            for _ in 0..count {
                skip_any(r)?;
            }
            count
        }
        9 => {
            r.skip_buf()?; // a subdocument's guid
            skip_any(r)?;
            1
        }
        _ => return Err(Scan::Unreadable),
    })
}

/// UTF-16 length of UTF-8 bytes without decoding them: one unit per character (every byte
/// that is not a continuation byte), two for characters of four bytes.
fn utf16_len(utf8: &[u8]) -> u64 {
    utf8.iter()
        .map(|&b| u64::from(b & 0xc0 != 0x80) + u64::from(b >= 0xf0))
        .sum()
}

/// Skips one lib0 `Any` value without recursion, refusing nesting beyond [`MAX_VALUE_DEPTH`].
fn skip_any(r: &mut Reader<'_>) -> Result<(), Scan> {
    // Values still to read at each open level (map entries count their key themselves).
    let mut open: Vec<(u64, bool)> = Vec::new();
    let mut pending: u64 = 1;
    let mut in_map = false;
    loop {
        while pending == 0 {
            match open.pop() {
                Some((left, map)) => {
                    pending = left;
                    in_map = map;
                }
                None => return Ok(()),
            }
        }
        pending -= 1;
        if in_map {
            r.skip_buf()?; // the entry's key
        }
        match r.u8()? {
            127 | 126 | 121 | 120 => {}
            125 => {
                r.var()?;
            }
            124 => r.skip(4)?,
            123 | 122 => r.skip(8)?,
            119 | 116 => r.skip_buf()?,
            tag @ (118 | 117) => {
                // An array item is a tag at least; a map entry a key length and a tag.
                let len = r.count("nested values", if tag == 118 { 2 } else { 1 })?;
                if open.len() + 1 > MAX_VALUE_DEPTH {
                    return Err(NestingError::Value.into());
                }
                open.push((pending, in_map));
                pending = len;
                in_map = tag == 118;
            }
            _ => return Err(Scan::Unreadable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use yrs::updates::decoder::Decode;
    use yrs::updates::encoder::Encode;
    use yrs::{Any, Map, ReadTxn, Text, Transact};

    fn nested_array(depth: usize) -> Any {
        let mut value = Any::from(1);
        for _ in 1..depth {
            value = Any::from(vec![value]);
        }
        value
    }

    fn update_with(value: Any) -> Vec<u8> {
        let doc = yrs::Doc::new();
        let map = doc.get_or_insert_map("m");
        let mut txn = doc.transact_mut();
        map.insert(&mut txn, "k", value);
        txn.encode_update_v1()
    }

    /// Builds the bytes of a map value nested `depth` deep by hand (yrs itself would recurse
    /// to encode it).
    fn deep_update_bytes(depth: usize) -> Vec<u8> {
        let inner = update_with(Any::from(1));
        // The shallow update ends with: ..., 8 (Any), 1 (one value), 125 (int), 1, delete set 0.
        let tail = [1u8, 125, 1, 0];
        assert!(inner.ends_with(&tail), "{inner:?}");
        let mut bytes = inner[..inner.len() - 3].to_vec();
        for _ in 0..depth {
            bytes.extend_from_slice(&[117, 1]);
        }
        bytes.extend_from_slice(&[125, 1, 0]);
        bytes
    }

    #[test]
    fn values_within_the_limit_pass_and_decode() {
        let bytes = update_with(nested_array(MAX_VALUE_DEPTH));
        assert_eq!(check_update_v1(&bytes), Ok(()));
        assert!(yrs::Update::decode_v1(&bytes).is_ok());
        let object = Any::from(std::collections::HashMap::from([(
            "a".to_string(),
            nested_array(10),
        )]));
        assert_eq!(check_update_v1(&update_with(object)), Ok(()));
    }

    #[test]
    fn deeper_values_are_refused_without_recursion() {
        // The hand-built bytes are a valid update at a depth yrs handles.
        let shallow = deep_update_bytes(10);
        assert_eq!(check_update_v1(&shallow), Ok(()));
        assert!(yrs::Update::decode_v1(&shallow).is_ok());
        assert_eq!(
            check_update_v1(&deep_update_bytes(MAX_VALUE_DEPTH + 1)),
            Err(NestingError::Value)
        );
        // Deep enough to overflow any thread's stack in a recursive decoder.
        assert_eq!(
            check_update_v1(&deep_update_bytes(1_000_000)),
            Err(NestingError::Value)
        );
    }

    #[test]
    fn nested_shared_types_are_bounded() {
        let doc = yrs::Doc::new();
        let root = doc.get_or_insert_map("m");
        let mut txn = doc.transact_mut();
        let mut map = root.insert(&mut txn, "k", yrs::MapPrelim::default());
        for _ in 0..MAX_TYPE_DEPTH + 5 {
            map = map.insert(&mut txn, "k", yrs::MapPrelim::default());
        }
        let bytes = txn.encode_update_v1();
        assert_eq!(check_update_v1(&bytes), Err(NestingError::Type));
    }

    #[test]
    fn utf16_lengths_match_the_standard_library() {
        for text in ["", "abc", "é", "😀", "a😀é\u{10FFFF}x", "日本語"] {
            assert_eq!(
                utf16_len(text.as_bytes()),
                text.encode_utf16().count() as u64,
                "{text}"
            );
        }
    }

    #[test]
    fn counts_beyond_the_bytes_are_refused() {
        // Five bytes declaring ~250 million entries: yrs would reserve gigabytes for them.
        let lie = [0xff, 0xff, 0xff, 0x7a, 0x00];
        assert!(matches!(
            check_state_vector_v1(&lie),
            Err(NestingError::Count { .. })
        ));
        assert!(matches!(
            check_awareness_v1(&lie),
            Err(NestingError::Count { .. })
        ));
        assert!(matches!(
            check_update_v1(&lie),
            Err(NestingError::Count { .. })
        ));
        // The same inside a y-protocols frame: sync step 1, then awareness.
        let mut frame = vec![0, 0, lie.len() as u8];
        frame.extend_from_slice(&lie);
        assert!(matches!(
            check_y_protocols_frame(&frame),
            Err(NestingError::Count { .. })
        ));
        let mut frame = vec![1, lie.len() as u8];
        frame.extend_from_slice(&lie);
        assert!(matches!(
            check_y_protocols_frame(&frame),
            Err(NestingError::Count { .. })
        ));
        // Behind messages yrs reads on after: a custom one, an auth one (granted, then denied).
        for prefix in [
            &[4u8, 0][..],
            &[2, 1][..],
            &[2, 0, 2, b'n', b'o'][..],
            &[3][..],
        ] {
            let mut frame = prefix.to_vec();
            frame.extend_from_slice(&[0, 0, lie.len() as u8]);
            frame.extend_from_slice(&lie);
            assert!(
                matches!(
                    check_y_protocols_frame(&frame),
                    Err(NestingError::Count { .. })
                ),
                "{prefix:?}"
            );
        }
        // An Any array declaring more values than bytes.
        let inner = update_with(Any::from(1));
        let mut bytes = inner[..inner.len() - 3].to_vec();
        bytes.extend_from_slice(&[117, 0xff, 0xff, 0xff, 0x7f, 125, 1, 0]);
        assert!(matches!(
            check_update_v1(&bytes),
            Err(NestingError::Count { .. })
        ));
    }

    #[test]
    fn honest_counts_pass() {
        let doc = yrs::Doc::new();
        let text = doc.get_or_insert_text("t");
        for i in 0..50 {
            let other = yrs::Doc::with_client_id(1000 + i);
            let t = other.get_or_insert_text("t");
            t.insert(&mut other.transact_mut(), 0, "hello");
            let update = other
                .transact()
                .encode_state_as_update_v1(&Default::default());
            doc.transact_mut()
                .apply_update(yrs::Update::decode_v1(&update).unwrap())
                .unwrap();
        }
        let _ = text;
        let sv = doc.transact().state_vector().encode_v1();
        assert_eq!(check_state_vector_v1(&sv), Ok(()));
        let update = doc
            .transact()
            .encode_state_as_update_v1(&Default::default());
        assert_eq!(check_update_v1(&update), Ok(()));
        let empty_sv = yrs::StateVector::default().encode_v1();
        assert_eq!(check_state_vector_v1(&empty_sv), Ok(()));
        let awareness = crate::presence::single(7, 1, Some(&serde_json::json!({"a": 1})));
        assert_eq!(check_awareness_v1(&awareness.encode_v1()), Ok(()));
        let mut frame = vec![0, 0, sv.len() as u8];
        frame.extend_from_slice(&sv);
        assert_eq!(check_y_protocols_frame(&frame), Ok(()));
    }

    #[test]
    fn malformed_bytes_are_left_to_the_decoder() {
        assert_eq!(check_update_v1(&[]), Ok(()));
        assert_eq!(check_update_v1(&[1, 1, 5, 0, 8, 1, 117]), Ok(()));
    }
}
