//! The y-websocket endpoint: unmodified Yjs apps use the agent as their provider.
//!
//! `new WebsocketProvider('ws://127.0.0.1:4455', 'notes/1', ydoc, { params: { token } })`
//! connects to document `notes/1` (the URL path, percent-decoded) and syncs with it, and through
//! the agent with every linked device, live; its awareness (presence) reaches apps on the other
//! devices too. The endpoint listens on loopback only and admits a connection before the
//! WebSocket upgrade only if it carries the token of an app (`devicelink app add`), an `Origin`
//! that app allows (if the client sends one) and a document inside the app's scope; otherwise
//! it answers HTTP 401 or 403 and upgrades nothing.
//!
//! This module owns listening and admission; [`connection`] runs the y-protocols exchange of
//! one admitted connection.

mod connection;
mod slots;

pub use slots::{MAX_CONNECTIONS, MAX_PENDING, MAX_PER_APP, UPGRADE_DEADLINE};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::agent::AgentHandle;
use crate::apps::AppGrant;
use slots::{Slot, SlotError, Slots};

/// The endpoint's default address (`devicelink agent --ws` changes it, `--no-ws` turns it off).
pub const DEFAULT_ADDR: &str = "127.0.0.1:4455";
/// Largest message accepted from a client that may write its document (an app's first sync
/// of a large document).
pub const MAX_MESSAGE_LEN: usize = 256 << 20;
/// Largest message accepted from a client that may only read its document: its sync requests
/// (a state vector) and its presence (64 KiB at most); anything it would write is dropped.
pub const READ_ONLY_MESSAGE_LEN: usize = 256 << 10;
/// Largest HTTP request head looked at before the upgrade.
const MAX_REQUEST_HEAD: usize = 8 << 10;

/// Errors starting the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("the y-websocket endpoint listens on loopback only; {0} is not a loopback address")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr} for the y-websocket endpoint: {source} (choose another with --ws ADDR, or --no-ws)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running endpoint; dropping it stops accepting (open connections end with the agent).
pub struct WsServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    agent: AgentHandle,
}

impl WsServer {
    /// The address it listens on (with the port picked if 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for WsServer {
    fn drop(&mut self) {
        self.task.abort();
        self.agent.set_ws_endpoint(None);
    }
}

/// Listens on `addr` (a loopback address) and serves `agent`'s documents to y-websocket clients.
pub async fn serve(agent: AgentHandle, addr: SocketAddr) -> Result<WsServer, BridgeError> {
    if !addr.ip().is_loopback() {
        return Err(BridgeError::NotLoopback(addr));
    }
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| BridgeError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| BridgeError::Bind { addr, source })?;
    agent.set_ws_endpoint(Some(addr));
    let task = tokio::spawn(accept_loop(agent.clone(), listener));
    tracing::info!("y-websocket endpoint on ws://{addr}");
    Ok(WsServer { addr, task, agent })
}

async fn accept_loop(agent: AgentHandle, listener: TcpListener) {
    let slots = Arc::new(Slots::default());
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                let (agent, slots) = (agent.clone(), slots.clone());
                // The upgrade runs as its own task so that a newer socket can evict it.
                let upgrade = tokio::spawn({
                    let slots = slots.clone();
                    async move { upgrade(&agent, &slots, stream).await.map(|ws| (agent, ws)) }
                });
                let id = slots.upgrading(upgrade.abort_handle());
                tokio::spawn(async move {
                    let upgraded = upgrade.await;
                    slots.upgraded(id);
                    if let Ok(Some((agent, (ws, Admission { doc, grant, slot })))) = upgraded {
                        connection::run(agent, ws, doc, grant).await;
                        drop(slot);
                    }
                });
            }
            Err(e) => {
                tracing::warn!("y-websocket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// What an admitted client may use, and its slot.
struct Admission {
    doc: String,
    grant: Arc<AppGrant>,
    slot: Slot,
}

// The refusal type is tungstenite's (an HTTP response), large by nature.
#[allow(clippy::result_large_err)]
async fn upgrade(
    agent: &AgentHandle,
    slots: &Arc<Slots>,
    stream: TcpStream,
) -> Option<(connection::Ws, Admission)> {
    let mut admitted = None;
    let check = |request: &Request, response: Response| match admit(agent, slots, request) {
        Ok(admission) => {
            admitted = Some(admission);
            Ok(response)
        }
        Err((status, reason)) => {
            tracing::info!(path = %request.uri().path(), "y-websocket connection refused ({status}): {reason}");
            Err(refusal(status, reason))
        }
    };
    let upgrade = async {
        let limit = message_limit(agent, &stream).await;
        let config = WebSocketConfig::default()
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config)).await
    };
    let ws = match tokio::time::timeout(UPGRADE_DEADLINE, upgrade).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            tracing::debug!("y-websocket handshake failed: {e}");
            return None;
        }
        Err(_) => return None,
    };
    Some((ws, admitted?))
}

/// The largest message the client on `stream` may send: [`MAX_MESSAGE_LEN`] if its token may
/// write the document it asks for, else [`READ_ONLY_MESSAGE_LEN`]. The request head is peeked,
/// not read, before the upgrade sizes its buffers (tungstenite takes its limits up front); the
/// upgrade then reads and checks it in full ([`admit`]). The caller bounds the wait.
async fn message_limit(agent: &AgentHandle, stream: &TcpStream) -> usize {
    let mut head = vec![0u8; MAX_REQUEST_HEAD];
    let len = loop {
        match stream.peek(&mut head).await {
            Ok(0) | Err(_) => return READ_ONLY_MESSAGE_LEN,
            Ok(n) if n == head.len() || head[..n].windows(4).any(|w| w == b"\r\n\r\n") => break n,
            // Part of the head: peek returns at once while anything is unread, so wait a little.
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let may_write = std::str::from_utf8(&head[..len])
        .ok()
        .and_then(|head| head.split_whitespace().nth(1))
        .and_then(|target| {
            let (path, query) = target.split_once('?')?;
            let doc = doc_name(path).ok()?;
            let grant = agent.apps().authenticate(&query_param(query, "token")?)?;
            Some(grant.may_write(&doc))
        });
    if may_write == Some(true) {
        MAX_MESSAGE_LEN
    } else {
        READ_ONLY_MESSAGE_LEN
    }
}

/// Checks token, origin and document of an upgrade request.
fn admit(
    agent: &AgentHandle,
    slots: &Arc<Slots>,
    request: &Request,
) -> Result<Admission, (StatusCode, String)> {
    let token = request
        .uri()
        .query()
        .and_then(|q| query_param(q, "token"))
        .filter(|t| !t.is_empty())
        .ok_or((
            StatusCode::UNAUTHORIZED,
            "missing token: connect with ?token=... (see `devicelink app add`)".to_string(),
        ))?;
    let grant = agent.apps().authenticate(&token).ok_or((
        StatusCode::UNAUTHORIZED,
        "unknown or revoked token".to_string(),
    ))?;
    let origin = match request.headers().get("origin") {
        Some(value) => Some(value.to_str().map_err(|_| {
            (
                StatusCode::FORBIDDEN,
                "the Origin header is not text".to_string(),
            )
        })?),
        None => None,
    };
    if !grant.allows_origin(origin) {
        return Err((
            StatusCode::FORBIDDEN,
            format!(
                "origin {} is not allowed for app {:?} (devicelink app add {} --origin URL)",
                origin.unwrap_or_default(),
                grant.name,
                grant.name
            ),
        ));
    }
    let doc = doc_name(request.uri().path())
        .map_err(|reason| (StatusCode::BAD_REQUEST, reason.to_string()))?;
    agent
        .docs()
        .check_name(&doc)
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    if let Err(e) = agent.docs().check_writable(&doc) {
        return Err((StatusCode::FORBIDDEN, e.to_string()));
    }
    if !grant.may_read(&doc) {
        return Err((
            StatusCode::FORBIDDEN,
            format!("app {:?} may not open {doc:?}", grant.name),
        ));
    }
    let slot = slots.admit(&grant.name).map_err(|e| {
        let status = match e {
            SlotError::Full => StatusCode::SERVICE_UNAVAILABLE,
            SlotError::AppFull(_) => StatusCode::TOO_MANY_REQUESTS,
        };
        (status, e.to_string())
    })?;
    Ok(Admission { doc, grant, slot })
}

/// The document a request path names: the path without its leading `/`, percent-decoded.
fn doc_name(path: &str) -> Result<String, String> {
    let raw = path.strip_prefix('/').unwrap_or(path);
    let name = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| "the document name is not UTF-8".to_string())?
        .into_owned();
    if name.is_empty() {
        return Err("the path names no document: connect to ws://HOST:PORT/DOCUMENT".into());
    }
    Ok(name)
}

/// The percent-decoded value of `key` in a query string.
fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then(|| {
            let v = v.replace('+', " ");
            percent_encoding::percent_decode_str(&v)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

fn refusal(status: StatusCode, reason: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(reason));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_queries_decode() {
        assert_eq!(doc_name("/notes/1").unwrap(), "notes/1");
        assert_eq!(doc_name("/caf%C3%A9%20list").unwrap(), "café list");
        assert!(doc_name("/").is_err());
        assert!(doc_name("/%FF").is_err());
        assert_eq!(
            query_param("a=1&token=dlapp_x%2By&b", "token").as_deref(),
            Some("dlapp_x+y")
        );
        assert_eq!(query_param("a=1", "token"), None);
    }
}
