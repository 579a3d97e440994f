//! What users type, parsed with errors that say what to type instead: durations (`90s`, `5m`,
//! `1h`), libp2p addresses (a bare `127.0.0.1:4001` gets the multiaddr it means), and references
//! to a device by its name or a unique prefix of its id.

use std::time::Duration;

use libp2p::{Multiaddr, PeerId};

/// A duration: whole seconds (`90`), or a number with a unit: `s`, `m`, `h`, `d` (`90s`, `5m`,
/// `1h`, `2d`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let help = || format!("{text:?} is not a duration: write seconds (90) or 90s, 5m, 1h, 2d");
    let number: u64 = number.parse().map_err(|_| help())?;
    let unit_secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1,
        "m" | "min" | "mins" => 60,
        "h" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86_400,
        _ => return Err(help()),
    };
    number
        .checked_mul(unit_secs)
        .map(Duration::from_secs)
        .ok_or_else(help)
}

/// A duration between `min` and `max` (for clap: `value_parser = |s: &str| ...`).
pub fn parse_duration_within(text: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration < min || duration > max {
        return Err(format!(
            "{text:?} is out of range: between {} and {}",
            describe(min),
            describe(max)
        ));
    }
    Ok(duration)
}

/// `90 s`, `5 min`, `1 h`: how a duration reads in messages.
pub fn describe(duration: Duration) -> String {
    match duration.as_secs() {
        s if s % 86_400 == 0 && s > 0 => format!("{} d", s / 86_400),
        s if s % 3600 == 0 && s > 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

/// A libp2p multiaddr. `host:port` forms are refused with the multiaddr they stand for.
pub fn parse_multiaddr(text: &str) -> Result<Multiaddr, String> {
    let text = text.trim();
    match text.parse::<Multiaddr>() {
        Ok(addr) => Ok(addr),
        Err(e) => Err(match suggest_multiaddr(text) {
            Some(suggestion) => {
                format!("{text:?} is not a libp2p address: did you mean {suggestion}?")
            }
            None => format!(
                "{text:?} is not a libp2p address ({e}): write it like /ip4/192.168.1.20/tcp/4001"
            ),
        }),
    }
}

fn suggest_multiaddr(text: &str) -> Option<String> {
    if let Ok(socket) = text.parse::<std::net::SocketAddr>() {
        return Some(match socket {
            std::net::SocketAddr::V4(v4) => format!("/ip4/{}/tcp/{}", v4.ip(), v4.port()),
            std::net::SocketAddr::V6(v6) => format!("/ip6/{}/tcp/{}", v6.ip(), v6.port()),
        });
    }
    let (host, port) = text.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches("tcp://");
    let valid = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    valid.then(|| format!("/dns/{host}/tcp/{port}"))
}

/// A device the user named: its full id, a unique prefix of its id (at least 4 characters) or
/// its name (case-insensitive). `devices` are the candidates (id, name).
pub fn resolve_device(text: &str, devices: &[(PeerId, String)]) -> Result<PeerId, String> {
    let text = text.trim();
    if let Ok(id) = text.parse::<PeerId>() {
        return Ok(id);
    }
    let by_name: Vec<&(PeerId, String)> = devices
        .iter()
        .filter(|(_, name)| name.eq_ignore_ascii_case(text))
        .collect();
    let by_prefix: Vec<&(PeerId, String)> = if text.len() >= 4 {
        devices
            .iter()
            .filter(|(id, _)| id.to_string().starts_with(text))
            .collect()
    } else {
        Vec::new()
    };
    let list = |found: &[&(PeerId, String)]| {
        found
            .iter()
            .map(|(id, name)| format!("{name} ({id})"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (by_name.as_slice(), by_prefix.as_slice()) {
        ([(id, _)], _) | ([], [(id, _)]) => Ok(*id),
        ([], []) => Err(format!(
            "no device named {text:?} or with an id starting with it{}",
            if devices.is_empty() {
                String::new()
            } else {
                format!(
                    "; your devices: {}",
                    list(&devices.iter().collect::<Vec<_>>())
                )
            }
        )),
        ([], several) => Err(format!(
            "{text:?} starts the ids of several devices: {}; type more of the id",
            list(several)
        )),
        (several, _) => Err(format!(
            "several devices are named {text:?}: {}; use the device id (or a unique start of it), \
             and give each device its own name with `devicelink agent --name NAME`",
            list(several)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_duration("5 minutes please").is_err());
        assert!(parse_duration("1.5h").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        let within =
            |s| parse_duration_within(s, Duration::from_secs(1), Duration::from_secs(3600));
        assert!(within("2h").unwrap_err().contains("between 1 s and 1 h"));
        assert_eq!(within("1h"), Ok(Duration::from_secs(3600)));
    }

    #[test]
    fn addresses_get_the_multiaddr_they_mean() {
        assert!(parse_multiaddr("/ip4/127.0.0.1/tcp/4001").is_ok());
        let e = parse_multiaddr("127.0.0.1:4001").unwrap_err();
        assert!(e.contains("did you mean /ip4/127.0.0.1/tcp/4001?"), "{e}");
        let e = parse_multiaddr("[::1]:4001").unwrap_err();
        assert!(e.contains("/ip6/::1/tcp/4001"), "{e}");
        let e = parse_multiaddr("relay.example.net:4001").unwrap_err();
        assert!(e.contains("/dns/relay.example.net/tcp/4001"), "{e}");
        let e = parse_multiaddr("nonsense").unwrap_err();
        assert!(e.contains("write it like /ip4/"), "{e}");
    }

    #[test]
    fn devices_by_name_or_id_prefix() {
        let id = || {
            libp2p::identity::Keypair::generate_ed25519()
                .public()
                .to_peer_id()
        };
        let (a, b, c) = (id(), id(), id());
        let devices = vec![
            (a, "laptop".to_string()),
            (b, "phone".to_string()),
            (c, "phone".to_string()),
        ];
        assert_eq!(resolve_device("Laptop", &devices), Ok(a));
        assert_eq!(resolve_device(&a.to_string(), &devices), Ok(a));
        let prefix = &b.to_string()[..30];
        assert_eq!(resolve_device(prefix, &devices), Ok(b));
        let e = resolve_device("phone", &devices).unwrap_err();
        assert!(
            e.contains("several devices are named") && e.contains(&c.to_string()),
            "{e}"
        );
        let e = resolve_device("tablet", &devices).unwrap_err();
        assert!(e.contains("no device named") && e.contains("laptop"), "{e}");
        // Every id starts with the same multihash prefix: ambiguous, never a guess.
        let e = resolve_device("12D3KooW", &devices).unwrap_err();
        assert!(e.contains("several devices"), "{e}");
    }
}
