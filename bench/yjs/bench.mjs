// The standard Yjs stack under the same workloads as `devicelink bench`: two Yjs clients
// through a y-websocket 2.1 server on 127.0.0.1, BroadcastChannel disabled so every update
// really goes through the server. Prints one JSON line. Nothing is persisted (as y-websocket).
import { spawn } from 'node:child_process'
import { readFileSync } from 'node:fs'
import WebSocket from 'ws'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'

const SAMPLES = Number(process.env.SAMPLES ?? 2000)
const SECONDS = Number(process.env.SECONDS ?? 3)
const OFFLINE = Number(process.env.OFFLINE ?? 100000)
const PORT = 20000 + Math.floor(Math.random() * 20000)
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const now = () => Number(process.hrtime.bigint()) / 1e3 // microseconds

const serverPath = new URL('./node_modules/y-websocket/bin/server.cjs', import.meta.url).pathname
const server = spawn(process.execPath, [serverPath], {
  env: { ...process.env, HOST: '127.0.0.1', PORT: String(PORT) },
  stdio: ['ignore', 'pipe', 'inherit'],
})
const stop = () => server.kill()
process.on('exit', stop)
await new Promise((resolve) => server.stdout.once('data', resolve))

const client = (room) => {
  const doc = new Y.Doc()
  const provider = new WebsocketProvider(`ws://127.0.0.1:${PORT}`, room, doc, {
    WebSocketPolyfill: WebSocket,
    disableBc: true,
  })
  return { doc, provider }
}
const synced = (c) => new Promise((resolve) => {
  if (c.provider.synced) return resolve()
  c.provider.once('sync', (s) => s && resolve())
})
const until = async (cond, what) => {
  const start = Date.now()
  while (!cond()) {
    if (Date.now() - start > 120000) throw new Error(`timeout: ${what}`)
    await new Promise((r) => setImmediate(r))
  }
}
const rssMb = (pid) => {
  const line = readFileSync(`/proc/${pid}/status`, 'utf8').split('\n').find((l) => l.startsWith('VmRSS:'))
  return Math.round(Number(line.split(/\s+/)[1]) / 102.4) / 10
}

// Latency: a map set on A, seen on B.
const a = client('latency'); const b = client('latency')
await Promise.all([synced(a), synced(b)])
const samples = []
for (let i = 0; i < SAMPLES; i++) {
  const seen = new Promise((resolve) => b.doc.once('update', resolve))
  const t0 = now()
  a.doc.getMap('m').set('k', i)
  await seen
  samples.push(now() - t0)
}
samples.sort((x, y) => x - y)
const pct = (p) => samples[Math.round((samples.length - 1) * p)]

// Throughput: single-character updates for SECONDS, until B has them all.
const ta = client('throughput'); const tb = client('throughput')
await Promise.all([synced(ta), synced(tb)])
const text = ta.doc.getText('t')
let sent = 0
const t0 = Date.now()
while (Date.now() - t0 < SECONDS * 1000) {
  for (let i = 0; i < 100; i++) { text.insert(text.length, 'x'); sent++ }
  await new Promise((r) => setImmediate(r))
}
await until(() => tb.doc.getText('t').length === sent, 'throughput replication')
const tputSecs = (Date.now() - t0) / 1000
const serverRssLoad = rssMb(server.pid)

// Offline catch-up: B disconnects, A makes OFFLINE changes, B reconnects.
const oa = client('offline'); const ob = client('offline')
await Promise.all([synced(oa), synced(ob)])
ob.provider.disconnect()
const otext = oa.doc.getText('t')
for (let i = 0; i < OFFLINE; i++) otext.insert(otext.length, 'x')
let opened = 0
ob.provider.on('status', (e) => { if (e.status === 'connected' && !opened) opened = now() })
ob.provider.connect()
await until(() => ob.doc.getText('t').length === OFFLINE, 'catch-up')
const caughtUp = now()

console.log(JSON.stringify({
  latency_p50_us: Math.round(pct(0.5)),
  latency_p99_us: Math.round(pct(0.99)),
  latency_samples: samples.length,
  updates_per_sec: Math.round(sent / tputSecs),
  offline_changes: OFFLINE,
  catchup_after_connect_ms: Math.round((caughtUp - opened) / 10) / 100,
  server_rss_mb: serverRssLoad,
  persists: false,
}))
for (const c of [a, b, ta, tb, oa, ob]) c.provider.destroy()
stop()
process.exit(0)
