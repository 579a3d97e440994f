// The automerge-repo comparison for `devicelink bench --automerge bench/automerge`: the
// many-documents workload on the standard automerge-repo 2.5 stack (automerge 3.5, the websocket
// network adapter, NodeFS storage). Prints ONE JSON line on stdout and always exits 0; a failure
// is an `error` field next to whatever was measured before it.
//
// Layout: this process only orchestrates. Every repo is its own Node process (peer.mjs, driven
// over IPC): repo A owns storage dir a/, serves through a WebSocketServer on 127.0.0.1 (random
// port) and shares nothing unasked (like automerge-repo's sync server), with a 30 s keep-alive;
// repo B owns storage dir b/ and connects with the websocket client adapter. Both dirs live in a
// fresh temp dir ($TMPDIR), deleted at the end (after the JSON line is out). Everything else is
// automerge-repo's defaults.
//
// Env: DOCS (default 10000) documents `{ k: i }`; LARGE_MB (default 0 = skip) size of the large
// document, in MiB; TIMEOUT_S (default 120) bound on every wait; WINDOW (default 64) find()
// calls B keeps in flight; VERBOSE=1 logs the phases (and the libraries' logs) on stderr.
// On timeout, the error says how far the step got ("6300 of 10000 documents created").
//
// Figures (what is timed, and how):
//   create_docs_per_s           A, no peer: N × repo.create({ k: i }), then repo.flush() and
//                               until every file write has completed.
//   rss_idle_mb_after_restart   A restarted on its storage as the server, 1 s idle, nothing
//                               loaded (automerge-repo loads lazily): its process.memoryUsage().rss.
//   first_sync_s                B, empty storage, knows the N URLs: from its first find() until
//                               every document is ready with its key (WINDOW finds in flight).
//   rss_during_first_sync_mb    peak RSS of B meanwhile (/proc/PID/status, sampled every 50 ms);
//   rss_a_during_first_sync_mb  the same for A.
//   one_changed_after_reconnect_ms / _bytes
//                               B stopped (storage kept), A changes ONE document, B restarts on
//                               its storage and opens just that document (one_changed_finds = 1):
//                               ms from A's answer to B's join until the change shows in B; bytes
//                               on the wire (HTTP upgrade + websocket frames, both directions,
//                               counted on A's TCP sockets) for the whole reconnect, until the
//                               connection is quiet. automerge-repo syncs only documents that are
//                               open, so an app that opens one document pays for one.
//   reconnect_all_docs_ms / _bytes
//                               the same, with another document changed, but B re-opens all N
//                               documents (reconnect_all_docs_finds = N), as an app keeping every
//                               document open does: ms until the change shows AND every document
//                               is confirmed in sync with A (B holds A's heads for it).
//   reconnect_all_changed_visible_ms  in that run, ms until just the change shows.
//   large_doc_first_sync_s      (LARGE_MB > 0) A creates one document holding LARGE_MB MiB of random
//                               bytes (an Automerge byte array), B, connected, find()s it: seconds
//                               until B has all the bytes; an "error: ..." string if it fails
//                               (ws's default 100 MiB message limit applies on both ends).
import { fork } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

const DOCS = Number(process.env.DOCS ?? 10000)
const LARGE_MB = Number(process.env.LARGE_MB ?? 0)
const TIMEOUT_MS = Number(process.env.TIMEOUT_S ?? 120) * 1000
const QUIET_MS = 500 // a connection with no byte moved for this long is done
const PEER = fileURLToPath(new URL('./peer.mjs', import.meta.url))
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const log = (...args) => process.env.VERBOSE && console.error('[automerge bench]', ...args)
const round = (x, digits) => Math.round(x * 10 ** digits) / 10 ** digits

const result = { docs: DOCS }
const children = new Set()
let tmp

/** One peer.mjs process. `ask(msg, answerType)` sends a command and waits (bounded) for its
 * answer; an `error` message, the process exiting or the timeout rejects every wait. */
class Peer {
  constructor(role) {
    this.role = role
    this.waiters = []
    this.listeners = []
    // Its stdout (automerge-repo logs some errors with console.log) goes to our stderr with
    // VERBOSE=1 and nowhere otherwise: our stdout carries the JSON line only.
    this.proc = fork(PEER, [role], { stdio: ['ignore', process.env.VERBOSE ? 2 : 'ignore', 2, 'ipc'] })
    children.add(this.proc)
    this.proc.on('message', (msg) => this.#receive(msg))
    this.proc.on('exit', (code, signal) => {
      children.delete(this.proc)
      this.gone = new Error(`repo ${role.toUpperCase()} process exited (${signal ?? `code ${code}`})`)
      this.#failAll(this.gone)
    })
    this.proc.on('error', (e) => this.#failAll(e))
  }

  get pid() { return this.proc.pid }

  #receive(msg) {
    if (msg.type === 'progress') {
      this.progress = msg.text
      return
    }
    if (msg.type === 'error') {
      this.gone = new Error(this.#withProgress(msg.error))
      return this.#failAll(this.gone)
    }
    this.listeners.forEach((fn) => fn(msg))
    const i = this.waiters.findIndex((w) => w.type === msg.type)
    if (i >= 0) this.waiters.splice(i, 1)[0].resolve(msg)
  }

  #withProgress(text) {
    return this.progress ? `${text} (${this.progress})` : text
  }

  #failAll(error) {
    this.waiters.splice(0).forEach((w) => w.reject(error))
  }

  ask(msg, answerType, timeoutMs = TIMEOUT_MS) {
    if (this.gone) return Promise.reject(this.gone)
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== waiter)
        reject(new Error(this.#withProgress(`timeout after ${timeoutMs / 1000} s: repo ${this.role.toUpperCase()} ${msg.type}`)))
      }, timeoutMs)
      const waiter = {
        type: answerType,
        resolve: (m) => { clearTimeout(timer); resolve(m) },
        reject: (e) => { clearTimeout(timer); reject(e) },
      }
      this.waiters.push(waiter)
      this.progress = undefined
      this.proc.send(msg)
    })
  }

  /** Clean stop (the repo flushes), falling back to a kill; resolves once the process is gone. */
  async stop() {
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      const exited = new Promise((r) => this.proc.once('exit', r))
      await this.ask({ type: 'stop' }, 'stopped').catch(() => {})
      await Promise.race([exited, sleep(5000)])
      this.proc.kill('SIGKILL')
      await Promise.race([exited, sleep(1000)])
    }
  }
}

/** RSS in MiB of a process, from /proc (the same figure as its process.memoryUsage().rss). */
function rssMb(pid) {
  try {
    const line = readFileSync(`/proc/${pid}/status`, 'utf8').split('\n').find((l) => l.startsWith('VmRSS:'))
    return Number(line.split(/\s+/)[1]) / 1024
  } catch {
    return 0 // the process is gone
  }
}

/** Samples the RSS of some processes every 50 ms; `stop()` returns their peaks. */
function sampleRss(pids) {
  const peaks = pids.map(() => 0)
  const tick = () => pids.forEach((pid, i) => { peaks[i] = Math.max(peaks[i], rssMb(pid)) })
  tick()
  const timer = setInterval(tick, 50)
  return { stop: () => { clearInterval(timer); tick(); return peaks } }
}

/** A's byte count once the connection has been quiet for QUIET_MS (bounded by TIMEOUT_MS). */
async function quietBytes(a) {
  const start = Date.now()
  let last = (await a.ask({ type: 'bytes' }, 'bytes')).total
  let since = Date.now()
  while (Date.now() - since < QUIET_MS) {
    if (Date.now() - start > TIMEOUT_MS) throw new Error('timeout: the connection never went quiet')
    await sleep(100)
    const total = (await a.ask({ type: 'bytes' }, 'bytes')).total
    if (total !== last) { last = total; since = Date.now() }
  }
  return last
}

/** B restarts on its storage, opens `urls`; A changed `urls[changedIndex]` meanwhile. */
async function reconnect(a, port, dirB, urls, changedUrl, value) {
  await a.ask({ type: 'change', url: changedUrl, value }, 'changed')
  const before = (await a.ask({ type: 'bytes' }, 'bytes')).total
  const b = new Peer('b')
  try {
    const r = await b.ask({ type: 'reconnect', dir: dirB, port, urls, changedUrl, value }, 'reconnected')
    const bytes = (await quietBytes(a)) - before
    return { ...r, bytes }
  } finally {
    await b.stop()
  }
}

async function run() {
  tmp = mkdtempSync(join(tmpdir(), 'automerge-bench-'))
  const dirA = join(tmp, 'a')
  const dirB = join(tmp, 'b')

  // 1. A creates the N documents, no peer connected.
  log(`creating ${DOCS} documents`)
  let a = new Peer('a')
  const created = await a.ask({ type: 'create', dir: dirA, n: DOCS }, 'created')
  const urls = created.urls
  result.create_docs_per_s = round(DOCS / created.seconds, 1)
  await a.stop()

  // 2. A restarted on the same storage, as the server; idle 1 s, nothing loaded.
  a = new Peer('a')
  const { port } = await a.ask({ type: 'serve', dir: dirA }, 'listening')
  await sleep(1000)
  result.rss_idle_mb_after_restart = round((await a.ask({ type: 'rss' }, 'rss')).mb, 1)

  // 3. B, empty storage, gets all N documents.
  log('first sync')
  let b = new Peer('b')
  const rss = sampleRss([b.pid, a.pid])
  try {
    const r = await b.ask({ type: 'first-sync', dir: dirB, port, urls }, 'first-synced')
    result.first_sync_s = round(r.seconds, 3)
  } finally {
    const [peakB, peakA] = rss.stop()
    result.rss_during_first_sync_mb = round(peakB, 1)
    result.rss_a_during_first_sync_mb = round(peakA, 1)
  }
  await b.stop()

  // 4. One document changed while B was away; B comes back and opens just that one.
  log('reconnect, one document open')
  const one = urls[Math.floor(DOCS / 2)]
  const r1 = await reconnect(a, port, dirB, [one], one, 'changed')
  result.one_changed_after_reconnect_ms = round(r1.changedMs, 1)
  result.one_changed_reconnect_bytes = r1.bytes
  result.one_changed_finds = 1

  // 5. Another document changed; B comes back and opens all N.
  log('reconnect, all documents open')
  const r2 = await reconnect(a, port, dirB, urls, urls[DOCS - 1], 'changed')
  result.reconnect_all_docs_ms = round(r2.allMs, 1)
  result.reconnect_all_docs_bytes = r2.bytes
  result.reconnect_all_docs_finds = DOCS
  result.reconnect_all_changed_visible_ms = round(r2.changedMs, 1)

  // 6. One large document.
  if (LARGE_MB > 0) {
    log(`large document, ${LARGE_MB} MiB`)
    const bytes = Math.round(LARGE_MB * 2 ** 20)
    result.large_mb = LARGE_MB
    const large = await a.ask({ type: 'create-large', bytes }, 'large-created')
    result.large_doc_create_s = round(large.seconds, 3)
    b = new Peer('b')
    // A reports websocket closes with an unusual code (1009: message too big, ...).
    let closed
    const onClose = (msg) => { if (msg.type === 'ws-close') closed = `websocket closed ${msg.code} ${msg.reason}`.trim() }
    a.listeners.push(onClose)
    const peaks = sampleRss([b.pid, a.pid])
    try {
      const r = await b.ask({ type: 'find-large', dir: dirB, port, url: large.url, bytes }, 'large-synced')
      result.large_doc_first_sync_s = round(r.seconds, 3)
    } catch (e) {
      result.large_doc_first_sync_s = `error: ${e.message}${closed ? ` (${closed})` : ''}`
    } finally {
      const [peakB, peakA] = peaks.stop()
      result.rss_during_large_sync_mb = round(peakB, 1)
      result.rss_a_during_large_sync_mb = round(peakA, 1)
      a.listeners = a.listeners.filter((fn) => fn !== onClose)
    }
    await b.stop()
  }
  await a.stop()
}

/** Kills what is left and deletes the temp dir; safe to call more than once. */
function cleanUp() {
  for (const child of children) child.kill('SIGKILL')
  children.clear()
  if (tmp) { try { rmSync(tmp, { recursive: true, force: true }) } catch {} tmp = undefined }
}
process.on('exit', cleanUp)
for (const signal of ['SIGINT', 'SIGTERM']) process.on(signal, () => { cleanUp(); process.exit(130) })

const t0 = Date.now()
try {
  await run()
} catch (e) {
  result.error = String(e?.message ?? e)
}
result.wall_s = round((Date.now() - t0) / 1000, 1)
for (const child of children) child.kill('SIGKILL')
// The line first: deleting tens of thousands of small files can take a while on some disks.
process.stdout.write(JSON.stringify(result) + '\n', () => {
  cleanUp()
  process.exit(0)
})
