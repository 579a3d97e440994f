// Latency through y-websocket endpoints: two Yjs clients (y-websocket 2.1 providers, no
// BroadcastChannel), one on endpoint A and one on endpoint B, e.g. two devicelink agents.
// Prints one JSON line at the end:
//   {"latency_us":{"p50":..,"p99":..,"samples":..},"presence_us":{"p50":..,"p99":..,"samples":..},...}
//
// env: WS_A, WS_B   endpoints (ws://host:port); WS_B defaults to WS_A
//      TOKEN_A, TOKEN_B  tokens sent as ?token= (empty: none); TOKEN_B defaults to TOKEN_A
//      DOC       document name (default bench/endpoint)
//      ROUNDS    measured map-set round trips (default 2000, after 200 warm-up)
//      CLIENTS   extra idle providers to open on WS_A afterwards (default 0): it prints
//                {"clients_open":0} and waits for a line on stdin, opens them, prints
//                {"clients_open":N} once all are synced and waits for a line again (or EOF),
//                so the caller can measure the server's memory before and after; then closes them.
//      CLIENT_PRESENCE=1  give those extra clients an awareness state too (default: none)
// Without WS_A it starts the reference y-websocket server (node_modules/y-websocket) on a
// free 127.0.0.1 port and uses it for both: the baseline.
import { spawn } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { createInterface } from 'node:readline'
import WebSocket from 'ws'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'

// every y-websocket provider adds a process 'exit' listener
process.setMaxListeners(0)
const ROUNDS = Number(process.env.ROUNDS || 2000)
const WARMUP = 200
const PRESENCE_ROUNDS = 300
const PRESENCE_WARMUP = 30
const CLIENTS = Number(process.env.CLIENTS || 0)
const DOC = process.env.DOC || 'bench/endpoint'
const ROUND_TIMEOUT_MS = 10000
const now = () => Number(process.hrtime.bigint()) / 1e3 // microseconds
const log = (...a) => console.error('endpoint:', ...a)

const fail = (e) => {
  log(`error: ${e?.message ?? e}`)
  process.exit(1)
}
process.on('unhandledRejection', fail)
process.on('uncaughtException', fail)

// --- the endpoints: given, or the reference server ------------------------------------------
let server = null
const freePort = () => new Promise((resolve, reject) => {
  const s = createServer()
  s.on('error', reject)
  s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)) })
})
let WS_A = process.env.WS_A
if (!WS_A) {
  const port = await freePort()
  const serverPath = new URL('./node_modules/y-websocket/bin/server.cjs', import.meta.url).pathname
  server = spawn(process.execPath, [serverPath], {
    env: { ...process.env, HOST: '127.0.0.1', PORT: String(port) },
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  process.on('exit', () => server.kill())
  await new Promise((resolve, reject) => {
    server.once('exit', (code) => reject(new Error(`reference server exited: ${code}`)))
    server.stdout.once('data', resolve)
  })
  WS_A = `ws://127.0.0.1:${port}`
  log(`baseline: reference y-websocket server on ${WS_A} (pid ${server.pid})`)
}
const WS_B = process.env.WS_B || WS_A
const TOKEN_A = process.env.TOKEN_A ?? ''
const TOKEN_B = process.env.TOKEN_B || TOKEN_A

// A refused upgrade reaches the provider only as an error event; this socket remembers the
// HTTP status (ws reports it as "Unexpected server response: 401") so we can fail at once.
const refusals = new EventTarget()
class BenchWebSocket extends WebSocket {
  constructor (url, protocols) {
    super(url, protocols)
    this.on('error', (err) => {
      const m = /Unexpected server response: (\d+)/.exec(err?.message ?? '')
      if (m) refusals.dispatchEvent(Object.assign(new Event('refused'), { url, status: Number(m[1]) }))
    })
  }
}
const client = (url, token, { presence = true } = {}) => {
  const doc = new Y.Doc()
  const provider = new WebsocketProvider(url, DOC, doc, {
    WebSocketPolyfill: BenchWebSocket,
    disableBc: true,
    connect: false,
    params: token ? { token } : {},
  })
  if (!presence) provider.awareness.setLocalState(null)
  provider.connect()
  return { doc, provider }
}
const synced = (c, what, ms = 15000) => new Promise((resolve, reject) => {
  if (c.provider.synced) return resolve()
  const t = setTimeout(() => reject(new Error(`${what}: not synced after ${ms} ms`)), ms)
  const onRefused = (e) => {
    if (!e.url.startsWith(c.provider.url.split('?')[0])) return
    clearTimeout(t)
    reject(new Error(`${what}: refused with HTTP ${e.status} (check the url, token and doc)`))
  }
  refusals.addEventListener('refused', onRefused, { once: false })
  c.provider.on('sync', (s) => { if (s) { clearTimeout(t); refusals.removeEventListener('refused', onRefused); resolve() } })
})
// Resolves when cond() holds, checked each time `emitter` emits `event`.
const when = (emitter, event, cond, what) => new Promise((resolve, reject) => {
  if (cond()) return resolve()
  const check = () => { if (cond()) { clearTimeout(t); emitter.off(event, check); resolve() } }
  const t = setTimeout(() => { emitter.off(event, check); reject(new Error(`timeout: ${what}`)) }, ROUND_TIMEOUT_MS)
  emitter.on(event, check)
})
const stats = (samples) => {
  samples.sort((x, y) => x - y)
  const pct = (p) => Math.round(samples[Math.round((samples.length - 1) * p)])
  return { p50: pct(0.5), p99: pct(0.99), samples: samples.length }
}
const rssMb = (pid) => {
  const line = readFileSync(`/proc/${pid}/status`, 'utf8').split('\n').find((l) => l.startsWith('VmRSS:'))
  return Math.round(Number(line.split(/\s+/)[1]) / 102.4) / 10
}

const a = client(WS_A, TOKEN_A)
const b = client(WS_B, TOKEN_B)
await Promise.all([synced(a, `client on ${WS_A}`), synced(b, `client on ${WS_B}`)])

// --- 1. app-to-app latency: a map key set on A, seen on B -----------------------------------
const run = Math.random().toString(36).slice(2, 8) // values never seen before, even on a kept doc
const am = a.doc.getMap('bench')
const bm = b.doc.getMap('bench')
const latency = []
for (let i = 0; i < WARMUP + ROUNDS; i++) {
  const value = `${run}:${i}`
  const seen = when(b.doc, 'update', () => bm.get('k') === value, `B seeing map round ${i}`)
  const t0 = now()
  am.set('k', value)
  await seen
  if (i >= WARMUP) latency.push(now() - t0)
}
log(`latency: ${ROUNDS} rounds done`)

// --- 2. presence latency: A's awareness counter, seen in B's awareness ----------------------
const aId = a.doc.clientID
const presence = []
for (let i = 0; i < PRESENCE_WARMUP + PRESENCE_ROUNDS; i++) {
  const seen = when(b.provider.awareness, 'change', () => b.provider.awareness.getStates().get(aId)?.n === i,
    `B seeing presence round ${i}`)
  const t0 = now()
  a.provider.awareness.setLocalState({ user: { name: 'bench-a', color: '#30bced' }, n: i })
  await seen
  if (i >= PRESENCE_WARMUP) presence.push(now() - t0)
}
log(`presence: ${PRESENCE_ROUNDS} rounds done`)

const result = {
  latency_us: stats(latency),
  presence_us: stats(presence),
  ws_a: WS_A,
  ws_b: WS_B,
  baseline: server !== null,
}

// --- 3. many idle clients on A, for the caller to measure memory ----------------------------
const waitLine = () => new Promise((resolve) => {
  const rl = createInterface({ input: process.stdin })
  rl.once('line', () => { rl.close(); resolve() })
  rl.once('close', resolve)
})
if (CLIENTS > 0) {
  // Before: the caller measures the server's memory with only the two clients above.
  const before = { clients_open: 0 }
  if (server) {
    before.server_pid = server.pid
    result.server_rss_before_mb = rssMb(server.pid)
  }
  console.log(JSON.stringify(before))
  await waitLine()
  const extra = []
  const t0 = Date.now()
  for (let i = 0; i < CLIENTS; i += 50) {
    const batch = []
    for (let j = i; j < Math.min(CLIENTS, i + 50); j++) {
      const c = client(WS_A, TOKEN_A, { presence: process.env.CLIENT_PRESENCE === '1' })
      extra.push(c)
      batch.push(synced(c, `extra client ${j}`, 60000))
    }
    await Promise.all(batch)
  }
  result.clients = CLIENTS
  result.clients_open_ms = Date.now() - t0
  const line = { clients_open: CLIENTS }
  if (server) {
    line.server_pid = server.pid
    result.server_rss_mb = rssMb(server.pid)
  }
  console.log(JSON.stringify(line))
  await waitLine()
  for (const c of extra) c.provider.destroy()
}

console.log(JSON.stringify(result))
a.provider.destroy()
b.provider.destroy()
// let the close frames out before exiting
await new Promise((r) => setTimeout(r, 100))
if (server) {
  const exited = new Promise((resolve) => server.once('exit', resolve))
  server.kill()
  await exited
}
process.exit(0)
