//! Real networks on one machine: network namespaces joined by veth pairs, with NAT routers made
//! of nftables masquerade rules. Needs root, `ip` and `nft`; [`Topology::create`] says why not
//! when they are missing, so a test can skip with the reason.
//!
//! ```text
//!   internet (203.0.113.0/24, a documentation range, on a bridge): the always-on device at 203.0.113.1
//!     ├─ home NAT 203.0.113.2 ── home 192.168.1.0/24: the laptop at 192.168.1.2
//!     └─ cafe NAT 203.0.113.3 ── cafe 192.168.2.0/24: the phone at 192.168.2.2
//! ```
//! Home and cafe have no route to each other except through their NATs' public addresses. Each
//! NAT drops unsolicited traffic from the internet side (like a home router), so a device behind
//! it is reachable only through a relay or a hole punch.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// How the NAT routers map ports.
#[derive(Debug, Clone, Copy)]
pub enum Nat {
    /// Endpoint-independent mapping (plain masquerade keeps the source port): hole punching
    /// works.
    EndpointIndependent,
    /// A new random port per destination (masquerade fully-random): hole punching fails.
    Symmetric,
}

/// The five namespaces; removed (with every process inside) on drop.
pub struct Topology {
    tag: String,
}

const SETUP: &str = r#"
set -eu
TAG=$1 MASQ=$2
INET=dl-inet-$TAG HNAT=dl-hnat-$TAG CNAT=dl-cnat-$TAG HOME=dl-home-$TAG CAFE=dl-cafe-$TAG
for ns in $INET $HNAT $CNAT $HOME $CAFE; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
done
ip -n $INET link add br0 type bridge forward_delay 0 stp_state 0
ip -n $INET addr add 203.0.113.1/24 dev br0
ip -n $INET link set br0 up
nat_router() { # ns bridge-port public-addr lan-addr client-ns
  ns=$1 port=$2 pub=$3 lan=$4 cli=$5
  ip -n $INET link add "$port" type veth peer name wan netns "$ns"
  ip -n $INET link set "$port" master br0 up
  ip -n "$ns" addr add "$pub/24" dev wan
  ip -n "$ns" link set wan up
  ip -n "$ns" link add lan type veth peer name eth0 netns "$cli"
  ip -n "$ns" addr add "$lan/24" dev lan
  ip -n "$ns" link set lan up
  ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
  # Dropping what is unsolicited on the WAN side also keeps stray packets from taking a port
  # the NAT would otherwise keep for the device behind it.
  ip netns exec "$ns" nft -f - <<NFT
table ip nat {
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" $MASQ
  }
}
table ip filter {
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "wan" ct state established,related accept
    iifname "wan" drop
  }
  chain forward {
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "lan" oifname "wan" accept
  }
}
NFT
}
nat_router $HNAT h0 203.0.113.2 192.168.1.1 $HOME
nat_router $CNAT c0 203.0.113.3 192.168.2.1 $CAFE
for c in "$HOME 192.168.1.2 192.168.1.1" "$CAFE 192.168.2.2 192.168.2.1"; do
  set -- $c
  ip -n "$1" addr add "$2/24" dev eth0
  ip -n "$1" link set eth0 up
  ip -n "$1" route add default via "$3"
done
"#;

/// Removes the namespaces named in its arguments, with every process inside.
const TEARDOWN: &str = r#"
for ns in "$@"; do
  [ -e "/var/run/netns/$ns" ] || continue
  pids=$(ip netns pids "$ns" 2>/dev/null)
  [ -n "$pids" ] && kill -9 $pids 2>/dev/null
  ip netns del "$ns" 2>/dev/null || true
  rm -rf "/etc/netns/$ns"
done
exit 0
"#;
/// Two hosts on one LAN segment: namespaces `dl-lan0-TAG` (198.51.100.1) and `dl-lan1-TAG`
/// (198.51.100.2) joined by a veth pair, multicast on, like two devices on a home network.
/// Removed (with every process inside) on drop.
pub struct Lan {
    tag: String,
}

const LAN_SETUP: &str = r#"
set -eu
TAG=$1
A=dl-lan0-$TAG B=dl-lan1-$TAG
ip netns add "$A"
ip netns add "$B"
ip -n "$A" link set lo up
ip -n "$B" link set lo up
ip -n "$A" link add eth0 type veth peer name eth0 netns "$B"
ip -n "$A" addr add 198.51.100.1/24 dev eth0
ip -n "$B" addr add 198.51.100.2/24 dev eth0
ip -n "$A" link set eth0 up multicast on
ip -n "$B" link set eth0 up multicast on
# Wait (at most 5 s) until the link is up on both ends and IPv6 duplicate address detection is
# done, as on a LAN that was up before the devices started their agents.
for i in $(seq 50); do
  settled=1
  for ns in "$A" "$B"; do
    [ "$(ip netns exec "$ns" cat /sys/class/net/eth0/operstate)" = up ] || settled=0
    [ -z "$(ip -n "$ns" -6 addr show dev eth0 tentative)" ] || settled=0
  done
  [ $settled = 1 ] && break
  sleep 0.1
done
"#;

impl Lan {
    /// Creates the two hosts, or says why it cannot (not root, no `ip`).
    pub fn create() -> Result<Self, String> {
        require_tools(&["ip"])?;
        let lan = Self { tag: unique_tag() };
        run_script(LAN_SETUP, &["setup", &lan.tag])?;
        Ok(lan)
    }

    /// The namespace of host 0 or 1.
    pub fn ns(&self, host: usize) -> String {
        format!("dl-lan{host}-{}", self.tag)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = run_script(TEARDOWN, &["teardown", &self.ns(0), &self.ns(1)]);
    }
}

/// A tag no other topology of this or another test process uses at the same time.
fn unique_tag() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

/// Says which of `tools` is missing, if one is.
fn require_tools(tools: &[&str]) -> Result<(), String> {
    for tool in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(format!(
                "`{tool}` is not installed (Debian: iproute2, nftables)"
            ));
        }
    }
    Ok(())
}

/// Runs `sh -c script args...`; its stderr is the error (namespaces need root).
fn run_script(script: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cannot create network namespaces (needs root): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The always-on device's address on the internet.
pub const INTERNET_HOST: &str = "203.0.113.1";

impl Topology {
    /// Creates the namespaces, or says why it cannot (not root, no `ip` or `nft`, no namespace
    /// support).
    pub fn create(nat: Nat) -> Result<Self, String> {
        require_tools(&["ip", "nft"])?;
        let masquerade = match nat {
            Nat::EndpointIndependent => "masquerade",
            Nat::Symmetric => "masquerade fully-random",
        };
        let topology = Self { tag: unique_tag() };
        run_script(SETUP, &["setup", &topology.tag, masquerade])?;
        Ok(topology)
    }

    /// The namespace name of `internet`, `home` or `cafe`.
    pub fn ns(&self, which: &str) -> String {
        let short = match which {
            "internet" => "inet",
            other => other,
        };
        format!("dl-{short}-{}", self.tag)
    }

    /// Gives `ip` the name `name` for processes started in namespace `which` (`ip netns exec`
    /// mounts `/etc/netns/NS/hosts` over `/etc/hosts`), as a DNS name of the VPS would; removed
    /// with the namespace.
    pub fn name_host(&self, which: &str, name: &str, ip: &str) -> Result<(), String> {
        run_script(
            r#"mkdir -p "/etc/netns/$1" && printf '127.0.0.1 localhost\n%s %s\n' "$3" "$2" > "/etc/netns/$1/hosts""#,
            &["name-host", &self.ns(which), name, ip],
        )
    }

    /// Runs `sh -c script` inside a namespace (e.g. to change the NAT rules).
    pub fn exec(&self, ns: &str, script: &str) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", script])
            .output()
            .expect("run ip netns exec")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let names = ["home", "cafe", "hnat", "cnat", "internet"].map(|n| self.ns(n));
        let mut args = vec!["teardown"];
        args.extend(names.iter().map(String::as_str));
        let _ = run_script(TEARDOWN, &args);
    }
}

/// Runs `work` on a new thread that has entered the network namespace `ns` (created by `ip
/// netns add`): the sockets it opens are that host's. Sockets opened elsewhere stay where they
/// were; a tokio runtime for the thread must be built inside `work`.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let handle = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a valid namespace descriptor changes only this thread's namespace.
        let entered = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            entered,
            0,
            "setns {path}: {}",
            std::io::Error::last_os_error()
        );
        work()
    })
}

/// Adds `addr` (with its prefix, e.g. `198.51.100.3/24`) to `eth0` of namespace `ns`.
pub fn add_address(ns: &str, addr: &str) -> Result<(), String> {
    run_script(
        r#"ip -n "$1" addr add "$2" dev eth0"#,
        &["add-address", ns, addr],
    )
}
