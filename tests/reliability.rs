//! Reliability: repeated SIGKILLs of the real binary mid-write, and seeded random partitions,
//! restarts and edits across 3 to 5 agents. Seeds are printed; set DEVICELINK_SEED to replay.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::{self, AgentProcess};
use common::*;
use devicelink::AgentHandle;
use serde_json::json;

/// 20 cycles: start the agent, write through IPC, SIGKILL at a random moment, restart; every
/// acknowledged change must be there and the store must open cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_no_acknowledged_change() {
    let mut rng = Rng::seeded("sigkill");
    let dir = tempfile::tempdir().unwrap();
    let mut acked_total: Vec<String> = Vec::new();
    for cycle in 0..20 {
        let agent = AgentProcess::start(dir.path(), &[]);
        let client = Arc::new(agent.client().await);
        // The store opened cleanly and holds everything acknowledged before (the document
        // exists once a first write was acknowledged).
        let doc = match client.doc_get("ledger").await {
            Err(devicelink::client::ClientError::Agent {
                code: devicelink::ipc::ErrorCode::NotFound,
                ..
            }) if acked_total.is_empty() => serde_json::json!({}),
            other => other.expect("store opens after SIGKILL"),
        };
        for key in &acked_total {
            assert!(
                doc["m"].get(key).is_some(),
                "cycle {cycle}: acknowledged {key} lost"
            );
        }
        let acked = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let (client, acked) = (client.clone(), acked.clone());
            tokio::spawn(async move {
                let mut in_flight = tokio::task::JoinSet::new();
                for i in 0.. {
                    let (client, key) = (client.clone(), format!("c{cycle}-{i}"));
                    in_flight.spawn(async move {
                        client
                            .doc_set("ledger", "m", &key, json!(i))
                            .await
                            .map(|_| key)
                    });
                    if in_flight.len() >= 64 {
                        match in_flight.join_next().await {
                            Some(Ok(Ok(key))) => acked.lock().unwrap().push(key),
                            _ => return,
                        }
                    }
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(5 + rng.below(80))).await;
        agent.kill9();
        writer.abort();
        let _ = writer.await;
        acked_total.extend(acked.lock().unwrap().drain(..));
    }
    let agent = AgentProcess::start(dir.path(), &[]);
    let doc = agent.client().await.doc_get("ledger").await.unwrap();
    for key in &acked_total {
        assert!(doc["m"].get(key).is_some(), "acknowledged {key} lost");
    }
    println!(
        "{} acknowledged changes survived 20 SIGKILLs",
        acked_total.len()
    );
    assert!(!acked_total.is_empty(), "the test wrote nothing");
}

/// Updates received from a peer are flushed lazily (nobody waits on them), but flushed: once the
/// lazy window has passed, a SIGKILLed receiver restarted with no peer to resync from has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_updates_reach_the_disk_without_further_writes() {
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let id = |dir: &std::path::Path| {
        let out = process::cli(dir, &dir.join("agent.sock"), &["id"]);
        process::stdout(&out).trim().to_string()
    };
    let (id_a, id_b) = (id(da.path()), id(db.path()));
    for (dir, other) in [(da.path(), &id_b), (db.path(), &id_a)] {
        let out = process::cli(dir, &dir.join("agent.sock"), &["trust", "add", other]);
        assert!(out.status.success(), "{}", process::stderr(&out));
    }
    let b = AgentProcess::start(db.path(), &[]);
    let a = AgentProcess::start(da.path(), &[&b.addr]);
    let (ca, cb) = (a.client().await, b.client().await);
    let keys = 500;
    let names: Vec<String> = (0..keys).map(|i| format!("k{i}")).collect();
    let writes = names
        .iter()
        .enumerate()
        .map(|(i, key)| ca.doc_set("inbox", "m", key, json!(i)));
    for written in futures::future::join_all(writes).await {
        written.unwrap();
    }
    wait_until_async(LIMIT, "b to receive every change", || async {
        cb.doc_get("inbox")
            .await
            .ok()
            .and_then(|d| d["m"].as_object().map(|m| m.len()))
            == Some(keys)
    })
    .await;
    // Past the lazy flush window (50 ms), with no other write to trigger a flush.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop((ca, cb));
    a.kill9();
    b.kill9();
    let b = AgentProcess::start(db.path(), &[]);
    let doc = b.client().await.doc_get("inbox").await.unwrap();
    assert_eq!(doc["m"].as_object().map(|m| m.len()), Some(keys), "{doc}");
}

struct Node {
    dir: tempfile::TempDir,
    agent: Option<AgentHandle>,
}

/// Random edits, partitions (trust withdrawn and restored), restarts; at the end every agent
/// holds the same documents (same state vector, delete set and content: see
/// `devicelink::convergence`) and every inserted token survives. The seed picks the operations;
/// their timing against the agents' own tasks does not replay, so a seed reproduces the
/// scenario, not always the exact interleaving.
async fn partition_case(rng: &mut Rng) {
    let n = 3 + rng.below(3) as usize;
    let mut nodes = Vec::new();
    for i in 0..n {
        let dir = tempfile::tempdir().unwrap();
        let agent = start(dir.path(), &format!("n{i}")).await;
        nodes.push(Node {
            dir,
            agent: Some(agent),
        });
    }
    let ids: Vec<_> = nodes
        .iter()
        .map(|n| n.agent.as_ref().unwrap().device_id())
        .collect();
    let connect_all = |nodes: &Vec<Node>| {
        for a in nodes.iter().filter_map(|n| n.agent.as_ref()) {
            for b in nodes.iter().filter_map(|n| n.agent.as_ref()) {
                if a.device_id() < b.device_id() {
                    a.trust_add(b.device_id(), "x").unwrap();
                    b.trust_add(a.device_id(), "x").unwrap();
                    a.dial(b.listen_addrs()[0].clone()).unwrap();
                }
            }
        }
    };
    connect_all(&nodes);
    let mut tokens: BTreeSet<String> = BTreeSet::new();
    for step in 0..60 {
        let i = rng.below(n as u64) as usize;
        match rng.below(10) {
            0..=5 => {
                let Some(agent) = nodes[i].agent.as_ref() else {
                    continue;
                };
                let doc = agent.open_doc(&format!("doc{}", rng.below(2))).unwrap();
                let token = format!("<{i}.{step}>");
                if rng.below(2) == 0 {
                    // At either end, so no insert can land inside an earlier token.
                    let at = if rng.below(2) == 0 { Some(0) } else { None };
                    doc.edit_text("t", at, 0, &token).await.unwrap();
                    tokens.insert(token);
                } else {
                    doc.set_map_value("m", &format!("k{}", rng.below(4)), token.as_str())
                        .await
                        .unwrap();
                }
            }
            6 => {
                // Partition i from j.
                let j = rng.below(n as u64) as usize;
                if let (Some(a), Some(b)) = (nodes[i].agent.as_ref(), nodes[j].agent.as_ref()) {
                    if i != j {
                        a.trust_remove(&ids[j]).unwrap();
                        b.trust_remove(&ids[i]).unwrap();
                    }
                }
            }
            7 => connect_all(&nodes),
            8 => {
                if let Some(agent) = nodes[i].agent.take() {
                    agent.shutdown().await.unwrap();
                }
            }
            _ => {
                if nodes[i].agent.is_none() {
                    nodes[i].agent = Some(start(nodes[i].dir.path(), &format!("n{i}")).await);
                    connect_all(&nodes);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.below(20))).await;
    }
    // Heal: everyone up, everyone connected.
    for (i, node) in nodes.iter_mut().enumerate() {
        if node.agent.is_none() {
            node.agent = Some(start(node.dir.path(), &format!("n{i}")).await);
        }
    }
    connect_all(&nodes);
    let agents: Vec<AgentHandle> = nodes.iter().map(|n| n.agent.clone().unwrap()).collect();
    for doc in ["doc0", "doc1"] {
        let handles: Vec<_> = agents.iter().map(|a| a.open_doc(doc).unwrap()).collect();
        wait_until(Duration::from_secs(30), "all agents to converge", || {
            handles.windows(2).all(|w| same_state(&w[0], &w[1]))
        })
        .await;
        for h in &handles[1..] {
            assert_identical(&handles[0], h);
        }
    }
    let text: String = ["doc0", "doc1"]
        .iter()
        .map(|d| agents[0].open_doc(d).unwrap().text("t"))
        .collect();
    for token in &tokens {
        assert!(text.contains(token.as_str()), "lost the insert {token}");
    }
    for agent in agents {
        agent.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_partitions_and_restarts_converge_without_loss() {
    let mut rng = Rng::seeded("partitions");
    for case in 0..3 {
        println!("case {case}");
        partition_case(&mut rng).await;
    }
}
