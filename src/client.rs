//! `devicelink::client`: the async Rust client of the agent's local IPC socket.
//!
//! Requests may be issued concurrently from many tasks; responses are matched by id. Events of
//! subscriptions arrive on the receiver returned by [`Client::take_events`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use crate::ipc::{ErrorCode, Event, Request, RequestBody, Response};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no devicelink agent is running for this data dir (nothing answers on {0}); start one with `devicelink agent`")]
    NotRunning(PathBuf),
    #[error("cannot connect to the agent at {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("lost the connection to the agent")]
    Closed,
    #[error("agent error ({code:?}): {message}")]
    Agent { code: ErrorCode, message: String },
    #[error("unexpected answer from the agent: {0}")]
    Protocol(String),
    #[error("the agent did not answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// Longest wait for any one answer (handoffs and pairing take seconds, never minutes).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Response>>>>;

/// A connection to a running agent.
pub struct Client {
    /// Request lines to the writer task, which coalesces those queued together into one write.
    lines: mpsc::UnboundedSender<Vec<u8>>,
    pending: Pending,
    next_id: AtomicU64,
    events: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl Client {
    /// Connects to the agent's socket at `path`.
    pub async fn connect(path: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(path).await.map_err(|source| {
            use std::io::ErrorKind::*;
            match source.kind() {
                NotFound | ConnectionRefused => ClientError::NotRunning(path.to_path_buf()),
                _ => ClientError::Connect {
                    path: path.to_path_buf(),
                    source,
                },
            }
        })?;
        let (read, write) = stream.into_split();
        let pending: Pending = Arc::default();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(read_loop(read, pending.clone(), events_tx));
        let (lines, lines_rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(write_loop(write, lines_rx, pending.clone()));
        Ok(Self {
            lines,
            writer,
            pending,
            next_id: AtomicU64::new(1),
            events: Mutex::new(Some(events_rx)),
            reader,
        })
    }

    /// The subscription events of this connection (only once).
    pub fn take_events(&self) -> Option<mpsc::UnboundedReceiver<Event>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Sends one request and waits for its response; the result on success.
    pub async fn request(&self, body: RequestBody) -> Result<Value, ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let line = serde_json::to_vec(&Request { id, body })
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if self.lines.send(line).is_err() {
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(ClientError::Closed);
        }
        let response = match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Ok(answer) => answer.map_err(|_| ClientError::Closed)?,
            Err(_) => {
                self.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                return Err(ClientError::Timeout(REQUEST_TIMEOUT));
            }
        };
        match (response.ok, response.error) {
            (true, _) => Ok(response.result.unwrap_or(Value::Null)),
            (false, Some(e)) => Err(ClientError::Agent {
                code: e.code,
                message: e.message,
            }),
            (false, None) => Err(ClientError::Protocol("error response without error".into())),
        }
    }

    pub async fn status(&self) -> Result<Value, ClientError> {
        self.request(RequestBody::Status).await
    }

    /// Names of every document (reads every page of `doc_list`).
    pub async fn doc_list(&self) -> Result<Vec<String>, ClientError> {
        let mut names = Vec::new();
        let mut after = None;
        loop {
            let page = self.doc_list_page(after.take(), None).await?;
            for doc in page["docs"].as_array().into_iter().flatten() {
                if let Some(name) = doc["name"].as_str() {
                    names.push(name.to_string());
                }
            }
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_string()),
                None => return Ok(names),
            }
        }
    }

    /// One page of documents with metadata: `{"docs": [{name, bytes, updated_at, by}], "next"}`.
    pub async fn doc_list_page(
        &self,
        after: Option<String>,
        limit: Option<usize>,
    ) -> Result<Value, ClientError> {
        self.request(RequestBody::DocList { after, limit }).await
    }

    /// Deletes a document on every device.
    pub async fn doc_delete(&self, doc: &str) -> Result<Value, ClientError> {
        self.request(RequestBody::DocDelete { doc: doc.into() })
            .await
    }

    /// The document as JSON.
    pub async fn doc_get(&self, doc: &str) -> Result<Value, ClientError> {
        self.request(RequestBody::DocGet { doc: doc.into() }).await
    }

    /// Sets `map[key] = value`; returns once the change is durable on the agent.
    pub async fn doc_set(
        &self,
        doc: &str,
        map: &str,
        key: &str,
        value: Value,
    ) -> Result<(), ClientError> {
        self.request(RequestBody::DocSet {
            doc: doc.into(),
            map: map.into(),
            key: key.into(),
            value,
        })
        .await
        .map(drop)
    }

    /// Appends `text` to root text `name`; returns once durable.
    pub async fn doc_text_append(
        &self,
        doc: &str,
        name: &str,
        text: &str,
    ) -> Result<(), ClientError> {
        self.request(RequestBody::DocText {
            doc: doc.into(),
            name: name.into(),
            index: None,
            delete: 0,
            insert: text.into(),
            offsets: None,
        })
        .await
        .map(drop)
    }

    /// Scopes this connection to an app's token (its documents only, read-only if it is).
    pub async fn app_auth(&self, token: &str) -> Result<Value, ClientError> {
        self.request(RequestBody::AppAuth {
            token: token.into(),
        })
        .await
    }

    /// Creates an app for the y-websocket endpoint; returns `(app, token)`.
    pub async fn app_add(
        &self,
        name: &str,
        origins: &[&str],
        prefixes: &[&str],
        read_only: bool,
    ) -> Result<(Value, String), ClientError> {
        let answer = self
            .request(RequestBody::AppAdd {
                name: name.into(),
                origins: origins.iter().map(|s| s.to_string()).collect(),
                prefixes: prefixes.iter().map(|s| s.to_string()).collect(),
                read_only,
            })
            .await?;
        let token = answer["token"].as_str().unwrap_or_default().to_string();
        Ok((answer["app"].clone(), token))
    }

    /// Revokes an app's token; returns whether the app existed.
    pub async fn app_remove(&self, name: &str) -> Result<bool, ClientError> {
        let answer = self
            .request(RequestBody::AppRemove { name: name.into() })
            .await?;
        Ok(answer["removed"] == true)
    }

    /// Sets this connection's presence in `doc` (`Value::Null` to leave); returns its client id.
    /// The agent keeps it alive while the connection is open.
    pub async fn awareness_set(&self, doc: &str, state: Value) -> Result<u64, ClientError> {
        let answer = self
            .request(RequestBody::AwarenessSet {
                doc: doc.into(),
                state,
            })
            .await?;
        Ok(answer["client"].as_u64().unwrap_or_default())
    }

    /// Who is present in `doc`: `[{"client", "clock", "state"}]`.
    pub async fn awareness_get(&self, doc: &str) -> Result<Value, ClientError> {
        Ok(self
            .request(RequestBody::AwarenessGet { doc: doc.into() })
            .await?["states"]
            .clone())
    }

    /// Subscribes to presence changes in `doc` (`Event::Awareness`); returns the subscription id.
    pub async fn awareness_subscribe(&self, doc: &str) -> Result<u64, ClientError> {
        let answer = self
            .request(RequestBody::AwarenessSubscribe { doc: doc.into() })
            .await?;
        Ok(answer["subscription"].as_u64().unwrap_or_default())
    }

    /// Applies a Yjs update (v1); returns once durable.
    pub async fn doc_apply(&self, doc: &str, update: &[u8]) -> Result<(), ClientError> {
        self.request(RequestBody::DocApply {
            doc: doc.into(),
            update: B64.encode(update),
            encoding: None,
        })
        .await
        .map(drop)
    }

    /// Applies a Yjs v2 update (`Y.encodeStateAsUpdateV2`); returns once durable.
    pub async fn doc_apply_v2(&self, doc: &str, update: &[u8]) -> Result<(), ClientError> {
        self.request(RequestBody::DocApply {
            doc: doc.into(),
            update: B64.encode(update),
            encoding: Some("v2".into()),
        })
        .await
        .map(drop)
    }

    /// The whole document (or what a holder of `state_vector` lacks) as one Yjs update.
    pub async fn doc_diff(&self, doc: &str, state_vector: &[u8]) -> Result<Vec<u8>, ClientError> {
        let value = self
            .request(RequestBody::DocDiff {
                doc: doc.into(),
                state_vector: B64.encode(state_vector),
            })
            .await?;
        decode_field(&value, "update")
    }

    /// Subscribes to a document's changes; events arrive on [`Client::take_events`].
    pub async fn subscribe(&self, doc: &str) -> Result<u64, ClientError> {
        let value = self
            .request(RequestBody::DocSubscribe {
                doc: doc.into(),
                state_vector: None,
            })
            .await?;
        value["subscription"]
            .as_u64()
            .ok_or_else(|| ClientError::Protocol("subscribe answer without subscription".into()))
    }
}

/// Decodes a base64 field of a result.
pub fn decode_field(value: &Value, field: &str) -> Result<Vec<u8>, ClientError> {
    let text = value[field]
        .as_str()
        .ok_or_else(|| ClientError::Protocol(format!("answer without {field}")))?;
    B64.decode(text)
        .map_err(|e| ClientError::Protocol(format!("{field} is not base64: {e}")))
}

/// Writes request lines; on a failed write, fails every waiting request.
async fn write_loop(
    write: tokio::net::unix::OwnedWriteHalf,
    lines: mpsc::UnboundedReceiver<Vec<u8>>,
    pending: Pending,
) {
    if let Err(e) = crate::ipc::write_lines(write, lines, |_| {}).await {
        tracing::debug!("writing to the agent failed: {e}");
    }
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

async fn read_loop(
    read: tokio::net::unix::OwnedReadHalf,
    pending: Pending,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let value: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!("agent sent a line that is not JSON: {e}");
                continue;
            }
        };
        if value.get("event").is_some() {
            match serde_json::from_value::<Event>(value) {
                Ok(event) => {
                    let _ = events.send(event);
                }
                Err(e) => tracing::warn!("unknown event from the agent: {e}"),
            }
            continue;
        }
        match serde_json::from_value::<Response>(value) {
            Ok(response) => {
                let waiter = response.id.and_then(|id| {
                    pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&id)
                });
                match waiter {
                    Some(waiter) => {
                        let _ = waiter.send(response);
                    }
                    None => tracing::warn!("response to no pending request: {response:?}"),
                }
            }
            Err(e) => tracing::warn!("unknown answer from the agent: {e}"),
        }
    }
    // Connection gone: fail every waiting request.
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
}
