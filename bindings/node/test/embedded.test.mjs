// The agent embedded in Node, linked by code with a daemon agent process: sync both ways through
// a subscription, updates made by yjs, restart from the data dir, pause/resume, handoff.
// Run by `cargo test --release` (tests/bindings.rs), which sets DEVICELINK_BIN and YJS_FROM.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

const require = createRequire(import.meta.url);
const { Agent } = require('../index.js');
const Y = createRequire(process.env.YJS_FROM || import.meta.url)('yjs');
const BIN = process.env.DEVICELINK_BIN || path.resolve('../../target/release/devicelink');

async function waitFor(what, check, timeoutMs = 15000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`${what} did not happen within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

// `devicelink agent` on 127.0.0.1, driven through the CLI.
async function startDaemon(dir) {
  const common = ['--data-dir', dir, '--socket', path.join(dir, 'agent.sock')];
  const proc = spawn(BIN, [...common, 'agent', '--listen', '/ip4/127.0.0.1/tcp/0', '--no-mdns',
    '--no-ws', '--name', 'daemon'], { stdio: ['ignore', 'pipe', 'ignore'] });
  const daemon = { proc, cli: (...args) => execFileSync(BIN, [...common, ...args], { encoding: 'utf8' }) };
  const lines = readline.createInterface({ input: proc.stdout });
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('the daemon did not start in 30 s')), 30000);
    lines.on('line', (line) => {
      if (line.startsWith('device id: ')) daemon.deviceId = line.slice(11).trim();
      if (line.startsWith('ipc socket: ')) { clearTimeout(timer); resolve(); }
    });
    proc.on('exit', () => reject(new Error('the daemon exited at start-up')));
  });
  daemon.docJson = (name) => { try { return JSON.parse(daemon.cli('doc', 'get', name)); } catch { return null; } };
  return daemon;
}

function stopDaemon(daemon) {
  return new Promise((resolve) => {
    if (daemon.proc.exitCode !== null) return resolve();
    daemon.proc.on('exit', resolve);
    daemon.proc.kill('SIGTERM');
  });
}

const config = (dataDir) => ({ dataDir, listen: ['/ip4/127.0.0.1/tcp/0'], mdns: false, name: 'node' });

async function pair(agent, daemon) {
  const host = await agent.pairOpen(60);
  const joined = daemon.cli('pair', host.code(), '--peer', agent.listenAddrs()[0]);
  const paired = await host.wait();
  assert.equal(paired.deviceId, daemon.deviceId);
  assert.ok(joined.includes(`verification: ${paired.verification}`));
}

test('embedded in Node: sync both ways, yjs updates, pause, restart, handoff', async (t) => {
  const dir = mkdtempSync(path.join(tmpdir(), 'devicelink-node-'));
  const daemon = await startDaemon(path.join(dir, 'daemon'));
  t.after(async () => { await stopDaemon(daemon); rmSync(dir, { recursive: true, force: true }); });

  let agent = await Agent.start(config(path.join(dir, 'embedded')));
  const me = agent.deviceId();
  await pair(agent, daemon);

  let notes = agent.doc('notes');
  const mirror = new Y.Doc(); // built only from the callbacks
  const origins = [];
  const sub = notes.subscribe((update, origin) => { Y.applyUpdate(mirror, update); origins.push(origin); });

  daemon.cli('doc', 'set', 'notes', 'items', 'milk', 'false');
  await waitFor('the daemon change at the callback', () => origins.includes(daemon.deviceId));
  assert.deepEqual(mirror.getMap('items').toJSON(), { milk: false });

  await notes.set('items', 'eggs', true);
  await waitFor('the embedded change on the daemon', () => daemon.docJson('notes')?.items?.eggs === true);
  assert.ok(origins.includes('local'));

  // An update made by yjs, applied through the agent; the agent's state read back with yjs.
  const ydoc = new Y.Doc();
  Y.applyUpdate(ydoc, notes.diff(new Uint8Array()));
  const before = Y.encodeStateVector(ydoc);
  ydoc.getMap('items').set('bread', 2);
  await notes.applyUpdate(Y.encodeStateAsUpdate(ydoc, before));
  await waitFor('the yjs update on the daemon', () => daemon.docJson('notes')?.items?.bread === 2);
  await notes.textAppend('body', 'hello from node');
  const back = new Y.Doc();
  Y.applyUpdate(back, notes.diff(new Uint8Array()));
  assert.deepEqual(back.getMap('items').toJSON(), { milk: false, eggs: true, bread: 2 });
  assert.equal(back.getText('body').toString(), 'hello from node');
  await assert.rejects(notes.set('body', 'x', 1), /^Error: WrongType: /);

  await agent.pause();
  assert.throws(() => notes.getJson(), /^Error: Paused: /);
  daemon.cli('doc', 'set', 'notes', 'items', 'whilePaused', '1');
  await agent.resume();
  await waitFor('the change made while paused', () => mirror.getMap('items').get('whilePaused') === 1, 30000);

  sub.cancel();
  await agent.shutdown();
  agent = await Agent.start(config(path.join(dir, 'embedded')));
  assert.equal(agent.deviceId(), me);
  notes = agent.doc('notes');
  assert.equal(notes.getJson().items.bread, 2);
  assert.deepEqual(agent.devices().map((d) => d.deviceId), [daemon.deviceId]);

  // Handoff: published on the daemon, continued here with its document caught up.
  daemon.cli('doc', 'text', 'draft', 'body', '--append', 'started on the daemon');
  const published = JSON.parse(daemon.cli('activity', 'publish', '--type', 'com.example.notes.edit',
    '--title', 'Draft', '--doc', 'draft', '--state', '{"cursor":7}'));
  const id = published.id ?? published.activity.id;
  await waitFor('the activity here', () => agent.activities().some((a) => a.id === id));
  const done = await agent.handoff(id, 20);
  assert.equal(done.activity.holder, me);
  assert.deepEqual(done.activity.appState, { cursor: 7 });
  assert.deepEqual(done.docs.draft, { body: 'started on the daemon' });
  await agent.shutdown();
});
