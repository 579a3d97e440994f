//! The blind always-on device (`agent --serve-relay --blind`), end to end with agent processes:
//! it carries documents between devices that are never online together, holds no byte of their
//! names or content, and stops carrying them to a device removed from the group.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::process::{stderr, stdout, AgentProcess, OpenCode};

const WAIT: Duration = Duration::from_secs(30);

fn start_blind(dir: &Path) -> AgentProcess {
    AgentProcess::start_with(dir, &[], &["--no-mdns", "--serve-relay", "--blind"])
}

/// `joiner` joins the code `host` opens, dialing the host's address.
fn pair(host: &AgentProcess, joiner: &AgentProcess) -> String {
    let code = OpenCode::open(host, 120);
    let out = joiner.cli(&["pair", &code.code, "--peer", &host.addr]);
    assert!(out.status.success(), "pairing failed: {}", stderr(&out));
    stdout(&out)
}

fn status(agent: &AgentProcess) -> serde_json::Value {
    serde_json::from_str(&stdout(&agent.cli(&["status", "--json"]))).unwrap_or_default()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The document as JSON text on `agent` ("" if it cannot be read).
fn doc(agent: &AgentProcess, name: &str) -> String {
    stdout(&agent.cli(&["doc", "get", name]))
}

/// Whether `member` has a blind session with `blind` and everything it wrote is uploaded.
fn backed_up(member: &AgentProcess, blind: &AgentProcess) -> bool {
    status(member)["blind"]["backups"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|b| b["device"] == blind.device_id.as_str() && b["behind"] == 0)
}

/// Every file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap().flatten() {
                stack.push(entry.path());
            }
        } else if let Ok(bytes) = std::fs::read(&path) {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[test]
fn a_blind_device_carries_documents_it_cannot_read() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let blind = start_blind(dirs[0].path());
    let laptop = AgentProcess::start(dirs[1].path(), &[]);
    let laptop_id = laptop.device_id.clone();
    let mut phone = AgentProcess::start(dirs[2].path(), &[]);
    let said = pair(&blind, &laptop);
    assert!(said.contains("blind device"), "{said}");
    pair(&laptop, &phone);
    // The phone learns the blind device from the group and keeps a session with it.
    wait_for("the phone to use the blind device", || backed_up(&phone, &blind));
    phone.stop();

    // The laptop writes while the phone is off, then stops too.
    let (name, secret, title) = (
        "plans-4f2a9e",
        "MARKER-plaintext-9c3e71d",
        "Quarterly-Zebra-Report",
    );
    let out = laptop.cli(&["doc", "text", name, "body", "--append", secret]);
    assert!(out.status.success(), "{}", stderr(&out));
    let value = format!("\"{title}\"");
    let out = laptop.cli(&["doc", "set", name, "meta", "title", &value]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the laptop to upload its changes", || {
        backed_up(&laptop, &blind)
            && status(&blind)["blind"]["held"][laptop.device_id.as_str()]["envelopes"]
                .as_u64()
                .is_some_and(|n| n >= 1)
    });
    laptop.stop();

    // The phone starts later and gets the document from the blind device alone.
    phone = AgentProcess::start(dirs[2].path(), &[]);
    wait_for("the phone to get the document", || {
        let text = doc(&phone, name);
        text.contains(secret) && text.contains(title)
    });

    // No byte of the document's name or content anywhere in the blind device's data dir.
    for needle in [name, secret, title, "Zebra", "body"] {
        let found = files_containing(dirs[0].path(), needle.as_bytes());
        assert!(found.is_empty(), "{needle:?} found in {found:?}");
    }
    // Nor through its own CLI: it has no such document, and says what it holds instead.
    let list = stdout(&blind.cli(&["doc", "list"]));
    assert!(!list.contains(name), "{list}");
    let got = doc(&blind, name);
    assert!(!got.contains(secret), "{got}");
    let summary = stdout(&blind.cli(&["status"]));
    assert!(summary.contains("blind store: 1 documents"), "{summary}");
    assert!(summary.contains(&laptop_id), "{summary}");
    let summary = stdout(&phone.cli(&["status"]));
    assert!(
        summary.contains(&format!("backed up on blind device {}", blind.device_id)),
        "{summary}"
    );
}

#[test]
fn removing_a_device_cuts_it_off_and_a_member_offline_gets_the_new_key() {
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let blind = start_blind(dirs[0].path());
    let laptop = AgentProcess::start(dirs[1].path(), &[]);
    let phone = AgentProcess::start(dirs[2].path(), &[]);
    let mut tablet = AgentProcess::start(dirs[3].path(), &[]);
    pair(&blind, &laptop);
    pair(&laptop, &phone);
    pair(&laptop, &tablet);
    wait_for("phone and tablet to use the blind device", || {
        backed_up(&phone, &blind) && backed_up(&tablet, &blind)
    });
    let out = laptop.cli(&["doc", "text", "before", "body", "--append", "shared-before"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the phone to get what was written before", || {
        doc(&phone, "before").contains("shared-before")
    });

    // The tablet is off while the laptop removes the phone (a new key epoch) and writes.
    tablet.stop();
    let out = laptop.cli(&["unpair", &phone.device_id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let secret = "written-after-removal-5e8b";
    let out = laptop.cli(&["doc", "text", "after", "body", "--append", secret]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for("the laptop to upload its changes", || backed_up(&laptop, &blind));
    laptop.stop();

    // The tablet comes back with only the blind device online: it gets the new key sealed to
    // it there, and what was written with it.
    tablet = AgentProcess::start(dirs[3].path(), &[]);
    wait_for("the tablet to get what was written after", || {
        doc(&tablet, "after").contains(secret)
    });
    // The removed phone, online all along, never gets it: the blind device no longer serves
    // it (and it lacks the new key).
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(!doc(&phone, "after").contains(secret), "the removed phone got it");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(doc(&phone, "before").contains("shared-before"), "it keeps what it had");
    let peers = status(&blind)["peers"].clone();
    let phone_trusted = peers
        .as_array()
        .into_iter()
        .flatten()
        .any(|p| p["device_id"] == phone.device_id.as_str() && p["trusted"] == true);
    assert!(!phone_trusted, "the blind device still serves the phone: {peers}");
}
