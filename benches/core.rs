//! Micro-benchmarks of the hot paths: frame codec, a local change (transaction + encoded update),
//! merging queued updates for the wire, the group-commit writer's durable append, and sealing
//! and opening blind-store envelopes (encryption throughput per core).
//! End-to-end figures come from `devicelink bench`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use devicelink::sync::Message;
use yrs::{ReadTxn, Text, Transact};

fn frame_codec(c: &mut Criterion) {
    let msg = Message::Update {
        doc: "notes".into(),
        update: vec![7; 64],
    };
    let body = msg.encode().unwrap();
    c.bench_function("frame/encode_update_64b", |b| {
        b.iter(|| msg.encode().unwrap())
    });
    c.bench_function("frame/decode_update_64b", |b| {
        b.iter(|| Message::decode(&body).unwrap())
    });
}

fn local_change(c: &mut Criterion) {
    let doc = yrs::Doc::new();
    let text = doc.get_or_insert_text("t");
    c.bench_function("yrs/insert_char_and_encode_update", |b| {
        b.iter(|| {
            let mut txn = doc.transact_mut();
            let len = text.len(&txn);
            text.insert(&mut txn, len, "x");
            txn.encode_update_v1()
        })
    });
}

fn merge_for_wire(c: &mut Criterion) {
    let doc = yrs::Doc::new();
    let text = doc.get_or_insert_text("t");
    let updates: Vec<Vec<u8>> = (0..1024)
        .map(|_| {
            let mut txn = doc.transact_mut();
            let len = text.len(&txn);
            text.insert(&mut txn, len, "x");
            txn.encode_update_v1()
        })
        .collect();
    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Elements(updates.len() as u64));
    group.bench_function("merge_1024_single_char_updates", |b| {
        b.iter(|| yrs::merge_updates_v1(updates.iter().map(|u| u.as_slice())).unwrap())
    });
    group.finish();

    // The alternative to merging: diff the live doc against what the peer holds. Its cost grows
    // with the length of the text (yrs scans a squashed string block to slice it).
    let doc = yrs::Doc::new();
    let text = doc.get_or_insert_text("t");
    for _ in 0..200_000 - 1024 {
        let mut txn = doc.transact_mut();
        let len = text.len(&txn);
        text.insert(&mut txn, len, "x");
    }
    let known = doc.transact().state_vector();
    for _ in 0..1024 {
        let mut txn = doc.transact_mut();
        let len = text.len(&txn);
        text.insert(&mut txn, len, "x");
    }
    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Elements(1024));
    group.bench_function("diff_last_1024_changes_of_200k_char_text", |b| {
        b.iter(|| doc.transact().encode_diff_v1(&known))
    });
    group.finish();
}

fn durable_append(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agent = runtime
        .block_on(devicelink::Agent::start(devicelink::AgentConfig::new(
            dir.path(),
        )))
        .unwrap();
    let doc = agent.open_doc("bench").unwrap();
    let mut group = c.benchmark_group("durable");
    group.sample_size(20);
    group.throughput(Throughput::Elements(1000));
    group.bench_function("1000_pipelined_changes_then_one_wait", |b| {
        b.iter_batched(
            || (),
            |()| {
                let waits: Vec<_> = (0..1000)
                    .map(|_| doc.append_text_deferred("t", "x").unwrap())
                    .collect();
                runtime.block_on(async {
                    for w in waits {
                        w.wait().await.unwrap();
                    }
                })
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
    runtime.block_on(agent.shutdown()).unwrap();
}

/// What a member pays per update it sends through a blind device (seal: encrypt + sign) and per
/// update it receives (open: verify + decrypt), one core, for a keystroke-sized update and a
/// 1 MiB one.
fn blind_envelopes(c: &mut Criterion) {
    use devicelink::blind::envelope::{doc_id, random_key, Content, Envelope, Epoch, Kind};
    let author = libp2p::identity::Keypair::generate_ed25519();
    let (key, name_key) = (random_key(), random_key());
    let doc = doc_id(&name_key, "notes");
    let epoch = Epoch::of(1, &key);
    let mut group = c.benchmark_group("blind");
    for size in [64usize, 1 << 20] {
        let content = Content {
            name: "notes".into(),
            update: vec![7; size],
        };
        let seal = || {
            Envelope::seal(&author, Kind::Update, doc, 1, epoch, &key, vec![], &content).unwrap()
        };
        let sealed = seal();
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("seal_{size}b"), |b| b.iter(seal));
        group.bench_function(format!("open_{size}b"), |b| {
            b.iter(|| sealed.open(&key, &name_key).unwrap())
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    frame_codec,
    local_change,
    merge_for_wire,
    durable_append,
    blind_envelopes
);
criterion_main!(benches);
