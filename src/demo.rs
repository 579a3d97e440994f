//! `devicelink demo`: two agents on 127.0.0.1 in temporary data dirs show sync, live updates,
//! offline work, catch-up and session handoff, printing what happens with timings. Fails unless everything
//! converged.

use std::io::Write;
use std::time::{Duration, Instant};

use yrs::{Map, Text};

use crate::{Agent, AgentConfig, AgentError, AgentHandle, DocHandle};

/// Longest the demo waits for any one step.
const STEP_LIMIT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Doc(#[from] crate::DocError),
    #[error("cannot create a temporary data dir: {0}")]
    TempDir(std::io::Error),
    #[error("{0} did not happen within {STEP_LIMIT:?}")]
    Timeout(&'static str),
    #[error("the two devices ended with different documents")]
    Diverged,
    #[error(transparent)]
    Handoff(#[from] crate::handoff::HandoffError),
    #[error(transparent)]
    Devices(#[from] crate::devices::DevicesError),
}

/// Runs the demo, writing its narration to `out`.
pub async fn run(out: &mut impl Write) -> Result<(), DemoError> {
    let dir_a = tempfile::tempdir().map_err(DemoError::TempDir)?;
    let dir_b = tempfile::tempdir().map_err(DemoError::TempDir)?;
    let config = |dir: &std::path::Path, name: &str| {
        let mut c = AgentConfig::new(dir);
        c.device_name = name.to_string();
        c
    };
    let say = |out: &mut dyn Write, text: String| {
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    };

    let a = Agent::start(config(dir_a.path(), "laptop")).await?;
    let mut b = Agent::start(config(dir_b.path(), "phone")).await?;
    say(out, format!("laptop  {}  {}", a.device_id(), addrs(&a)));
    say(out, format!("phone   {}  {}", b.device_id(), addrs(&b)));

    // 1. Both edit the same document before they know each other.
    let notes_a = a.docs().open("notes")?;
    let notes_b = b.docs().open("notes")?;
    notes_a.append_text("body", "Buy milk. ").await?;
    notes_a.set_map_value("meta", "title", "Shopping").await?;
    notes_b.append_text("body", "Call mum. ").await?;
    notes_b.set_map_value("meta", "pinned", true).await?;
    say(out, "\n1. offline edits on both devices:".into());
    say(out, format!("   laptop {}", notes_a.to_json()));
    say(out, format!("   phone  {}", notes_b.to_json()));

    // 2. Pair (trust each other) and connect.
    let started = Instant::now();
    a.devices().trust_add(b.device_id(), "phone")?;
    b.devices().trust_add(a.device_id(), "laptop")?;
    a.dial(b.listen_addrs()[0].clone())?;
    wait("the first sync", || converged(&notes_a, &notes_b)).await?;
    say(
        out,
        format!(
            "\n2. connected over Noise/TCP and merged in {:.1} ms:",
            ms(started)
        ),
    );
    say(out, format!("   both   {}", notes_a.to_json()));

    // 3. Live changes, both directions.
    let mut latencies = Vec::new();
    let meta_b = notes_b.yrs_doc().get_or_insert_map("meta");
    for i in 0..50i64 {
        let (from, to) = if i % 2 == 0 {
            (&notes_a, &notes_b)
        } else {
            (&notes_b, &notes_a)
        };
        let mut events = to.subscribe();
        let started = Instant::now();
        from.set_map_value("meta", "counter", i).await?;
        tokio::time::timeout(STEP_LIMIT, events.recv())
            .await
            .map_err(|_| DemoError::Timeout("a live update"))?
            .map_err(|_| DemoError::Timeout("a live update"))?;
        latencies.push(started.elapsed());
    }
    latencies.sort();
    let counter = notes_b.read(|txn| meta_b.get(txn, "counter").map(|v| v.to_string(txn)));
    say(out, format!(
        "\n3. 50 live edits back and forth (durable on the writer, then seen on the other device):\n   \
         p50 {:.2} ms, max {:.2} ms; counter on phone = {}",
        latencies[latencies.len() / 2].as_secs_f64() * 1e3,
        latencies[latencies.len() - 1].as_secs_f64() * 1e3,
        counter.unwrap_or_default()
    ));

    // 4. The phone goes offline; the laptop keeps working.
    let phone_id = b.device_id();
    drop(notes_b);
    b.shutdown().await?;
    wait("the laptop to notice the phone left", || {
        !a.is_syncing_with(&phone_id)
    })
    .await?;
    let body = notes_a.yrs_doc().get_or_insert_text("body");
    let edits = (0..1000).map(|i| {
        let (doc, body) = (notes_a.clone(), body.clone());
        async move {
            doc.transact(|txn| {
                let len = body.len(txn);
                body.insert(txn, len, if i % 100 == 99 { "\n" } else { "." });
            })
            .await
        }
    });
    for result in futures::future::join_all(edits).await {
        result?;
    }
    say(
        out,
        "\n4. phone offline; laptop made 1,000 more edits (each durable before acknowledged)"
            .into(),
    );

    // 5. The phone comes back from its data dir and catches up by state vectors.
    let started = Instant::now();
    b = Agent::start(config(dir_b.path(), "phone")).await?;
    b.dial(a.listen_addrs()[0].clone())?;
    let notes_b = b.docs().open("notes")?;
    wait("the catch-up", || converged(&notes_a, &notes_b)).await?;
    say(
        out,
        format!(
            "\n5. phone restarted from disk and caught up in {:.1} ms (start + connect + sync)",
            ms(started)
        ),
    );

    // 6. Handoff: the laptop publishes what the user is doing; the phone continues it.
    let mut continued = a.activities().continued_elsewhere();
    notes_a.append_text("body", "Draft reply to Sam: ").await?;
    let cursor = notes_a.text("body").len();
    let activity = a
        .activities()
        .publish(crate::handoff::ActivityDraft {
            id: None,
            activity_type: "com.example.notes.edit".into(),
            title: "Editing shopping notes".into(),
            docs: vec!["notes".into()],
            app_state: serde_json::json!({ "cursor": cursor }),
            ttl_secs: Some(600),
        })
        .await?;
    wait("the activity to reach the phone", || {
        b.activities()
            .list()
            .is_ok_and(|list| list.iter().any(|x| x.id == activity.id))
    })
    .await?;
    let started = Instant::now();
    let handoff = b.activities().handoff(&activity.id, STEP_LIMIT).await?;
    let took = ms(started);
    let on_laptop = tokio::time::timeout(STEP_LIMIT, continued.recv())
        .await
        .map_err(|_| DemoError::Timeout("the continued event"))?
        .map_err(|_| DemoError::Timeout("the continued event"))?;
    let body = handoff.docs["notes"]["body"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    say(
        out,
        format!(
            "\n6. handoff: laptop published \"{}\"; the phone continued it in {took:.1} ms\n   \
         phone got app state {} with the document already caught up ({} bytes, ends with {:?})\n   \
         laptop was told: continued on {} (epoch {})",
            activity.title,
            handoff.activity.app_state,
            body.len(),
            body.chars()
                .rev()
                .take(20)
                .collect::<String>()
                .chars()
                .rev()
                .collect::<String>(),
            if on_laptop.holder == b.device_id().to_string() {
                "the phone"
            } else {
                "another device"
            },
            on_laptop.epoch,
        ),
    );
    if body.len() != cursor || notes_b.text("body") != notes_a.text("body") {
        return Err(DemoError::Diverged);
    }

    let same = converged(&notes_a, &notes_b);
    say(
        out,
        format!(
            "\nresult: {} ({} bytes of text on both)",
            if same { "converged" } else { "DIVERGED" },
            notes_b.text("body").len()
        ),
    );
    a.shutdown().await?;
    b.shutdown().await?;
    if same {
        Ok(())
    } else {
        Err(DemoError::Diverged)
    }
}

fn addrs(agent: &AgentHandle) -> String {
    agent
        .listen_addrs()
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

/// The same changes, deletions and content on both (see [`crate::convergence`]).
fn converged(a: &DocHandle, b: &DocHandle) -> bool {
    crate::convergence::compare(a.yrs_doc(), b.yrs_doc()).is_ok()
}

async fn wait(what: &'static str, mut cond: impl FnMut() -> bool) -> Result<(), DemoError> {
    let deadline = Instant::now() + STEP_LIMIT;
    while !cond() {
        if Instant::now() > deadline {
            return Err(DemoError::Timeout(what));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}
