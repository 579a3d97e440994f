//! Local IPC: how apps on this device talk to the agent.
//!
//! A Unix domain socket (folder 0700, socket 0600) carrying JSON lines. Each line from the app is
//! a [`Request`] with an `id`; the agent answers each with one [`Response`] carrying the same
//! `id`, and pushes [`Event`]s for subscriptions. Binary payloads (Yjs updates, state vectors)
//! are base64. protocol/README.md ("Local IPC") is the normative description.

mod awareness;
mod outbox;
pub mod protocol;
pub mod scope;
pub mod server;

use std::path::{Path, PathBuf};

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

pub use protocol::{ErrorBody, ErrorCode, Event, Request, RequestBody, Response, MAX_LINE_LEN};

/// The socket path for the agent using `data_dir`:
/// `$XDG_RUNTIME_DIR/devicelink/agent-<hash of the data dir>.sock`, else `<data_dir>/agent.sock`.
pub fn default_socket_path(data_dir: &Path) -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(runtime) => {
            let canonical = data_dir
                .canonicalize()
                .unwrap_or_else(|_| data_dir.to_path_buf());
            let hash = crc32fast::hash(canonical.to_string_lossy().as_bytes());
            PathBuf::from(runtime)
                .join("devicelink")
                .join(format!("agent-{hash:08x}.sock"))
        }
        None => data_dir.join("agent.sock"),
    }
}

/// Writes every line received on `lines`, each followed by `\n`, to `write` until the channel
/// closes; whatever is queued together goes out in one write, after which `written` is told its
/// size. Used by both ends of the socket.
pub(crate) async fn write_lines<L: AsRef<[u8]>>(
    mut write: impl AsyncWrite + Unpin,
    mut lines: mpsc::UnboundedReceiver<L>,
    mut written: impl FnMut(usize),
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Some(line) = lines.recv().await {
        buf.clear();
        buf.extend_from_slice(line.as_ref());
        buf.push(b'\n');
        drop(line);
        while buf.len() < 1 << 20 {
            match lines.try_recv() {
                Ok(line) => {
                    buf.extend_from_slice(line.as_ref());
                    buf.push(b'\n');
                }
                Err(_) => break,
            }
        }
        let result = write.write_all(&buf).await;
        written(buf.len());
        result?;
        if buf.capacity() > 1 << 20 {
            buf = Vec::new(); // do not keep a large message's buffer for an idle connection
        }
    }
    Ok(())
}
