// A puppet for the Rust integration tests: real Yjs clients (y-websocket 2.x and 3.x
// providers) driven by JSON commands, one per line on stdin; one JSON line per reply or
// event on stdout. See README.md for the commands. Never exits on a failed command; exits
// when stdin closes, after closing every provider.
import { createInterface } from 'node:readline'
import { isDeepStrictEqual } from 'node:util'
import WebSocket from 'ws'
import * as Y from 'yjs'
import { WebsocketProvider as WebsocketProvider2 } from 'y-websocket'
import { WebsocketProvider as WebsocketProvider3 } from 'y-websocket-3'

// stdout is the protocol: anything a library logs goes to stderr.
console.log = console.info = console.debug = (...args) => console.error(...args)

// every y-websocket provider adds a process 'exit' listener
process.setMaxListeners(0)
const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
const clients = new Map() // name -> Client
const CONNECT_TIMEOUT_MS = 10000
const COLOR = '#30bced'

const plain = (v) => (v instanceof Y.AbstractType ? v.toJSON() : v === undefined ? null : v)

// Settles when cond() is true (checked now and each time one of the `on` events fires),
// or rejects with describe() at timeout.
const waitFor = (cond, on, timeoutMs, describe) => new Promise((resolve, reject) => {
  let timer = null
  const offs = []
  const finish = (fn, arg) => {
    clearTimeout(timer)
    offs.forEach((off) => off())
    fn(arg)
  }
  const check = () => {
    let ok = false
    try { ok = cond() } catch (e) { return finish(reject, e) }
    if (ok) finish(resolve)
  }
  for (const [emitter, name] of on) {
    emitter.on(name, check)
    offs.push(() => emitter.off(name, check))
  }
  timer = setTimeout(() => finish(reject, Object.assign(new Error('timeout'), { details: describe() })), timeoutMs)
  check()
})

class Client {
  constructor (name, cmd) {
    this.name = name
    this.version = Number(cmd.version ?? 2)
    if (this.version !== 2 && this.version !== 3) throw new Error(`version must be 2 or 3, not ${cmd.version}`)
    this.doc = new Y.Doc()
    this.closing = false
    this.lastRefusal = null // HTTP status of the last refused upgrade, cleared on open
    this.listeners = new Set() // callbacks for socket-level happenings during `connect`
    const client = this
    const origin = cmd.origin
    // The provider constructs its socket as `new WS(url, protocols)`: a subclass adds the
    // Origin header and reports what the plain provider API hides (the refused upgrade's
    // HTTP status and the close code).
    class DriverWebSocket extends WebSocket {
      constructor (url, protocols) {
        super(url, protocols, origin ? { origin } : {})
        this.opened = false
        this.on('open', () => { this.opened = true; client.lastRefusal = null })
        this.on('error', (err) => {
          const m = /Unexpected server response: (\d+)/.exec(err?.message ?? '')
          const status = m ? Number(m[1]) : null
          client.notify({ kind: 'error', status, message: String(err?.message ?? err) })
          if (status !== null && client.connected && !client.closing && client.lastRefusal !== status) {
            // a reconnect (after the first sync) refused: tell once per distinct status
            out({ event: 'refused', client: client.name, status })
          }
          if (status !== null) client.lastRefusal = status
        })
        this.on('close', (code, reason) => {
          reason = reason?.toString() ?? ''
          client.notify({ kind: 'close', code, reason, opened: this.opened })
          if (this.opened && !client.closing) out({ event: 'closed', client: client.name, code, reason })
        })
      }
    }
    const Provider = this.version === 3 ? WebsocketProvider3 : WebsocketProvider2
    this.provider = new Provider(cmd.url, cmd.doc, this.doc, {
      connect: false,
      params: cmd.token == null ? {} : { token: String(cmd.token) },
      WebSocketPolyfill: DriverWebSocket,
      disableBc: true,
    })
    this.connected = false // has synced once
    if (cmd.user != null) {
      this.provider.awareness.setLocalState({ user: { name: String(cmd.user), color: COLOR } })
    }
  }

  notify (ev) { this.listeners.forEach((f) => f(ev)) }

  // Resolves once synced; rejects on a refused upgrade, a server close before sync, or timeout.
  connect (timeoutMs) {
    return new Promise((resolve, reject) => {
      let lastError = null
      const done = (err) => {
        clearTimeout(timer)
        this.listeners.delete(onSocket)
        this.provider.off('sync', onSync)
        if (err) reject(err); else { this.connected = true; resolve() }
      }
      const onSync = (s) => { if (s) done() }
      const onSocket = (ev) => {
        if (ev.kind === 'error') {
          lastError = ev.message
          if (ev.status !== null) {
            done(Object.assign(new Error(`refused: ${ev.message}`), { status: ev.status }))
          }
        } else if (ev.kind === 'close' && ev.opened && ev.code !== 1006) {
          done(Object.assign(new Error(`closed before sync: ${ev.code} ${ev.reason}`.trim()), { code: ev.code }))
        }
      }
      const timer = setTimeout(() => done(new Error(`timeout after ${timeoutMs} ms waiting for sync` +
        (lastError ? ` (last error: ${lastError})` : ''))), timeoutMs)
      this.listeners.add(onSocket)
      this.provider.on('sync', onSync)
      this.provider.connect()
    })
  }

  remoteStates () {
    const own = this.doc.clientID
    return [...this.provider.awareness.getStates()].filter(([id]) => id !== own)
  }

  destroy () {
    this.closing = true
    const ws = this.provider.ws
    this.provider.destroy()
    this.doc.destroy()
    // resolves when the socket (if any) has closed, so the close frame gets out
    return new Promise((resolve) => {
      if (!ws || ws.readyState === WebSocket.CLOSED) return resolve()
      const t = setTimeout(resolve, 1000)
      ws.once('close', () => { clearTimeout(t); resolve() })
    })
  }
}

const need = (cmd, field) => {
  if (cmd[field] === undefined) throw new Error(`missing "${field}"`)
  return cmd[field]
}
const client = (cmd) => {
  const c = clients.get(need(cmd, 'client'))
  if (!c) throw new Error(`no client "${cmd.client}"`)
  return c
}
const timeoutOf = (cmd, dflt = 10000) => Number(cmd.timeout_ms ?? dflt)

const handlers = {
  async connect (cmd) {
    const name = need(cmd, 'client')
    need(cmd, 'url'); need(cmd, 'doc')
    if (clients.has(name)) throw new Error(`client "${name}" exists`)
    const c = new Client(name, cmd)
    clients.set(name, c)
    try {
      await c.connect(timeoutOf(cmd, CONNECT_TIMEOUT_MS))
    } catch (e) {
      // stop the reconnect loop; the name may be reused
      clients.delete(name)
      await c.destroy()
      throw e
    }
    return {}
  },
  async set (cmd) {
    const c = client(cmd)
    c.doc.getMap(need(cmd, 'map')).set(need(cmd, 'key'), need(cmd, 'value'))
    return {}
  },
  async delete (cmd) {
    const c = client(cmd)
    c.doc.getMap(need(cmd, 'map')).delete(need(cmd, 'key'))
    return {}
  },
  async insert (cmd) {
    const c = client(cmd)
    c.doc.getText(need(cmd, 'text')).insert(Number(cmd.index ?? 0), String(need(cmd, 'value')))
    return {}
  },
  async get (cmd) {
    return { json: client(cmd).doc.toJSON() }
  },
  async wait (cmd) {
    const c = client(cmd)
    const map = c.doc.getMap(need(cmd, 'map'))
    const key = need(cmd, 'key')
    const want = need(cmd, 'value')
    const have = () => plain(map.get(key))
    await waitFor(() => isDeepStrictEqual(have(), want), [[c.doc, 'update']], timeoutOf(cmd),
      () => ({ have: have() }))
    return {}
  },
  async wait_text (cmd) {
    const c = client(cmd)
    const text = c.doc.getText(need(cmd, 'text'))
    const want = String(need(cmd, 'value'))
    await waitFor(() => text.toString() === want, [[c.doc, 'update']], timeoutOf(cmd),
      () => ({ have: text.toString() }))
    return {}
  },
  async presence (cmd) {
    const c = client(cmd)
    c.provider.awareness.setLocalState(need(cmd, 'state'))
    return {}
  },
  async wait_presence (cmd) {
    const c = client(cmd)
    const user = String(need(cmd, 'user'))
    const present = cmd.present ?? true
    const seen = () => c.remoteStates().some(([, s]) => s?.user?.name === user)
    await waitFor(() => seen() === present, [[c.provider.awareness, 'change']], timeoutOf(cmd),
      () => ({ states: c.remoteStates().map(([id, state]) => ({ id, state })) }))
    return {}
  },
  async status (cmd) {
    const c = client(cmd)
    return { connected: c.provider.wsconnected, synced: c.provider.synced }
  },
  async wait_connected (cmd) {
    const c = client(cmd)
    const p = c.provider
    await waitFor(() => p.wsconnected && p.synced, [[p, 'status'], [p, 'sync']], timeoutOf(cmd),
      () => ({ connected: p.wsconnected, synced: p.synced, refused: c.lastRefusal }))
    return {}
  },
  async close (cmd) {
    const c = client(cmd)
    clients.delete(c.name)
    await c.destroy()
    return {}
  },
}

const handle = async (line) => {
  if (!line.trim()) return
  let cmd
  try {
    cmd = JSON.parse(line)
  } catch (e) {
    return out({ re: null, ok: false, error: `bad JSON: ${e.message}` })
  }
  const re = cmd?.re ?? null
  try {
    const h = Object.hasOwn(handlers, cmd?.cmd) ? handlers[cmd.cmd] : null
    if (!h) throw new Error(`unknown cmd ${JSON.stringify(cmd?.cmd)}`)
    const extra = await h(cmd)
    out({ re, ok: true, ...extra })
  } catch (e) {
    const reply = { re, ok: false, error: e?.message ?? String(e) }
    if (e?.status !== undefined) reply.status = e.status
    if (e?.code !== undefined && typeof e.code === 'number') reply.code = e.code
    if (e?.details !== undefined) Object.assign(reply, e.details)
    out(reply)
  }
}

process.on('uncaughtException', (e) => {
  console.error('driver: uncaught', e)
  out({ event: 'error', error: String(e?.stack ?? e) })
})
process.on('unhandledRejection', (e) => {
  console.error('driver: unhandled rejection', e)
  out({ event: 'error', error: String(e?.stack ?? e) })
})

const rl = createInterface({ input: process.stdin, crlfDelay: Infinity })
rl.on('line', (line) => { handle(line) })
rl.on('close', async () => {
  await Promise.all([...clients.values()].map((c) => c.destroy()))
  clients.clear()
  process.exit(0)
})
