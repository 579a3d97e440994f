// One automerge-repo process of the many-documents benchmark, driven by bench.mjs over IPC
// (`fork`). Never started by hand: `node peer.mjs a` is repo A (creates the documents, then serves
// them through a WebSocketServer on 127.0.0.1), `node peer.mjs b` is repo B (a websocket client).
// Both keep their documents in NodeFSStorageAdapter directories that bench.mjs owns.
//
// Protocol: bench.mjs sends `{ type, ...args }` messages, this process answers each with one
// message (`{ type: '<answer>', ... }`) or `{ type: 'error', error }`. Nothing is written to stdout
// (bench.mjs redirects it to stderr anyway), so its single JSON line stays clean.
import { randomFillSync } from 'node:crypto'
import { WebSocketServer } from 'ws'
import { Repo } from '@automerge/automerge-repo'
import { NodeWSServerAdapter, BrowserWebSocketClientAdapter } from '@automerge/automerge-repo-network-websocket'
import { NodeFSStorageAdapter } from '@automerge/automerge-repo-storage-nodefs'

const ROLE = process.argv[2]
// find() calls B keeps in flight at once. Not too many: a find() still unanswered after 60 s
// (automerge-repo's fixed DocHandle timeout) fails as "unavailable", and A answers them one by one.
const WINDOW = Number(process.env.WINDOW ?? 64)
const now = () => performance.now() // milliseconds, this process's clock
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const reply = (msg) => new Promise((resolve) => process.send(msg, resolve))
const yieldNow = () => new Promise((r) => setImmediate(r))
/** Tells bench.mjs how far a long step got, so a timeout can say so. */
const progress = (done, of, what) => process.send({ type: 'progress', text: `${done} of ${of} ${what}` })

// A failure anywhere (including an exception the websocket adapter throws from an event handler,
// e.g. ws's "Max payload size exceeded") goes back to bench.mjs as an error message.
const die = async (e) => {
  await reply({ type: 'error', error: String(e?.message ?? e) }).catch(() => {})
  process.exit(1)
}
process.on('uncaughtException', die)
process.on('unhandledRejection', die)
process.on('disconnect', () => process.exit(0)) // bench.mjs is gone: don't linger

/** NodeFSStorageAdapter plus a count of writes in flight, so that "flushed" and "safe to exit"
 * mean every file is completely written (repo.flush() does not wait for the throttled autosaves
 * that may already be running). */
class TrackedStorage {
  #inner
  #pending = 0
  #waiters = []
  constructor(dir) { this.#inner = new NodeFSStorageAdapter(dir) }
  load(key) { return this.#inner.load(key) }
  loadRange(prefix) { return this.#inner.loadRange(prefix) }
  save(key, data) { return this.#track(this.#inner.save(key, data)) }
  remove(key) { return this.#track(this.#inner.remove(key)) }
  removeRange(prefix) { return this.#track(this.#inner.removeRange(prefix)) }
  async #track(promise) {
    this.#pending++
    try { return await promise } finally {
      if (--this.#pending === 0) this.#waiters.splice(0).forEach((resolve) => resolve())
    }
  }
  idle() { return this.#pending === 0 ? Promise.resolve() : new Promise((r) => this.#waiters.push(r)) }
}

let repo // this process's one Repo
let storage // its TrackedStorage

/** Resolves with the time at which `pred(handle.doc())` first holds. */
const when = (handle, pred) => new Promise((resolve) => {
  const check = () => {
    if (!pred(handle.doc())) return false
    handle.off('change', check)
    resolve(now())
    return true
  }
  if (!check()) handle.on('change', check)
})

// ---------------------------------------------------------------------------------------------
// Repo A
// ---------------------------------------------------------------------------------------------
const A = {
  // N documents of one key each, no peer connected, until every file is on disk.
  async create({ dir, n }) {
    storage = new TrackedStorage(dir)
    repo = new Repo({ storage, network: [] })
    await repo.storageId() // the storage id file is part of the set-up, not of the timing
    const t0 = now()
    const urls = new Array(n)
    for (let i = 0; i < n; i++) {
      urls[i] = repo.create({ k: i }).url
      // Let I/O, the throttled autosaves and our progress report through now and then.
      if ((i + 1) % 100 === 0) { progress(i + 1, n, 'documents created'); await yieldNow() }
    }
    await repo.flush()
    await storage.idle()
    const seconds = (now() - t0) / 1000
    return { type: 'created', urls, seconds }
  },

  // A fresh process on the same storage, serving over a websocket on 127.0.0.1 (random port).
  // It shares nothing unasked (announce = false, as automerge-repo's sync server does): B gets
  // exactly the documents it find()s. Every TCP socket is kept to count its bytes.
  async serve({ dir }) {
    storage = new TrackedStorage(dir)
    const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 })
    await new Promise((resolve, reject) => { wss.once('listening', resolve); wss.once('error', reject) })
    A.sockets = []
    wss.on('connection', (ws, req) => {
      A.sockets.push(req.socket)
      ws.on('close', (code, reason) => {
        // 1000 normal, 1001 going away, 1005/1006 no status: a peer process stopping. Anything
        // else (1009 message too big, ...) is worth reporting.
        if (![1000, 1001, 1005, 1006].includes(code)) {
          process.send({ type: 'ws-close', code, reason: String(reason) })
        }
      })
    })
    repo = new Repo({
      storage,
      // Keep-alive: a client that has not answered a ping within 30 s is dropped, the window the
      // Yjs peer's y-websocket server uses too (the adapter's default, 5 s, drops B in the middle
      // of a 10 000-document first sync, while B's event loop is busy for seconds at a time).
      network: [new NodeWSServerAdapter(wss, 30_000)],
      sharePolicy: async () => false,
    })
    await repo.storageId()
    return { type: 'listening', port: wss.address().port }
  },

  async rss() {
    return { type: 'rss', mb: process.memoryUsage().rss / 2 ** 20 }
  },

  // Wire bytes (HTTP upgrade, websocket frames, both directions) of every connection so far.
  async bytes() {
    let total = 0
    for (const s of A.sockets) total += s.bytesRead + s.bytesWritten
    return { type: 'bytes', total }
  },

  async change({ url, value }) {
    const handle = await repo.find(url)
    handle.change((d) => { d.k = value })
    await repo.flush([handle.documentId])
    await storage.idle()
    return { type: 'changed' }
  },

  // One document holding `bytes` random (incompressible) bytes as an Automerge byte array.
  async createLarge({ bytes }) {
    const data = randomFillSync(new Uint8Array(bytes))
    const t0 = now()
    const handle = repo.create({ data })
    await repo.flush([handle.documentId])
    await storage.idle()
    return { type: 'large-created', url: handle.url, seconds: (now() - t0) / 1000 }
  },
}

// ---------------------------------------------------------------------------------------------
// Repo B
// ---------------------------------------------------------------------------------------------

/** Opens B's repo on `dir`, connected to A. `peer` resolves when A has answered the join
 * (the adapter's "peer-candidate"), with that time and A's storage id. */
function openClient(dir, port) {
  storage = new TrackedStorage(dir)
  const adapter = new BrowserWebSocketClientAdapter(`ws://127.0.0.1:${port}`)
  const peer = new Promise((resolve) => adapter.once('peer-candidate', ({ peerMetadata }) => {
    resolve({ t: now(), storageId: peerMetadata?.storageId })
  }))
  repo = new Repo({ storage, network: [adapter] })
  return peer
}

/** find() every url with at most WINDOW calls in flight; `found(i, handle)` runs as each resolves. */
async function findAll(urls, found) {
  const handles = new Array(urls.length)
  let next = 0
  const worker = async () => {
    while (next < urls.length) {
      const i = next++
      handles[i] = await repo.find(urls[i])
      found?.(i, handles[i])
    }
  }
  await Promise.all(Array.from({ length: Math.min(WINDOW, urls.length) }, worker))
  return handles
}

const sameHeads = (x, y) => !!x && !!y && x.length === y.length && [...x].sort().join() === [...y].sort().join()

/** Resolves with the time at which B knows A's heads of `handle` equal its own (B got A's
 * answer for that document and has nothing left to pull). */
const inSyncWith = (handle, storageId) => new Promise((resolve) => {
  const check = () => {
    if (!sameHeads(handle.getSyncInfo(storageId)?.lastHeads, handle.heads())) return false
    handle.off('remote-heads', check)
    handle.off('heads-changed', check)
    resolve(now())
    return true
  }
  if (!check()) { handle.on('remote-heads', check); handle.on('heads-changed', check) }
})

const B = {
  // Empty storage: get all N documents from A, each ready with its key.
  async firstSync({ dir, port, urls }) {
    await openClient(dir, port)
    const t0 = now()
    let ready = 0
    const done = []
    await findAll(urls, (i, handle) => done.push(when(handle, (d) => d?.k === i).then(() => {
      if (++ready % 100 === 0) progress(ready, urls.length, 'documents synced')
    })))
    await Promise.all(done)
    return { type: 'first-synced', seconds: (now() - t0) / 1000 }
  },

  // Restart on B's storage and open `urls` (all at once, as an app starting up would) while the
  // connection comes up. Times are from A's answer to the join:
  //   changedMs  until `changedUrl` shows k === value,
  //   allMs      until, in addition, every opened document is confirmed in sync with A.
  async reconnect({ dir, port, urls, changedUrl, value }) {
    const peer = openClient(dir, port)
    const synced = []
    let changed
    const handlesFound = findAll(urls, (i, handle) => {
      if (urls[i] === changedUrl) changed = when(handle, (d) => d?.k === value)
      synced.push(peer.then(({ storageId }) => inSyncWith(handle, storageId)))
    })
    const { t: tPeer, storageId } = await peer
    if (!storageId) throw new Error('A announced no storage id')
    await handlesFound
    const tChanged = await changed
    const tAll = Math.max(tChanged, ...(await Promise.all(synced)))
    return { type: 'reconnected', changedMs: Math.max(0, tChanged - tPeer), allMs: Math.max(0, tAll - tPeer) }
  },

  // Connected and idle, then fetch one large document; seconds until its bytes are all there.
  async findLarge({ dir, port, url, bytes }) {
    await openClient(dir, port)
    const t0 = now()
    const handle = await repo.find(url)
    await when(handle, (d) => d?.data?.length === bytes)
    return { type: 'large-synced', seconds: (now() - t0) / 1000 }
  },
}

// Both roles: shut the repo down cleanly (flush, wait for every write, incl. throttled saves of
// sync states) so the next process on this storage finds whole files.
async function stop() {
  if (repo) {
    await repo.shutdown()
    await sleep(250) // > saveDebounceRate (100 ms): lets pending throttled saves start
    await storage.idle()
  }
  await reply({ type: 'stopped' })
  process.exit(0)
}

const handlers = {
  a: { create: A.create, serve: A.serve, rss: A.rss, bytes: A.bytes, change: A.change, 'create-large': A.createLarge, stop },
  b: { 'first-sync': B.firstSync, reconnect: B.reconnect, 'find-large': B.findLarge, stop },
}[ROLE]
if (!handlers || !process.send) {
  console.error('peer.mjs is started by bench.mjs (node bench.mjs), not by hand')
  process.exit(2)
}
process.on('message', async (msg) => {
  try {
    const handler = handlers[msg.type]
    if (!handler) throw new Error(`${ROLE}: unknown command ${msg.type}`)
    const answer = await handler(msg)
    if (answer) await reply(answer)
  } catch (e) {
    await die(e)
  }
})
