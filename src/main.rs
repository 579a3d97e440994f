//! The `devicelink` command: a thin clap layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use devicelink::client::{Client, ClientError};
use devicelink::ipc::{self, Event, RequestBody};
use devicelink::offline::OfflineDevice;
use devicelink::{Agent, AgentConfig, Multiaddr, PeerId};

#[derive(Parser)]
#[command(
    name = "devicelink",
    version,
    about = "Local-first sync of your documents across your own devices"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// Data directory (identity, database). Default: $XDG_DATA_HOME/devicelink.
    #[arg(long, global = true, env = "DEVICELINK_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The agent's IPC socket. Default: $XDG_RUNTIME_DIR/devicelink/agent-<hash>.sock, else <data dir>/agent.sock.
    #[arg(long, global = true, env = "DEVICELINK_SOCKET")]
    socket: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground (Ctrl-C or SIGTERM stops it after a final flush).
    Agent {
        /// libp2p listen address (repeatable): TCP and QUIC on a free port by default. An
        /// always-on device wants fixed ports, e.g. /ip4/0.0.0.0/tcp/4001 and
        /// /ip4/0.0.0.0/udp/4001/quic-v1.
        #[arg(long, value_name = "ADDR", value_parser = devicelink::args::parse_multiaddr,
              default_values = ["/ip4/0.0.0.0/tcp/0", "/ip4/0.0.0.0/udp/0/quic-v1"])]
        listen: Vec<Multiaddr>,
        /// Address of another device to dial directly, like /ip4/192.168.1.20/tcp/4001
        /// (repeatable).
        #[arg(long, value_name = "ADDR", value_parser = devicelink::args::parse_multiaddr)]
        peer: Vec<Multiaddr>,
        /// Name shown to your other devices. Default: the host name.
        #[arg(long)]
        name: Option<String>,
        /// Do not advertise or browse over mDNS (direct --peer dialing still works).
        #[arg(long)]
        no_mdns: bool,
        /// Use mDNS on the loopback interface only, advertising 127.0.0.1 (several agents on
        /// one machine, tests).
        #[arg(long, conflicts_with = "no_mdns")]
        mdns_loopback: bool,
        /// Memory budget of loaded documents, in MiB: idle documents beyond it leave memory
        /// (they load again when an app or a peer needs them).
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
        doc_cache_mb: u64,
        /// Serve Yjs apps (y-websocket) on this loopback address. Default: 127.0.0.1:4455, or
        /// none if that port is taken.
        #[arg(long, value_name = "ADDR")]
        ws: Option<std::net::SocketAddr>,
        /// Do not serve y-websocket clients.
        #[arg(long, conflicts_with = "ws")]
        no_ws: bool,
        /// Start over as a new device when identity.key is missing or damaged next to existing
        /// data (documents are kept; your other devices must pair this one again).
        #[arg(long)]
        new_identity: bool,
        /// Serve as the relay of your devices (an always-on device with a public address): they
        /// reserve on it and reach each other through it, and it stores and forwards their
        /// documents like any linked device. Only linked devices may reserve.
        #[arg(long)]
        serve_relay: bool,
        /// With --serve-relay: a blind always-on device. It stores and forwards your documents
        /// only as sealed envelopes (it never holds a name, a document or a key), so it may run
        /// on a machine you do not trust with their content. Fixed at the data dir's first start.
        #[arg(long, requires = "serve_relay")]
        blind: bool,
        /// Reserve on this relay, so devices on other networks can reach this one: its address
        /// ending in /p2p/ID (repeatable). Relays your device group knows are used too.
        #[arg(long, value_name = "ADDR", value_parser = devicelink::args::parse_multiaddr)]
        relay: Vec<Multiaddr>,
        /// An address this device is reachable at from outside that its interfaces do not show
        /// (a VPS behind 1:1 NAT), e.g. /ip4/203.0.113.7/tcp/4001 (repeatable).
        #[arg(long, value_name = "ADDR", value_parser = devicelink::args::parse_multiaddr)]
        external: Vec<Multiaddr>,
    },
    /// Link this device with another: without CODE, open a code and wait; with CODE, join the
    /// device showing it.
    Pair {
        /// The code shown on the other device, like 42-815-067.
        code: Option<String>,
        /// Dial the other device at this address instead of finding it over mDNS.
        #[arg(long, requires = "code", value_name = "ADDR",
              value_parser = devicelink::args::parse_multiaddr)]
        peer: Option<Multiaddr>,
        /// Reach the other device through a relay (it is on another network and linked with
        /// the relay): the relay's address ending in /p2p/ID, or the relayed address
        /// `devicelink pair` printed on the other device.
        #[arg(long, requires = "code", conflicts_with = "peer", value_name = "ADDR",
              value_parser = devicelink::args::parse_multiaddr)]
        relay: Option<Multiaddr>,
        /// How long a new code stays valid: seconds, or 90s, 5m, 1h (at most a day).
        #[arg(long, default_value = "5m", conflicts_with = "code", value_name = "DURATION",
              value_parser = code_expiry)]
        expires: std::time::Duration,
    },
    /// Device, documents and each of your devices (link, state, last sync) of the running agent.
    Status {
        /// Print the full report as JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Paired devices (online or not) and nearby unpaired agents.
    Peers,
    /// Read and edit documents through the running agent.
    #[command(subcommand)]
    Doc(DocCommand),
    /// Remove a device from your devices, on every device.
    Unpair {
        /// The device: its name, its id or a unique start of its id.
        device: String,
    },
    /// Diagnose discovery and sync: multicast per interface, how each peer was found, lag.
    Doctor,
    /// Publish, list and withdraw activities that can continue on another device.
    #[command(subcommand)]
    Activity(ActivityCommand),
    /// Continue an activity on this device: its documents are caught up first, then its app
    /// state is printed (JSON).
    Handoff {
        /// The activity's id (`devicelink activity list` shows them).
        activity_id: String,
        /// Give up after this long: seconds, or 30s, 5m (at most an hour).
        #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = handoff_timeout)]
        timeout: std::time::Duration,
    },
    /// Concurrent writes to the same map key (open ones), or resolve one.
    Conflicts {
        #[command(subcommand)]
        command: Option<ConflictCommand>,
        /// Only this document.
        doc: Option<String>,
        /// Include resolved conflicts.
        #[arg(long)]
        all: bool,
    },
    /// Manage the apps allowed to use the y-websocket endpoint (tokens).
    #[command(subcommand)]
    App(AppCommand),
    /// Manage the devices this one syncs with.
    #[command(subcommand)]
    Trust(TrustCommand),
    /// Print this device's id.
    Id,
    /// Run the agent as a service (systemd; launchd on macOS): at login, or at boot with
    /// --system (an always-on device).
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Start two agents on 127.0.0.1 and show sync, live updates and offline catch-up.
    Demo,
    /// Measure latency, throughput, catch-up, first sync, memory and CPU with two agent
    /// processes on 127.0.0.1; prints one JSON line.
    Bench {
        /// Small workloads (a smoke run).
        #[arg(long)]
        quick: bool,
        /// Also run the Yjs + y-websocket comparison installed in DIR (see bench/yjs/README.md).
        #[arg(long)]
        yjs: Option<PathBuf>,
        /// Documents in the many-documents section (default 10000; 1000 with --quick; 0 skips).
        #[arg(long)]
        docs: Option<usize>,
        /// Size in MiB of the large document whose first sync is measured (default 100).
        #[arg(long)]
        large_mb: Option<usize>,
        /// Also run the automerge-repo comparison installed in DIR (see bench/automerge/README.md).
        #[arg(long)]
        automerge: Option<PathBuf>,
    },
    /// Check a Device Linking 1.4 implementation at ADDR: replays the protocol's session
    /// transcripts (protocol/vectors/sessions/) over libp2p and prints a pass/fail table. The
    /// target must trust the two ids this prints (and should start from a fresh data dir).
    Conformance {
        /// The target's multiaddr, e.g. /ip4/127.0.0.1/tcp/4001.
        #[arg(value_parser = devicelink::args::parse_multiaddr)]
        addr: Multiaddr,
        /// The target's device id.
        #[arg(long)]
        peer_id: PeerId,
    },
}

#[derive(Subcommand)]
enum ServiceCommand {
    /// Write the service file for `devicelink agent` with these flags, enable and start it.
    Install {
        /// A system service (at boot, /etc/systemd/system) instead of your user's.
        #[arg(long)]
        system: bool,
        /// The user a system service runs as (default: root).
        #[arg(long, requires = "system", value_name = "USER")]
        user: Option<String>,
        /// Serve as the relay of your devices (see `agent --serve-relay`).
        #[arg(long)]
        serve_relay: bool,
        /// A blind always-on device (see `agent --blind`).
        #[arg(long, requires = "serve_relay")]
        blind: bool,
        /// Reserve on this relay (see `agent --relay`; repeatable).
        #[arg(long, value_name = "ADDR", value_parser = devicelink::args::parse_multiaddr)]
        relay: Vec<Multiaddr>,
        /// libp2p listen address (see `agent --listen`; repeatable).
        #[arg(long, value_name = "ADDR", value_parser = devicelink::args::parse_multiaddr)]
        listen: Vec<Multiaddr>,
        /// An address reachable from outside (see `agent --external`; repeatable).
        #[arg(long, value_name = "ADDR", value_parser = devicelink::args::parse_multiaddr)]
        external: Vec<Multiaddr>,
        /// Name shown to your other devices.
        #[arg(long)]
        name: Option<String>,
        /// Only write the file; do not enable or start it.
        #[arg(long)]
        no_start: bool,
    },
    /// Stop and disable the service and remove its file.
    Uninstall {
        /// The system service (installed with --system) instead of your user's.
        #[arg(long)]
        system: bool,
        /// Only remove the file; do not stop or disable it.
        #[arg(long)]
        no_stop: bool,
    },
}

#[derive(Subcommand)]
enum ActivityCommand {
    /// Publish this device's current activity (or update it with --id).
    Publish {
        /// Reverse-DNS type, like com.example.notes.edit.
        #[arg(long = "type")]
        activity_type: String,
        /// What the user sees on their other devices, like "Editing shopping notes".
        #[arg(long)]
        title: String,
        /// A document the activity needs (repeatable).
        #[arg(long = "doc")]
        docs: Vec<String>,
        /// App state as JSON (cursor, selection, URL...).
        #[arg(long)]
        state: Option<String>,
        /// Update the activity with this id (this device must hold it).
        #[arg(long)]
        id: Option<String>,
        /// How long it stays listed: seconds, or 30m, 2h, 1d.
        #[arg(long, value_name = "DURATION", value_parser = devicelink::args::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// List the live activities of all your devices.
    List,
    /// Withdraw an activity everywhere.
    Unpublish {
        /// The activity's id.
        id: String,
    },
}

#[derive(Subcommand)]
enum ConflictCommand {
    /// Resolve a conflict: keep local (this device's value), remote, winner, other, or a JSON value.
    Resolve {
        /// The conflict's id (`devicelink conflicts` lists them).
        id: String,
        /// Which value to keep: local, remote, winner, other, or a JSON value.
        #[arg(long)]
        keep: String,
    },
}

#[derive(Subcommand)]
enum TrustCommand {
    /// Trust a device (by device id) so it may sync with this one.
    Add {
        /// The device's id (`devicelink id` on it prints it).
        device: PeerId,
        /// The name to show for it (default: the start of its id).
        #[arg(long)]
        name: Option<String>,
    },
    /// Stop trusting a device.
    Remove {
        /// The device: its name, its id or a unique start of its id.
        device: String,
    },
    /// List trusted devices.
    List,
}

#[derive(Subcommand)]
enum AppCommand {
    /// Create an app and print its token (shown only once).
    Add {
        /// The app's name (your choice; `app remove NAME` revokes it).
        name: String,
        /// A browser origin allowed to connect, like http://localhost:5173 (repeatable).
        /// Clients that send no Origin (Node, native apps) are allowed.
        #[arg(long = "origin")]
        origins: Vec<String>,
        /// Limit the app to documents whose names start with PREFIX (repeatable).
        #[arg(long = "docs", value_name = "PREFIX")]
        prefixes: Vec<String>,
        /// The app may read and follow documents, not change them.
        #[arg(long)]
        read_only: bool,
    },
    /// List apps (never their tokens).
    List,
    /// Revoke an app's token; its open connections end at once.
    Remove {
        /// The app's name.
        name: String,
    },
}

#[derive(Subcommand)]
enum DocCommand {
    /// List documents with their size, last change and the device it came from.
    List,
    /// Delete a document on every device (it stays deleted on devices that were offline).
    Delete {
        /// The document's name.
        doc: String,
    },
    /// Print a document as JSON (every root type).
    Get {
        /// The document's name.
        doc: String,
    },
    /// Set MAP.KEY to a JSON value.
    Set {
        /// The document's name.
        doc: String,
        /// The root map (a root that holds a text is refused).
        map: String,
        /// The key in that map.
        key: String,
        /// A JSON value, e.g. '"text"', 42, '{"a":1}'.
        value: String,
    },
    /// Edit a root text.
    Text {
        /// The document's name.
        doc: String,
        /// The root text (a root that holds a map is refused).
        name: String,
        /// Text to add at the end.
        #[arg(long)]
        append: String,
    },
    /// Print the document, then each change as it arrives, one JSON line each.
    Watch {
        /// The document's name.
        doc: String,
    },
}

fn code_expiry(text: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    devicelink::args::parse_duration_within(
        text,
        Duration::from_secs(1),
        Duration::from_secs(86_400),
    )
}

fn handoff_timeout(text: &str) -> Result<std::time::Duration, String> {
    use std::time::Duration;
    devicelink::args::parse_duration_within(text, Duration::from_secs(1), Duration::from_secs(3600))
}

fn main() -> ExitCode {
    use std::io::IsTerminal as _;
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Agent { .. } | Command::Demo | Command::Bench { .. } | Command::Conformance { .. }
    ) {
        // A short command whose output is cut off (`devicelink pair | head -1`) ends quietly, as
        // Unix tools do, instead of panicking on the closed pipe. Not for commands that run
        // agents: their network writes must see EPIPE as an error, not end the process.
        // SAFETY: setting a signal disposition to the default before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                if matches!(cli.command, Command::Agent { .. }) {
                    "info"
                } else {
                    "warn"
                }
                .into()
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

impl Global {
    fn data_dir(&self) -> Result<PathBuf> {
        match &self.data_dir {
            Some(dir) => Ok(dir.clone()),
            None => devicelink::agent::default_data_dir()
                .context("cannot determine a default data dir; pass --data-dir"),
        }
    }

    fn socket(&self) -> Result<PathBuf> {
        match &self.socket {
            Some(path) => Ok(path.clone()),
            None => Ok(ipc::default_socket_path(&self.data_dir()?)),
        }
    }

    /// The data dir of a command that works on an existing device (never creates one): a typo
    /// in `--data-dir` is an error, not a new empty device.
    fn existing_data_dir(&self) -> Result<PathBuf> {
        let dir = self.data_dir()?;
        if !dir.is_dir() {
            bail!(
                "the data dir {} does not exist (a typo in --data-dir?); a device's data dir is made by \
                 `devicelink --data-dir {} agent`",
                dir.display(),
                dir.display()
            );
        }
        Ok(dir)
    }

    async fn client(&self) -> Result<Client> {
        if self.socket.is_none() {
            self.existing_data_dir()?;
        }
        Ok(Client::connect(&self.socket()?).await?)
    }
}

async fn run(cli: Cli) -> Result<()> {
    let global = cli.global;
    match cli.command {
        Command::Agent {
            listen,
            peer,
            name,
            no_mdns,
            mdns_loopback,
            doc_cache_mb,
            ws,
            no_ws,
            new_identity,
            serve_relay,
            blind,
            relay,
            external,
        } => {
            let discovery = if no_mdns {
                devicelink::discovery::DiscoveryConfig::default()
            } else if mdns_loopback {
                devicelink::discovery::DiscoveryConfig::loopback()
            } else {
                devicelink::discovery::DiscoveryConfig {
                    enabled: true,
                    ..Default::default()
                }
            };
            let mut config = AgentConfig::new(global.data_dir()?);
            config.doc_cache_bytes = usize::try_from(doc_cache_mb << 20).unwrap_or(usize::MAX);
            config.listen = listen;
            config.peers = peer;
            config.serve_relay = serve_relay;
            config.blind = blind;
            config.relays = relay;
            config.external = external;
            config.discovery = discovery;
            if new_identity {
                config.new_identity = devicelink::identity::NewIdentity::Allow;
            }
            if let Some(name) = name {
                config.device_name = name;
            }
            let ws = match (ws, no_ws) {
                (_, true) => WsChoice::Off,
                (Some(addr), false) => WsChoice::At(addr),
                (None, false) => WsChoice::Default,
            };
            run_agent(&global, config, ws).await
        }
        Command::App(command) => app(&global, command).await,
        Command::Service(command) => service(&global, command),
        Command::Conformance { addr, peer_id } => conformance(&global, addr, peer_id).await,
        Command::Pair {
            code,
            peer,
            relay,
            expires,
        } => pair(&global, code, peer, relay, expires).await,
        Command::Unpair { device } => {
            let client = global.client().await?;
            let devices = your_devices(&client).await?;
            let id =
                devicelink::args::resolve_device(&device, &devices).map_err(anyhow::Error::msg)?;
            let name = devices
                .iter()
                .find(|(d, _)| *d == id)
                .map_or_else(|| id.to_string(), |(_, name)| format!("{name} ({id})"));
            let result = client
                .request(RequestBody::Unpair {
                    device: id.to_string(),
                })
                .await?;
            if result["removed"] != true {
                bail!("{name} was not one of your devices");
            }
            println!("removed {name} from your devices; it is disconnected and refused everywhere");
            Ok(())
        }
        Command::Peers => peers(&global).await,
        Command::Activity(command) => {
            let client = global.client().await?;
            let body = match command {
                ActivityCommand::Publish {
                    activity_type,
                    title,
                    docs,
                    state,
                    id,
                    ttl,
                } => {
                    let app_state = match state {
                        Some(s) => serde_json::from_str(&s).context("--state must be JSON")?,
                        None => serde_json::Value::Null,
                    };
                    RequestBody::ActivityPublish {
                        draft: devicelink::handoff::ActivityDraft {
                            id,
                            activity_type,
                            title,
                            docs,
                            app_state,
                            ttl_secs: ttl.map(|t| t.as_secs()),
                        },
                    }
                }
                ActivityCommand::List => RequestBody::ActivityList,
                ActivityCommand::Unpublish { id } => {
                    RequestBody::ActivityUnpublish { activity_id: id }
                }
            };
            print_json(&client.request(body).await?)
        }
        Command::Handoff {
            activity_id,
            timeout,
        } => {
            let body = RequestBody::Handoff {
                activity_id,
                timeout_secs: Some(timeout.as_secs()),
            };
            let client = global.client().await?;
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            let progress = first_sync_progress(&client, "", Some(done_rx));
            let handoff = async {
                let result = client.request(body).await;
                let _ = done_tx.send(());
                result
            };
            let (result, ()) = tokio::join!(handoff, progress);
            print_json(&result?)
        }
        Command::Conflicts { command, doc, all } => {
            let client = global.client().await?;
            let body = match command {
                Some(ConflictCommand::Resolve { id, keep }) => {
                    let (keep, value) = match keep.as_str() {
                        "local" | "remote" | "winner" | "other" => (Some(keep), None),
                        json => (
                            None,
                            Some(serde_json::from_str(json).with_context(|| {
                                format!("--keep must be local, remote, winner, other or a JSON value, not {json:?}")
                            })?),
                        ),
                    };
                    RequestBody::ConflictResolve {
                        conflict_id: id,
                        keep,
                        value,
                    }
                }
                None => RequestBody::ConflictList { doc, all },
            };
            print_json(&client.request(body).await?)
        }
        Command::Doctor => doctor(&global).await,
        Command::Id => {
            println!(
                "{}",
                devicelink::identity::device_id(&global.existing_data_dir()?)?
            );
            Ok(())
        }
        Command::Trust(command) => trust(&global, command).await,
        Command::Status { json } => {
            let status = global.client().await?.status().await?;
            if json {
                print_json(&status)
            } else {
                print!("{}", status_summary(&status));
                Ok(())
            }
        }
        Command::Doc(command) => doc(&global, command).await,
        Command::Bench {
            quick,
            yjs,
            docs,
            large_mb,
            automerge,
        } => {
            let mut config = if quick {
                devicelink::bench::BenchConfig::quick()
            } else {
                devicelink::bench::BenchConfig::default()
            };
            config.yjs_dir = yjs;
            config.automerge_dir = automerge;
            config.docs = docs.unwrap_or(config.docs);
            config.large_doc_mb = large_mb.unwrap_or(config.large_doc_mb);
            let report = devicelink::bench::run(&config).await?;
            println!("{report}");
            Ok(())
        }
        Command::Demo => {
            devicelink::demo::run(&mut std::io::stdout()).await?;
            Ok(())
        }
    }
}

/// Where the y-websocket endpoint should listen.
enum WsChoice {
    /// The default address, skipped with a warning if it is taken (another agent, another app).
    Default,
    /// An address the user asked for: failing to listen there is an error.
    At(std::net::SocketAddr),
    Off,
}

/// Raises the soft open-file limit to the hard one: a common desktop default of 1,024 is low for
/// a process holding connections, sockets and database files.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            let wanted = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                tracing::warn!("cannot raise the open-file limit above {}", limit.rlim_cur);
            }
        }
    }
}

async fn run_agent(global: &Global, config: AgentConfig, ws: WsChoice) -> Result<()> {
    raise_open_file_limit();
    let serve_relay = config.serve_relay;
    let agent = Agent::start(config).await?;
    let socket = global.socket()?;
    let server = ipc::server::serve(agent.clone(), socket).await;
    let server = match server {
        Ok(server) => server,
        Err(e) => {
            agent.shutdown().await?;
            return Err(e.into());
        }
    };
    println!("device id: {}", agent.device_id());
    for addr in agent.listen_addrs() {
        println!("listening: {addr}");
    }
    if serve_relay {
        for addr in agent.listen_addrs() {
            if !devicelink::net::relay::is_local_only(&addr) {
                println!("relay: {addr}/p2p/{}", agent.device_id());
            }
        }
    }
    let endpoint = match ws {
        WsChoice::Off => None,
        WsChoice::At(addr) => match devicelink::bridge::serve(agent.clone(), addr).await {
            Ok(endpoint) => Some(endpoint),
            Err(e) => {
                drop(server);
                agent.shutdown().await?;
                return Err(e.into());
            }
        },
        WsChoice::Default => {
            let addr = devicelink::bridge::DEFAULT_ADDR
                .parse()
                .context("default endpoint address")?;
            match devicelink::bridge::serve(agent.clone(), addr).await {
                Ok(endpoint) => Some(endpoint),
                Err(e) => {
                    let note = format!(
                        "{e} (another agent on this machine?); start this agent with \
                         --ws 127.0.0.1:PORT to serve Yjs apps on another port"
                    );
                    tracing::warn!("{note}");
                    println!("no websocket: {note}");
                    agent.set_ws_note(Some(note));
                    None
                }
            }
        }
    };
    if let Some(endpoint) = &endpoint {
        println!("websocket: ws://{}", endpoint.addr());
    }
    println!("ipc socket: {}", server.path().display());
    use std::io::Write as _;
    std::io::stdout().flush()?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let failure = tokio::select! {
        _ = tokio::signal::ctrl_c() => None,
        _ = term.recv() => None,
        reason = agent.failed() => Some(reason),
    };
    if let Some(reason) = &failure {
        eprintln!("error: {reason}; stopping (acknowledged changes are on disk)");
    }
    eprintln!("stopping: flushing to disk");
    drop(endpoint);
    drop(server);
    agent.shutdown().await?;
    match failure {
        Some(reason) => Err(anyhow::anyhow!("the agent failed: {reason}")),
        None => Ok(()),
    }
}

/// Your devices (id, name), as the running agent knows them.
async fn your_devices(client: &Client) -> Result<Vec<(PeerId, String)>> {
    let list = client.request(RequestBody::TrustList).await?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| {
            let id: PeerId = d["device"].as_str()?.parse().ok()?;
            Some((id, d["name"].as_str().unwrap_or("").to_string()))
        })
        .collect())
}

async fn trust(global: &Global, command: TrustCommand) -> Result<()> {
    // Through the running agent if there is one (it holds the database), else directly.
    let client = match global.client().await {
        Ok(client) => Some(client),
        Err(e)
            if matches!(
                e.downcast_ref::<ClientError>(),
                Some(ClientError::NotRunning(_))
            ) =>
        {
            None
        }
        Err(e) => return Err(e),
    };
    if let Some(client) = client {
        let body = match command {
            TrustCommand::Add { device, name } => RequestBody::TrustAdd {
                device: device.to_string(),
                name,
            },
            TrustCommand::Remove { device } => {
                let devices = your_devices(&client).await?;
                let id = devicelink::args::resolve_device(&device, &devices)
                    .map_err(anyhow::Error::msg)?;
                RequestBody::TrustRemove {
                    device: id.to_string(),
                }
            }
            TrustCommand::List => RequestBody::TrustList,
        };
        return print_json(&client.request(body).await?);
    }
    let offline = OfflineDevice::open(&global.existing_data_dir()?)?;
    match command {
        TrustCommand::Add { device, name } => {
            let name = name.unwrap_or_else(|| device.to_string().chars().take(12).collect());
            offline.trust_add(device, &name)?;
            println!("trusted {device} ({name})");
        }
        TrustCommand::Remove { device } => {
            let devices: Vec<(PeerId, String)> = offline
                .trusted()?
                .into_iter()
                .map(|(id, name, _)| (id, name))
                .collect();
            let device =
                devicelink::args::resolve_device(&device, &devices).map_err(anyhow::Error::msg)?;
            if !offline.trust_remove(&device)? {
                bail!("{device} was not trusted");
            }
            println!("removed {device} on this device (with the agent running, `devicelink unpair {device}` removes it on every device)");
        }
        TrustCommand::List => {
            for (id, name, addrs) in offline.trusted()? {
                println!("{id}  {name}  {}", addrs.join(" "));
            }
        }
    }
    Ok(())
}

async fn conformance(global: &Global, addr: Multiaddr, target: PeerId) -> Result<()> {
    use devicelink::conformance::{self, Identities};
    let ids = Identities::load_or_create(&global.data_dir()?)?;
    println!("trust: {} (this side opens the sync stream)", ids.low_id());
    println!(
        "trust: {} (the target opens the sync stream)",
        ids.high_id()
    );
    println!("(on a devicelink target: devicelink trust add ID, for both)");
    let report = conformance::run(&conformance::builtin(), &ids, target, &addr).await;
    print!("{}", report.table());
    let failed = report.outcomes.iter().filter(|o| !o.passed).count();
    if failed > 0 {
        bail!("{failed} of {} transcripts failed", report.outcomes.len());
    }
    Ok(())
}

async fn app(global: &Global, command: AppCommand) -> Result<()> {
    let body = match command {
        AppCommand::Add {
            name,
            origins,
            prefixes,
            read_only,
        } => RequestBody::AppAdd {
            name,
            origins,
            prefixes,
            read_only,
        },
        AppCommand::List => RequestBody::AppList,
        AppCommand::Remove { name } => RequestBody::AppRemove { name },
    };
    // Through the running agent if there is one (a removal then ends open connections).
    let mut endpoint = None;
    let result = match global.client().await {
        Ok(client) => {
            let result = client.request(body).await?;
            let status = client.status().await?;
            endpoint = Some(match status["ws_endpoint"].as_str() {
                Some(ws) => Ok(ws.to_string()),
                None => Err(status["ws_note"]
                    .as_str()
                    .unwrap_or("not serving")
                    .to_string()),
            });
            result
        }
        Err(e)
            if matches!(
                e.downcast_ref::<ClientError>(),
                Some(ClientError::NotRunning(_))
            ) =>
        {
            let apps = OfflineDevice::open(&global.existing_data_dir()?)?.apps()?;
            devicelink::ipc::scope::app_request(&apps, body)
                .map_err(|(_, message)| anyhow::anyhow!(message))?
        }
        Err(e) => return Err(e),
    };
    if let Some(token) = result["token"].as_str() {
        println!(
            "app {:?} added; its token (shown only now):",
            result["app"]["name"].as_str().unwrap_or_default()
        );
        println!("{token}");
        println!("tokens are per device: this one works with this device's agent only");
        match endpoint {
            Some(Ok(ws)) => eprintln!(
                "connect: new WebsocketProvider('{ws}', DOC, ydoc, {{ params: {{ token: '{token}' }} }})"
            ),
            Some(Err(why)) => eprintln!("this device's agent serves no y-websocket endpoint now: {why}"),
            None => eprintln!(
                "the agent is not running: its y-websocket endpoint is printed when it starts \
                 (default ws://{})",
                devicelink::bridge::DEFAULT_ADDR
            ),
        }
        return Ok(());
    }
    print_json(&result)
}

async fn doc(global: &Global, command: DocCommand) -> Result<()> {
    let client = global.client().await?;
    match command {
        DocCommand::List => {
            // Who made the last change, by name ("this device" for this one).
            let mut names: std::collections::HashMap<String, String> = your_devices(&client)
                .await?
                .into_iter()
                .map(|(id, name)| (id.to_string(), name))
                .collect();
            if let Some(me) = client.status().await?["device_id"].as_str() {
                names.insert(me.to_string(), "this device".into());
            }
            let mut after = None;
            loop {
                let page = client.doc_list_page(after.take(), None).await?;
                for doc in page["docs"].as_array().into_iter().flatten() {
                    let by = doc["by"].as_str().unwrap_or_default();
                    println!(
                        "{}\t{} bytes\t{}\t{}",
                        doc["name"].as_str().unwrap_or_default(),
                        doc["bytes"],
                        names.get(by).map_or(by, String::as_str),
                        doc["updated_at"]
                            .as_f64()
                            .map(devicelink::status::local_time)
                            .unwrap_or_default()
                    );
                }
                match page["next"].as_str() {
                    Some(next) => after = Some(next.to_string()),
                    None => break,
                }
            }
        }
        DocCommand::Delete { doc } => {
            let result = client.doc_delete(&doc).await?;
            println!(
                "deleted {doc:?} on every device{}",
                if result["existed"] == true {
                    ""
                } else {
                    " (this device had no copy)"
                }
            );
        }
        DocCommand::Get { doc } => print_json(&client.doc_get(&doc).await?)?,
        DocCommand::Set {
            doc,
            map,
            key,
            value,
        } => {
            let value: serde_json::Value = serde_json::from_str(&value).with_context(|| {
                format!("VALUE must be JSON (for a string, quote it: '\"{value}\"')")
            })?;
            client.doc_set(&doc, &map, &key, value).await?;
        }
        DocCommand::Text { doc, name, append } => {
            client.doc_text_append(&doc, &name, &append).await?
        }
        DocCommand::Watch { doc } => {
            let mut events = client.take_events().context("event stream already taken")?;
            client.subscribe(&doc).await?;
            // The current state first (the subscription is in place), then every change.
            let state = client.doc_get(&doc).await?;
            println!("{}", serde_json::json!({ "doc": doc, "state": state }));
            use std::io::Write as _;
            std::io::stdout().flush()?;
            while let Some(event) = events.recv().await {
                let line = match event {
                    Event::Update { origin, update, .. } => {
                        let json = client.doc_get(&doc).await?;
                        serde_json::json!({ "doc": doc, "origin": origin, "update": update, "state": json })
                    }
                    Event::Lagged { missed, .. } => {
                        serde_json::json!({ "doc": doc, "lagged": missed })
                    }
                    _ => continue,
                };
                println!("{line}");
                std::io::stdout().flush()?;
            }
            bail!("the agent closed the connection");
        }
    }
    Ok(())
}

/// On a terminal, shows how far this device has caught up with `device` (any peer, if empty)
/// with a progress bar, until it has, until `until` fires, or until nothing moved for 60 s.
/// Prints nothing when stdout is not a terminal.
async fn first_sync_progress(
    client: &Client,
    device: &str,
    mut until: Option<tokio::sync::oneshot::Receiver<()>>,
) {
    use std::io::IsTerminal as _;
    if !std::io::stdout().is_terminal() {
        if let Some(until) = until {
            let _ = until.await;
        }
        return;
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} syncing documents {bar:30} {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (mut last, mut moved) = (None, std::time::Instant::now());
    loop {
        let peers = client
            .status()
            .await
            .ok()
            .and_then(|s| s["peers"].as_array().cloned())
            .unwrap_or_default();
        let peer = peers
            .iter()
            .find(|p| p["syncing"] == true && (device.is_empty() || p["device_id"] == device));
        if let Some(peer) = peer {
            let (done, total) = (
                peer["docs_done"].as_u64().unwrap_or(0),
                peer["docs_total"].as_u64().unwrap_or(0),
            );
            bar.set_length(total);
            bar.set_position(done);
            bar.set_message(peer["name"].as_str().unwrap_or_default().to_string());
            if last != Some(done) {
                (last, moved) = (Some(done), std::time::Instant::now());
            }
            if peer["caught_up"] == true && until.is_none() {
                bar.finish_with_message("caught up");
                return;
            }
        }
        if moved.elapsed() > std::time::Duration::from_secs(60) {
            bar.abandon_with_message("no progress for 60 s (it goes on in the background)");
            return;
        }
        let tick = tokio::time::sleep(std::time::Duration::from_millis(100));
        match until.as_mut() {
            Some(done) => tokio::select! {
                _ = done => {
                    bar.finish_and_clear();
                    return;
                }
                _ = tick => {}
            },
            None => tick.await,
        }
    }
}

async fn pair(
    global: &Global,
    code: Option<String>,
    peer: Option<Multiaddr>,
    relay: Option<Multiaddr>,
    expires: std::time::Duration,
) -> Result<()> {
    use devicelink::pairing::{HostEvent, Paired};
    use std::io::Write as _;
    let client = global.client().await?;
    let own_name = client.status().await?["device_name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let show = |p: &Paired| {
        println!("paired with {} ({})", p.name, p.device_id);
        println!(
            "verification: {}  (the other device must show the same digits)",
            p.verification
        );
        if p.name == own_name {
            println!(
                "both devices are named {:?}: to tell them apart, restart one agent with \
                 `devicelink agent --name NAME` (e.g. --name phone)",
                p.name
            );
        }
    };
    if let Some(code) = code {
        let body = RequestBody::PairJoin {
            code,
            addr: peer.map(|a| a.to_string()),
            relay: relay.map(|a| a.to_string()),
        };
        let paired: Paired = serde_json::from_value(client.request(body).await?)?;
        show(&paired);
        if devicelink::blind::is_marked_blind(&paired.listen_addrs) {
            println!("a blind device: your documents are kept on it sealed (it cannot read them)");
        } else {
            first_sync_progress(&client, &paired.device_id, None).await;
        }
        return Ok(());
    }
    let mut events = client.take_events().context("event stream already taken")?;
    let opened = client
        .request(RequestBody::PairStart {
            expiry_secs: Some(expires.as_secs()),
        })
        .await?;
    let code = opened["code"].as_str().unwrap_or_default();
    println!("pairing code: {code}");
    println!(
        "on your other device run: devicelink pair {code}   (valid {}, single use)",
        devicelink::args::describe(expires)
    );
    if let Ok(status) = client.request(RequestBody::Status).await {
        // Without mDNS the other device cannot find this one by the code alone: give it an
        // address (a LAN one first).
        let mdns = status["mdns"].as_str().unwrap_or_default();
        if mdns != "advertising and browsing" {
            let mut addrs: Vec<&str> = status["listen_addrs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a.as_str())
                .filter(|a| !a.contains("/p2p-circuit"))
                .collect();
            addrs.sort_by_key(|a| {
                (
                    a.contains("/127.0.0.1/") || a.contains("/::1/"),
                    !a.contains("/tcp/"),
                )
            });
            if let Some(addr) = addrs.first() {
                println!("this device is not announced nearby ({mdns}); on the other device run:");
                println!("  devicelink pair {code} --peer {addr}");
            }
        }
        // Reserved on a relay: a device on another network can join through it.
        for relay in status["reach"]["relays"].as_array().into_iter().flatten() {
            for addr in relay["relayed_addrs"].as_array().into_iter().flatten() {
                if let Some(addr) = addr.as_str() {
                    println!("from another network: devicelink pair {code} --relay {addr}");
                }
            }
        }
    }
    std::io::stdout().flush()?;
    while let Some(event) = events.recv().await {
        let Event::Pairing { update } = event else {
            continue;
        };
        match update {
            HostEvent::AttemptFailed {
                device_id,
                attempts_left,
                reason,
            } => {
                println!("a pairing attempt by {device_id} failed ({reason}); {attempts_left} attempt(s) left");
                std::io::stdout().flush()?;
            }
            HostEvent::Paired(paired) => {
                show(&paired);
                first_sync_progress(&client, &paired.device_id, None).await;
                return Ok(());
            }
            HostEvent::Closed { reason } => bail!("pairing failed: {reason}"),
        }
    }
    bail!("the agent closed the connection")
}

fn service(global: &Global, command: ServiceCommand) -> Result<()> {
    use devicelink::service;
    match command {
        ServiceCommand::Install {
            system,
            user,
            serve_relay,
            blind,
            relay,
            listen,
            external,
            name,
            no_start,
        } => {
            let data_dir = match (&global.data_dir, system) {
                (Some(dir), _) => std::path::absolute(dir)?,
                (None, true) => PathBuf::from(service::SYSTEM_DATA_DIR),
                (None, false) => global.data_dir()?,
            };
            let mut agent_args = Vec::new();
            // A system service has no login session (no XDG_RUNTIME_DIR): its socket is pinned
            // next to its data so the CLI finds it with the same --data-dir and --socket.
            let socket = match (&global.socket, system) {
                (Some(socket), _) => Some(std::path::absolute(socket)?),
                (None, true) => Some(data_dir.join("agent.sock")),
                (None, false) => None,
            };
            if let Some(socket) = &socket {
                agent_args.push("--socket".to_string());
                agent_args.push(socket.display().to_string());
            }
            if serve_relay {
                agent_args.push("--serve-relay".to_string());
            }
            if blind {
                agent_args.push("--blind".to_string());
            }
            for (flag, addrs) in [
                ("--relay", &relay),
                ("--listen", &listen),
                ("--external", &external),
            ] {
                for addr in addrs {
                    agent_args.push(flag.to_string());
                    agent_args.push(addr.to_string());
                }
            }
            if let Some(name) = name {
                agent_args.push("--name".to_string());
                agent_args.push(name);
            }
            let spec = service::ServiceSpec {
                exe: service::current_exe()?,
                data_dir,
                agent_args,
                system,
                run_as: user,
            };
            if let Some(why) = service::fragile_binary(&spec.exe) {
                eprintln!(
                    "warning: the service would run {why}; install the binary first (`cargo \
                     install --locked --path .`) and run `devicelink service install` from there"
                );
            }
            let installed = service::install(&spec, !no_start)?;
            println!("wrote {}", installed.path.display());
            println!("runs: {}", spec.command().join(" "));
            if let Some(socket) = &socket {
                println!(
                    "talk to it with: devicelink --data-dir {} --socket {} status",
                    spec.data_dir.display(),
                    socket.display()
                );
            }
            match installed.started {
                Ok(()) => println!("enabled and started"),
                Err(e) if no_start || e.starts_with("systemd is not running") => println!("{e}"),
                Err(e) => bail!("the service file is written, but {e}"),
            }
            Ok(())
        }
        ServiceCommand::Uninstall { system, no_stop } => {
            match service::uninstall(system, !no_stop)? {
                Some(path) => println!("removed {}", path.display()),
                None => println!("no service was installed"),
            }
            Ok(())
        }
    }
}

async fn peers(global: &Global) -> Result<()> {
    let report = global.client().await?.request(RequestBody::Peers).await?;
    let paired = report["paired"].as_array().cloned().unwrap_or_default();
    if let Some(line) = removed_notice(&paired) {
        println!("{line}");
    }
    println!("your devices:");
    if paired.is_empty() {
        println!("  (none yet: run `devicelink pair`)");
    }
    for p in paired {
        let online = if p["removed_this_device"] == true {
            "removed this device"
        } else if p["connected"] == true {
            "online "
        } else {
            "offline"
        };
        let last = last_sync(&p["last_sync"]);
        let link = p["link"]
            .as_str()
            .map(|l| format!("{l:<14}"))
            .unwrap_or_else(|| format!("{:<14}", "-"));
        println!(
            "  {online}  {:<16} {}  {link} {}  {last}",
            p["name"].as_str().unwrap_or("?"),
            p["device_id"].as_str().unwrap_or("?"),
            p["address"].as_str().unwrap_or("-"),
        );
    }
    let nearby = report["nearby"].as_array().cloned().unwrap_or_default();
    println!("nearby, not paired:");
    if nearby.is_empty() {
        println!("  (none)");
    }
    for n in nearby {
        println!(
            "  {:<16} {}  {}{}",
            n["name"].as_str().unwrap_or("?"),
            n["claimed_id"].as_str().unwrap_or("?"),
            n["addrs"]
                .as_array()
                .and_then(|a| a.first())
                .and_then(|a| a.as_str())
                .unwrap_or("-"),
            if n["pair_slot"].is_number() {
                "  (pairing open)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

async fn doctor(global: &Global) -> Result<()> {
    let r = global.client().await?.request(RequestBody::Doctor).await?;
    println!("device {}", r["device_id"].as_str().unwrap_or("?"));
    println!("listening on {}", r["listen_addrs"]);
    println!("mDNS: {}", r["mdns"].as_str().unwrap_or("?"));
    println!("Yjs apps: {}", r["yjs_apps"].as_str().unwrap_or("?"));
    println!("store: {}", r["store"].as_str().unwrap_or("?"));
    let mut blind = String::new();
    blind_summary(&mut blind, &r["blind"]);
    print!("{blind}");
    println!(
        "reachability: {}",
        r["reach"]["summary"].as_str().unwrap_or("?")
    );
    println!("multicast per interface:");
    for i in r["interfaces"].as_array().cloned().unwrap_or_default() {
        let ok = if i["multicast"] == true {
            "ok  "
        } else {
            "FAIL"
        };
        println!(
            "  {ok} {:<10} {:<16} {}",
            i["name"].as_str().unwrap_or("?"),
            i["addr"].as_str().unwrap_or(""),
            i["detail"].as_str().unwrap_or("")
        );
    }
    println!("peers:");
    for p in r["peers"].as_array().cloned().unwrap_or_default() {
        let via: Vec<String> = p["found_via"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let link = p["link"].as_str().unwrap_or("?");
        let state = if p["syncing"] == true {
            format!("connected ({link}) and syncing")
        } else if p["connected"] == true {
            format!("connected ({link})")
        } else {
            "not connected".to_string()
        };
        println!(
            "  {} {} ({}): {state}, found via {}{}",
            if p["trusted"] == true {
                "paired  "
            } else {
                "UNPAIRED"
            },
            p["name"].as_str().unwrap_or("?"),
            p["device_id"].as_str().unwrap_or("?"),
            if via.is_empty() {
                "nothing yet".to_string()
            } else {
                via.join(", ")
            },
            p["last_error"]
                .as_str()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default(),
        );
        if let Some(punch) = p["punch"].as_str() {
            println!("      hole punch: {punch}");
        }
        if p["syncing"] == true && p["changed_only"] == true {
            println!(
                "      catching up: {}/{} changed documents{}",
                p["docs_done"],
                p["docs_total"],
                if p["caught_up"] == true { ", done" } else { "" }
            );
        }
        if let Some(errors) = p["doc_errors"].as_object() {
            for (doc, reason) in errors {
                println!(
                    "      {doc}: NOT SYNCING: {}",
                    reason.as_str().unwrap_or("?")
                );
            }
        }
        if let Some(pending) = p["pending"].as_object() {
            for (doc, n) in pending {
                let n = n.as_u64().unwrap_or(0);
                let lag = if n == 0 {
                    "in sync".to_string()
                } else {
                    format!("{n} changes behind")
                };
                println!("      {doc}: {lag}");
            }
        }
    }
    let nearby = r["nearby"].as_array().map(|a| a.len()).unwrap_or(0);
    println!("nearby agents seen over mDNS: {nearby}");
    Ok(())
}

/// The human summary of `status`: this device, its documents, each of your devices.
/// The blind lines of `status`: what a blind device holds per member, or a member's backups.
fn blind_summary(out: &mut String, blind: &serde_json::Value) {
    use std::fmt::Write as _;
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    if blind["is_blind"] == true {
        let _ = writeln!(
            out,
            "blind store: {} documents, sealed (this device holds no name, content or key)",
            n(&blind["documents"])
        );
        for (member, held) in blind["held"].as_object().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  {member}: {} envelopes, {} snapshots, {} key grants, {} bytes",
                n(&held["envelopes"]),
                n(&held["snapshots"]),
                n(&held["grants"]),
                n(&held["bytes"])
            );
        }
        return;
    }
    for backup in blind["backups"].as_array().into_iter().flatten() {
        let behind = n(&backup["behind"]);
        let _ = writeln!(
            out,
            "backed up on blind device {}: {} documents, {}",
            backup["device"].as_str().unwrap_or("?"),
            n(&backup["documents"]),
            if behind == 0 {
                "every change".to_string()
            } else {
                format!("{behind} changes not yet")
            }
        );
    }
}

fn status_summary(status: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("?").to_string();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "this device: {} ({})",
        text(&status["device_name"]),
        text(&status["device_id"])
    );
    let _ = writeln!(
        out,
        "documents:   {} ({} loaded in memory, the agent's own included)",
        status["docs"].as_u64().unwrap_or(0),
        status["docs_loaded"].as_u64().unwrap_or(0)
    );
    let _ = writeln!(
        out,
        "Yjs apps:    {}",
        status["ws_endpoint"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!(
                "no y-websocket endpoint: {}",
                status["ws_note"]
                    .as_str()
                    .unwrap_or("see `devicelink doctor`")
            ))
    );
    blind_summary(&mut out, &status["blind"]);
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    let yours: Vec<_> = peers.iter().filter(|p| p["trusted"] == true).collect();
    if let Some(line) = removed_notice(&peers) {
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "your devices:");
    if yours.is_empty() {
        let _ = writeln!(out, "  (none yet: run `devicelink pair`)");
    }
    for p in yours {
        let state = if p["removed_this_device"] == true {
            "removed this device".to_string()
        } else if p["connected"] != true {
            "offline".to_string()
        } else if p["changed_only"] == true && p["caught_up"] != true {
            format!(
                "catching up {}/{}",
                p["docs_done"].as_u64().unwrap_or(0),
                p["docs_total"].as_u64().unwrap_or(0)
            )
        } else {
            "in sync".to_string()
        };
        let _ = writeln!(
            out,
            "  {:<16} {:<14} {:<20} {}",
            p["name"].as_str().unwrap_or("?"),
            p["link"].as_str().unwrap_or("-"),
            state,
            last_sync(&p["last_sync"])
        );
    }
    let others = status["others"].as_u64().unwrap_or(0);
    if others > 0 {
        let _ = writeln!(
            out,
            "  and {others} other device(s) seen recently (not yours)"
        );
    }
    out
}

/// "this device was removed by NAME ..." when one of your devices refused it as removed.
fn removed_notice(peers: &[serde_json::Value]) -> Option<String> {
    let by: Vec<String> = peers
        .iter()
        .filter(|p| p["removed_this_device"] == true)
        .map(|p| {
            p["name"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| p["device_id"].as_str().unwrap_or("?").to_string())
        })
        .collect();
    (!by.is_empty()).then(|| {
        format!(
            "this device was removed by {} from your devices: it no longer syncs with them \
             (pair it again with `devicelink pair` to rejoin)",
            by.join(", ")
        )
    })
}

/// "last sync 14:02:11 (3 s ago)" in local time, or "never synced".
fn last_sync(at: &serde_json::Value) -> String {
    match at.as_f64() {
        Some(secs) => format!("last sync {}", devicelink::status::local_time(secs)),
        None => "never synced".to_string(),
    }
}

fn print_json(value: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
