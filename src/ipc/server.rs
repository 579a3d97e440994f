//! The IPC server: accepts local connections on the agent's Unix socket and serves requests
//! against an [`AgentHandle`]. Every connection has a reader (requests, bounded line length) and
//! a writer task (responses and events in order). A bad line gets an error response; the
//! connection and the agent go on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{broadcast, mpsc};
use tokio::task::{AbortHandle, JoinSet};

use super::awareness::ConnPresence;
use super::outbox::Outbox;
use super::protocol::{ErrorCode, Event, Request, RequestBody, Response, MAX_LINE_LEN};
use crate::agent::{AgentError, AgentHandle};
use crate::documents::{DocError, DocHandle, Durable, Origin, TextOffsets};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    #[error("cannot create the socket folder {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "refusing to put the socket in {path}: {reason}; choose a folder of your own with --socket"
    )]
    UnsafeDir { path: PathBuf, reason: String },
    #[error("another agent is already serving {0}")]
    InUse(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A running IPC server; dropping it stops accepting and removes the socket file.
pub struct IpcServer {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl IpcServer {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for IpcServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` (folder 0700, socket 0600) and serves `agent` on it.
pub async fn serve(agent: AgentHandle, path: PathBuf) -> Result<IpcServer, IpcError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        socket_dir(dir)?;
    }
    if path.exists() {
        // A live agent answers; a stale socket from a killed agent does not.
        if UnixStream::connect(&path).await.is_ok() {
            return Err(IpcError::InUse(path));
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path).map_err(|source| IpcError::Bind {
        path: path.clone(),
        source,
    })?;
    set_mode(&path, 0o600).map_err(|source| IpcError::Bind {
        path: path.clone(),
        source,
    })?;
    let task = tokio::spawn(accept_loop(agent, listener));
    Ok(IpcServer { path, task })
}

/// Makes sure the socket's folder is safe to listen in. A folder the agent creates gets mode
/// 0700. An existing folder is never changed (it may be /tmp, or the user's own): it is refused if
/// another user owns it, or if others may write to it without the sticky bit (they could replace
/// the socket). The socket itself is 0600 either way.
fn socket_dir(dir: &Path) -> Result<(), IpcError> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |reason: String| IpcError::UnsafeDir {
        path: dir.to_path_buf(),
        reason,
    };
    let io = |source| IpcError::Dir {
        path: dir.to_path_buf(),
        source,
    };
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::identity::create_private_dir(dir).map_err(io)?;
            set_mode(dir, 0o700).map_err(io)
        }
        Err(e) => Err(io(e)),
        Ok(meta) if !meta.is_dir() => Err(refuse("it is not a folder".into())),
        Ok(meta) => {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let me = unsafe { libc::geteuid() };
            let mode = meta.mode();
            if meta.uid() != me && meta.uid() != 0 {
                return Err(refuse(format!(
                    "it belongs to user {}, not to you (uid {me})",
                    meta.uid()
                )));
            }
            if mode & 0o022 != 0 && mode & 0o1000 == 0 {
                return Err(refuse(format!(
                    "others may write to it (mode {:o}) and it has no sticky bit",
                    mode & 0o7777
                )));
            }
            Ok(())
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

async fn accept_loop(agent: AgentHandle, listener: UnixListener) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(Connection::new(agent.clone()).serve(stream));
                }
                Err(e) => {
                    tracing::warn!("ipc accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {
                if connections.is_empty() {
                    release_freed_memory();
                }
            }
        }
    }
}

/// Gives memory freed by closed connections back to the system (glibc keeps freed heap memory
/// for reuse otherwise: thousands of connections that came and went would stay in RSS).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::task::spawn_blocking(|| {
        // SAFETY: malloc_trim only returns free heap pages to the kernel.
        unsafe { libc::malloc_trim(0) };
    });
}

/// One line read from a connection.
enum Line {
    Complete(Vec<u8>),
    TooLong,
    Eof,
}

/// Reads one `\n`-terminated line of at most `max` bytes, discarding the rest of longer lines.
async fn read_line(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if buf.is_empty() && !too_long {
                Line::Eof
            } else if too_long {
                Line::TooLong
            } else {
                Line::Complete(std::mem::take(buf))
            });
        }
        let (chunk, found) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        if !too_long {
            if buf.len() + chunk.len() > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        let consumed = found.unwrap_or(available.len());
        reader.consume(consumed);
        if found.is_some() {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete(std::mem::take(buf))
            });
        }
    }
}

/// How a request is answered: now, or once the change it made is durable.
enum Reply {
    Now(serde_json::Value),
    Later(Durable, serde_json::Value),
}

struct Connection {
    agent: AgentHandle,
    subscriptions: HashMap<u64, AbortHandle>,
    next_subscription: u64,
    /// This connection's local client id: stamped on its changes (`own` in events) and its
    /// presence.
    id: u64,
    /// Set by `app_auth`: the connection is limited to this app's documents.
    grant: Option<Arc<crate::apps::AppGrant>>,
    presence: ConnPresence,
}

impl Connection {
    fn new(agent: AgentHandle) -> Self {
        let client = agent.presence().client();
        Self {
            id: client.id(),
            presence: ConnPresence::new(client),
            agent,
            subscriptions: HashMap::new(),
            next_subscription: 1,
            grant: None,
        }
    }

    /// The document, with changes through it marked as this connection's.
    fn open(&self, doc: &str) -> Result<DocHandle, (ErrorCode, String)> {
        Ok(self
            .agent
            .docs()
            .open(doc)
            .map_err(doc_error)?
            .for_client(self.id))
    }

    async fn serve(mut self, stream: UnixStream) {
        let (read, write) = stream.into_split();
        let (out, writer) = Outbox::new(write);
        // Small: an idle connection costs little (long lines are assembled in `buf`).
        let mut reader = BufReader::with_capacity(4 * 1024, read);
        let mut buf = Vec::new();
        let (acks, acks_rx) = mpsc::unbounded_channel();
        let acker = tokio::spawn(answer_when_durable(acks_rx, out.clone()));
        loop {
            // An app that does not read its answers is not read from either (bounded memory).
            out.wait_for_room().await;
            if buf.capacity() > 1 << 20 {
                buf = Vec::new(); // do not keep a large request's buffer for an idle connection
            }
            let revoked = self.grant.as_ref().map(|g| g.revoked.clone());
            let line = tokio::select! {
                line = read_line(&mut reader, &mut buf, MAX_LINE_LEN) => line,
                _ = async { match &revoked { Some(r) => r.cancelled().await, None => std::future::pending().await } } => {
                    let _ = out.reply(&Response::err(None, ErrorCode::Forbidden, "the app's token was revoked; closing"));
                    break;
                }
            };
            let response = match line {
                Ok(Line::Eof) | Err(_) => break,
                Ok(Line::TooLong) => Response::err(
                    None,
                    ErrorCode::LineTooLong,
                    format!("request line longer than {MAX_LINE_LEN} bytes"),
                ),
                Ok(Line::Complete(line)) if line.iter().all(u8::is_ascii_whitespace) => continue,
                Ok(Line::Complete(line)) => match Request::from_json(&line) {
                    Ok(request) => match self.execute(request.body, &out).await {
                        Ok(Reply::Now(result)) => Response::ok(request.id, result),
                        // A write: applied now, in request order; answered by the acker once
                        // durable, without holding up the requests behind it.
                        Ok(Reply::Later(durable, result)) => {
                            if acks.send((request.id, durable, result)).is_err() {
                                break;
                            }
                            continue;
                        }
                        Err((code, message)) => Response::err(Some(request.id), code, message),
                    },
                    Err(e) => Response::err(read_id(&line), ErrorCode::BadRequest, e.to_string()),
                },
            };
            if out.reply(&response).is_err() {
                break;
            }
        }
        for (_, sub) in self.subscriptions.drain() {
            sub.abort();
        }
        drop(acks);
        let _ = acker.await;
        drop(out);
        let _ = writer.await;
    }

    fn add_subscription(&mut self, task: AbortHandle) -> u64 {
        let id = self.next_subscription;
        self.next_subscription += 1;
        self.subscriptions.insert(id, task);
        id
    }

    async fn execute(
        &mut self,
        body: RequestBody,
        out: &Outbox,
    ) -> Result<Reply, (ErrorCode, String)> {
        if let Some(grant) = &self.grant {
            super::scope::check(grant, &body)?;
        }
        let agent = &self.agent;
        Ok(Reply::Now(match body {
            RequestBody::Status => to_value(agent.status().map_err(agent_error)?),
            RequestBody::DocList { after, limit } => {
                let limit = limit.unwrap_or(1000).clamp(1, 10_000);
                let page = agent
                    .docs()
                    .list_meta(after.as_deref(), limit)
                    .map_err(doc_error)?;
                let next = (page.len() == limit)
                    .then(|| page.last().map(|(name, _)| name.clone()))
                    .flatten();
                let me = agent.device_id().to_string();
                let grant = self.grant.clone();
                let docs: Vec<serde_json::Value> = page
                    .into_iter()
                    .filter(|(name, _)| grant.as_ref().is_none_or(|g| g.may_read(name)))
                    .map(|(name, meta)| {
                        json!({
                            "name": name,
                            "bytes": meta.stored_bytes(),
                            "updated_at": meta.updated_ms as f64 / 1000.0,
                            "by": meta.by.unwrap_or_else(|| me.clone()),
                        })
                    })
                    .collect();
                json!({ "docs": docs, "next": next })
            }
            RequestBody::DocDelete { doc } => {
                let existed = agent.docs().delete(&doc).await.map_err(doc_error)?;
                json!({ "deleted": doc, "existed": existed })
            }
            RequestBody::DocOpen { doc } => {
                agent.docs().open(&doc).map_err(doc_error)?;
                json!({ "doc": doc })
            }
            RequestBody::DocGet { doc } => {
                if !agent.docs().exists(&doc).map_err(doc_error)? {
                    return Err((
                        ErrorCode::NotFound,
                        format!(
                            "document {doc:?} does not exist on this device (`devicelink doc list` lists them)"
                        ),
                    ));
                }
                agent.docs().open(&doc).map_err(doc_error)?.to_json()
            }
            RequestBody::DocSet {
                doc,
                map,
                key,
                value,
            } => {
                crate::hop!("request", doc);
                agent.docs().check_writable(&doc).map_err(doc_error)?;
                let handle = self.open(&doc)?;
                let durable = handle
                    .set_json_deferred(&map, &key, &value)
                    .map_err(doc_error)?;
                crate::hop!("applied", doc);
                return Ok(Reply::Later(durable, json!({})));
            }
            RequestBody::DocText {
                doc,
                name,
                index,
                delete,
                insert,
                offsets,
            } => {
                agent.docs().check_writable(&doc).map_err(doc_error)?;
                let (offsets, unit) = match offsets.as_deref() {
                    None | Some("utf8") => (TextOffsets::Utf8, "utf8"),
                    Some("utf16") => (TextOffsets::Utf16, "utf16"),
                    Some(other) => {
                        return Err((
                            ErrorCode::InvalidArgument,
                            format!("offsets must be \"utf8\" or \"utf16\", not {other:?}"),
                        ))
                    }
                };
                let handle = self.open(&doc)?;
                let (len, durable) = handle
                    .edit_text_in_deferred(&name, index, delete, &insert, offsets)
                    .map_err(doc_error)?;
                return Ok(Reply::Later(
                    durable,
                    json!({ "len": len, "offsets": unit }),
                ));
            }
            RequestBody::DocApply {
                doc,
                update,
                encoding,
            } => {
                agent.docs().check_writable(&doc).map_err(doc_error)?;
                let bytes = decode_b64(&update, "update")?;
                let v2 = match encoding.as_deref() {
                    None | Some("v1") => false,
                    Some("v2") => true,
                    Some(other) => {
                        return Err((
                            ErrorCode::InvalidArgument,
                            format!("unknown encoding {other:?}: \"v1\" (the default) or \"v2\""),
                        ))
                    }
                };
                let handle = self.open(&doc)?;
                let durable = if v2 {
                    handle.apply_update_v2_deferred(&bytes)
                } else {
                    handle.apply_update_deferred(&bytes)
                }
                .map_err(doc_error)?;
                return Ok(Reply::Later(durable, json!({})));
            }
            RequestBody::DocStateVector { doc } => {
                let handle = agent.docs().open(&doc).map_err(doc_error)?;
                json!({ "state_vector": B64.encode(handle.state_vector()) })
            }
            RequestBody::DocDiff { doc, state_vector } => {
                let sv = decode_b64(&state_vector, "state_vector")?;
                let handle = agent.docs().open(&doc).map_err(doc_error)?;
                let update = if sv.is_empty() {
                    handle.encode_state()
                } else {
                    handle.diff(&sv).map_err(doc_error)?
                };
                json!({ "update": B64.encode(update) })
            }
            RequestBody::DocSubscribe { doc, state_vector } => {
                let handle = agent.docs().open(&doc).map_err(doc_error)?;
                let app_sv = state_vector
                    .map(|sv| decode_b64(&sv, "state_vector"))
                    .transpose()?;
                let subscription = self.next_subscription;
                // Subscribed before the diff is taken: no change falls between the two.
                let events = handle.subscribe();
                let missing = match app_sv {
                    Some(sv) => Some(B64.encode(handle.diff(&sv).map_err(doc_error)?)),
                    None => None,
                };
                let task = tokio::spawn(forward_events(subscription, events, out.clone(), self.id));
                self.add_subscription(task.abort_handle());
                let mut answer = json!({ "subscription": subscription, "state_vector": B64.encode(handle.state_vector()) });
                if let Some(missing) = missing {
                    answer["update"] = json!(missing);
                }
                answer
            }
            RequestBody::AppAdd { .. } | RequestBody::AppList | RequestBody::AppRemove { .. } => {
                super::scope::app_request(agent.apps(), body)?
            }
            RequestBody::AppAuth { token } => {
                let grant = agent.apps().authenticate(&token).ok_or((
                    ErrorCode::Forbidden,
                    "unknown or revoked app token".to_string(),
                ))?;
                if let Some(current) = &self.grant {
                    if current.name != grant.name {
                        return Err((
                            ErrorCode::Forbidden,
                            format!(
                                "this connection is scoped to app {:?} already",
                                current.name
                            ),
                        ));
                    }
                }
                let answer = json!({ "app": grant.name, "prefixes": grant.prefixes(), "read_only": grant.read_only });
                self.grant = Some(grant);
                answer
            }
            RequestBody::AwarenessSet { doc, state } => {
                agent.docs().check_name(&doc).map_err(doc_error)?;
                json!({ "client": self.presence.set(&doc, state)? })
            }
            RequestBody::AwarenessGet { doc } => {
                json!({ "states": agent.presence().states_json(&doc) })
            }
            RequestBody::AwarenessSubscribe { doc } => {
                let hub = agent.presence().clone();
                let subscription = self.next_subscription;
                let events = hub.subscribe();
                let states = hub.states_json(&doc);
                let task = tokio::spawn(super::awareness::forward(
                    subscription,
                    doc,
                    events,
                    hub,
                    out.clone(),
                ));
                self.add_subscription(task.abort_handle());
                json!({ "subscription": subscription, "states": states })
            }
            RequestBody::DocUnsubscribe { subscription } => {
                match self.subscriptions.remove(&subscription) {
                    Some(task) => task.abort(),
                    None => {
                        return Err((
                            ErrorCode::NoSuchSubscription,
                            format!("no subscription {subscription} on this connection"),
                        ))
                    }
                }
                json!({})
            }
            RequestBody::TrustAdd { device, name } => {
                let peer = parse_device(&device)?;
                let name = name.unwrap_or_else(|| device.chars().take(12).collect());
                agent
                    .devices()
                    .trust_add(peer, &name)
                    .map_err(devices_error)?;
                json!({ "device": device, "name": name })
            }
            RequestBody::TrustRemove { device } => {
                let peer = parse_device(&device)?;
                json!({ "removed": agent.devices().forget(&peer).await.map_err(devices_error)? })
            }
            RequestBody::TrustList => {
                let list: Vec<_> = agent
                    .devices()
                    .trusted()
                    .map_err(devices_error)?
                    .into_iter()
                    .map(|(id, d)| json!({ "device": id.to_string(), "name": d.name, "addrs": d.addrs, "added_at": d.added_at }))
                    .collect();
                json!(list)
            }
            RequestBody::PairStart { expiry_secs } => {
                let expiry = match expiry_secs {
                    None => crate::pairing::DEFAULT_EXPIRY,
                    Some(secs) => std::time::Duration::from_secs(bounded_secs(
                        secs,
                        "expiry_secs",
                        crate::pairing::MAX_EXPIRY.as_secs(),
                    )?),
                };
                let (code, mut events) = agent
                    .devices()
                    .pair_open(expiry)
                    .await
                    .map_err(devices_error)?;
                let out = out.clone();
                tokio::spawn(async move {
                    while let Ok(update) = events.recv().await {
                        let done =
                            !matches!(update, crate::pairing::HostEvent::AttemptFailed { .. });
                        if out.event(&Event::Pairing { update }).is_err() || done {
                            return;
                        }
                    }
                });
                json!({ "code": code.to_string(), "slot": code.slot(), "expires_in_secs": expiry.as_secs() })
            }
            RequestBody::PairJoin { code, addr, relay } => {
                let code: crate::pairing::PairingCode =
                    code.parse().map_err(|e: crate::pairing::BadCode| {
                        (ErrorCode::InvalidArgument, e.to_string())
                    })?;
                let parse = |a: Option<String>| match a {
                    Some(a) => a.parse::<libp2p::Multiaddr>().map(Some).map_err(|e| {
                        (
                            ErrorCode::InvalidArgument,
                            format!("bad multiaddr {a:?}: {e}"),
                        )
                    }),
                    None => Ok(None),
                };
                let paired = match (parse(addr)?, parse(relay)?) {
                    (Some(_), Some(_)) => {
                        return Err((
                            ErrorCode::InvalidArgument,
                            "give addr or relay, not both".into(),
                        ))
                    }
                    (addr, None) => agent.devices().pair_join(&code, addr).await,
                    (None, Some(relay)) => {
                        agent.devices().pair_join_through_relay(&code, relay).await
                    }
                }
                .map_err(|e| (ErrorCode::Pairing, e.to_string()))?;
                to_value(paired)
            }
            RequestBody::Unpair { device } => {
                let peer = parse_device(&device)?;
                json!({ "removed": agent.devices().unpair(&peer).await.map_err(devices_error)? })
            }
            RequestBody::Peers => {
                let status = agent.status().map_err(agent_error)?;
                let paired: Vec<_> = status.peers.iter().filter(|p| p.trusted).cloned().collect();
                let nearby: Vec<_> = agent
                    .devices()
                    .nearby()
                    .into_iter()
                    .filter(|a| {
                        !paired
                            .iter()
                            .any(|p| p.device_id == a.claimed_id.to_string())
                    })
                    .collect();
                json!({ "paired": to_value(paired), "nearby": to_value(nearby) })
            }
            RequestBody::Doctor => to_value(agent.doctor().await.map_err(agent_error)?),
            RequestBody::ActivityPublish { draft } => to_value(
                agent
                    .activities()
                    .publish(draft)
                    .await
                    .map_err(handoff_error)?,
            ),
            RequestBody::ActivityList => {
                to_value(agent.activities().list().map_err(handoff_error)?)
            }
            RequestBody::ActivityUnpublish { activity_id } => {
                agent
                    .activities()
                    .unpublish(&activity_id)
                    .await
                    .map_err(handoff_error)?;
                json!({})
            }
            RequestBody::ActivitySubscribe => {
                use crate::handoff::ActivityEvent;
                let mut watch = agent.activities().watch().map_err(handoff_error)?;
                let out = out.clone();
                let task = tokio::spawn(async move {
                    while let Some(event) = watch.next().await {
                        let event = match event {
                            ActivityEvent::Changed(activities) => Event::Activities { activities },
                            ActivityEvent::ContinuedElsewhere(activity) => {
                                Event::ActivityContinued { activity }
                            }
                        };
                        if out.event(&event).is_err() {
                            return;
                        }
                    }
                });
                let subscription = self.add_subscription(task.abort_handle());
                json!({ "subscription": subscription, "activities": to_value(agent_activities(&self.agent)) })
            }
            RequestBody::Handoff {
                activity_id,
                timeout_secs,
            } => {
                let timeout = std::time::Duration::from_secs(bounded_secs(
                    timeout_secs.unwrap_or(10),
                    "timeout_secs",
                    crate::handoff::MAX_TIMEOUT.as_secs(),
                )?);
                to_value(
                    agent
                        .activities()
                        .handoff(&activity_id, timeout)
                        .await
                        .map_err(handoff_error)?,
                )
            }
            RequestBody::ConflictList { doc, all } => {
                let open = agent.conflicts().list(doc.as_deref(), all);
                to_value(open.map_err(conflict_error)?)
            }
            RequestBody::ConflictResolve {
                conflict_id: id,
                keep,
                value,
            } => {
                use crate::conflict::Keep;
                let keep = match (keep.as_deref(), value) {
                    (_, Some(value)) => Keep::Value(value),
                    (Some("local"), None) => Keep::Local,
                    (Some("remote"), None) => Keep::Remote,
                    (Some("winner"), None) => Keep::Winner,
                    (Some("other"), None) => Keep::Other,
                    (other, None) => {
                        return Err((
                            ErrorCode::InvalidArgument,
                            format!("keep must be local, remote, winner or other (or give a value), not {other:?}"),
                        ))
                    }
                };
                let resolved = agent
                    .conflicts()
                    .resolve(&id, keep)
                    .await
                    .map_err(conflict_error)?;
                to_value(resolved)
            }
            RequestBody::ConflictSubscribe => {
                let mut watch = agent.conflicts().watch().map_err(conflict_error)?;
                let out = out.clone();
                let task = tokio::spawn(async move {
                    while let Some(open) = watch.next().await {
                        if out.event(&Event::Conflicts { open }).is_err() {
                            return;
                        }
                    }
                });
                let subscription = self.add_subscription(task.abort_handle());
                json!({ "subscription": subscription })
            }
            RequestBody::PeerDial { addr } => {
                let addr = addr.parse().map_err(|e| {
                    (
                        ErrorCode::InvalidArgument,
                        format!("bad multiaddr {addr:?}: {e}"),
                    )
                })?;
                agent.dial(addr).map_err(agent_error)?;
                json!({})
            }
        }))
    }
}

/// Forwards a document's changes as events. While the connection's queue is full, changes are
/// counted, not queued; once there is room the app gets one `lagged` event with the count (it
/// re-reads the document or diffs by state vector), then the changes that follow.
async fn forward_events(
    subscription: u64,
    mut events: broadcast::Receiver<crate::DocUpdate>,
    out: Outbox,
    own_id: u64,
) {
    let mut missed = 0u64;
    loop {
        let received = tokio::select! {
            received = events.recv() => Some(received),
            _ = out.wait_for_room(), if missed > 0 => None,
        };
        if missed > 0 {
            match out.event(&Event::Lagged {
                subscription,
                missed,
            }) {
                Ok(true) => missed = 0,
                Ok(false) => {}
                Err(_) => return,
            }
        }
        let event = match received {
            None => continue,
            Some(Ok(update)) if update.deleted => Event::Deleted {
                subscription,
                doc: update.doc.to_string(),
            },
            Some(Ok(update)) => Event::Update {
                subscription,
                doc: update.doc.to_string(),
                update: B64.encode(&update.update),
                origin: match update.origin {
                    Origin::Local => "local".to_string(),
                    Origin::Peer(peer) => peer.to_string(),
                },
                own: update.client == own_id,
            },
            Some(Err(broadcast::error::RecvError::Lagged(n))) => {
                missed += n;
                continue;
            }
            Some(Err(broadcast::error::RecvError::Closed)) => return,
        };
        if missed > 0 {
            missed += 1; // nothing after a gap until the app has been told about it
            continue;
        }
        match out.event(&event) {
            Ok(true) => {
                if let Event::Update { doc, .. } = &event {
                    crate::hop!("to_app", doc);
                }
            }
            Ok(false) => missed += 1,
            Err(_) => return,
        }
    }
}

/// Answers writes once they are durable. The store completes acknowledgements in the order the
/// writes were queued, so waiting for them in request order delays no answer.
async fn answer_when_durable(
    mut acks: mpsc::UnboundedReceiver<(u64, Durable, serde_json::Value)>,
    out: Outbox,
) {
    while let Some((id, durable, result)) = acks.recv().await {
        let response = match durable.wait().await {
            Ok(()) => Response::ok(id, result),
            Err(e) => {
                let (code, message) = doc_error(e);
                Response::err(Some(id), code, message)
            }
        };
        if out.reply(&response).is_err() {
            return;
        }
    }
}

/// The `id` of a line that is JSON but not a valid request, so the error can be matched.
fn read_id(line: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()?
        .get("id")?
        .as_u64()
}

fn to_value(value: impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// A number of seconds from an app: 1 to `max`, else a clear error (never an overflow later).
fn bounded_secs(secs: u64, what: &str, max: u64) -> Result<u64, (ErrorCode, String)> {
    if (1..=max).contains(&secs) {
        Ok(secs)
    } else {
        Err((
            ErrorCode::InvalidArgument,
            format!("{what} must be between 1 and {max} seconds, not {secs}"),
        ))
    }
}

fn decode_b64(text: &str, what: &str) -> Result<Vec<u8>, (ErrorCode, String)> {
    B64.decode(text).map_err(|e| {
        (
            ErrorCode::InvalidArgument,
            format!("{what} is not valid base64: {e}"),
        )
    })
}

fn parse_device(text: &str) -> Result<libp2p::PeerId, (ErrorCode, String)> {
    text.parse().map_err(|e| {
        (
            ErrorCode::InvalidArgument,
            format!("bad device id {text:?}: {e}"),
        )
    })
}

fn agent_error(e: AgentError) -> (ErrorCode, String) {
    match e {
        AgentError::Doc(e) => doc_error(e),
        AgentError::Store(e) => doc_error(DocError::Store(e)),
        AgentError::Refused(message) => (ErrorCode::InvalidArgument, message),
        AgentError::Devices(e) => devices_error(e),
        AgentError::Diagnostics(crate::diagnostics::DiagnosticsError::Doc(e)) => doc_error(e),
        AgentError::Diagnostics(crate::diagnostics::DiagnosticsError::Devices(e)) => {
            devices_error(e)
        }
        other => (ErrorCode::Internal, other.to_string()),
    }
}

fn doc_error(e: DocError) -> (ErrorCode, String) {
    match e {
        _ if e.is_bad_input() => (ErrorCode::InvalidArgument, e.to_string()),
        DocError::InvalidUpdate { .. } | DocError::InvalidStateVector { .. } => {
            (ErrorCode::InvalidArgument, e.to_string())
        }
        DocError::NotDurable { .. } => (ErrorCode::NotDurable, e.to_string()),
        DocError::Store(_) => (ErrorCode::Storage, e.to_string()),
        DocError::AgentStopped => (ErrorCode::Internal, e.to_string()),
        DocError::Deleted(_) | DocError::NotFound(_) => (ErrorCode::NotFound, e.to_string()),
        DocError::WrongType { .. } => (ErrorCode::WrongType, e.to_string()),
        DocError::InvalidValue { .. } | DocError::Reserved(_) => {
            (ErrorCode::InvalidArgument, e.to_string())
        }
    }
}

fn agent_activities(agent: &AgentHandle) -> Vec<crate::handoff::Activity> {
    agent.activities().list().unwrap_or_default()
}

fn devices_error(e: crate::devices::DevicesError) -> (ErrorCode, String) {
    use crate::devices::DevicesError;
    match e {
        DevicesError::Doc(e) => doc_error(e),
        DevicesError::Store(e) => doc_error(DocError::Store(e)),
        DevicesError::Refused(message) => (ErrorCode::InvalidArgument, message),
        DevicesError::Stopped => (ErrorCode::Internal, e.to_string()),
    }
}

fn conflict_error(e: crate::conflict::ConflictError) -> (ErrorCode, String) {
    use crate::conflict::ConflictError;
    match e {
        ConflictError::NotFound(_) => (ErrorCode::NotFound, e.to_string()),
        ConflictError::Doc(e) => doc_error(e),
        _ => (ErrorCode::InvalidArgument, e.to_string()),
    }
}

fn handoff_error(e: crate::handoff::HandoffError) -> (ErrorCode, String) {
    use crate::handoff::HandoffError as H;
    let code = match &e {
        H::NotFound(_) | H::Gone(_) => ErrorCode::NotFound,
        H::BadType(_) | H::StateTooLarge(_) | H::Invalid(_) | H::NotHolder { .. } => {
            ErrorCode::InvalidArgument
        }
        H::Doc(_) => ErrorCode::Storage,
        H::AlreadyHere(_) | H::NotCaughtUp { .. } | H::HolderUnreachable { .. } | H::Refused(_) => {
            ErrorCode::Handoff
        }
    };
    (code, e.to_string())
}
