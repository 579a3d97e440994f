//! Where a change's time goes: timestamps at each hop of a live change's path (the app's
//! request read by the IPC server, applied, sent to a peer; received by the peer, applied there,
//! handed to the peer's app), for the per-hop breakdown of `devicelink bench`.
//!
//! Each hop is a trace event on the target [`TARGET`] with the fields `stage`, `doc` and
//! `at_us` (microseconds since the Unix epoch, comparable between the processes of one
//! machine). They are off unless the log filter enables the target
//! (`RUST_LOG=devicelink::hop=trace`); off, a hop costs one check of the callsite's interest and
//! the timestamp is not even read.

/// The trace target of hop events.
pub const TARGET: &str = "devicelink::hop";

/// Microseconds since the Unix epoch (0 for a clock set before 1970).
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Records that a change of `doc` passed `stage` now (see the module docs).
#[macro_export]
macro_rules! hop {
    ($stage:literal, $doc:expr) => {
        tracing::trace!(
            target: $crate::hops::TARGET,
            stage = $stage,
            doc = %$doc,
            at_us = $crate::hops::unix_us()
        )
    };
}

/// One hop event read back from a log line: `(stage, doc, at_us)`.
pub fn parse(line: &str) -> Option<(&str, &str, u64)> {
    if !line.contains(TARGET) {
        return None;
    }
    let field = |name: &str| field(line, name);
    Some((
        field("stage")?,
        field("doc")?,
        field("at_us")?.parse().ok()?,
    ))
}

/// The value of ` name=value` in `line`, without quotes.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_lines_read_back() {
        let line = "2026-12-08T01:00:00.000001Z TRACE devicelink::hop: stage=\"sent\" doc=hops \
                    at_us=1796000000000001";
        assert_eq!(parse(line), Some(("sent", "hops", 1_796_000_000_000_001)));
        assert_eq!(
            parse("2026 INFO devicelink::net: stage=x doc=y at_us=1"),
            None
        );
        assert_eq!(
            parse("devicelink::hop: stage=\"sent\" doc=hops at_us=soon"),
            None
        );
    }
}
