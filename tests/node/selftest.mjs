// End-to-end check of driver.mjs against the reference y-websocket server (and a tiny fake
// server that refuses upgrades with 401/403, since the reference server accepts everyone).
// Usage: node selftest.mjs   (prints "selftest: N passed, 0 failed" and exits 0 on success)
import { spawn } from 'node:child_process'
import { createServer } from 'node:http'
import { createInterface } from 'node:readline'
import { fileURLToPath } from 'node:url'
import { WebSocketServer } from 'ws'
import { startReferenceServer } from './refserver.mjs'

const driverPath = fileURLToPath(new URL('./driver.mjs', import.meta.url))
let passed = 0
let failed = 0
const check = (what, cond, seen) => {
  if (cond) { passed++; console.log(`ok   ${what}`) } else { failed++; console.log(`FAIL ${what}: ${JSON.stringify(seen)}`) }
}
const hardTimeout = setTimeout(() => { console.log('FAIL: selftest took over 150 s'); process.exit(1) }, 150000)

// --- the driver, as the Rust tests use it -----------------------------------------------
const driver = spawn(process.execPath, [driverPath], { stdio: ['pipe', 'pipe', 'inherit'] })
const pending = new Map()
const events = []
let nextRe = 1
createInterface({ input: driver.stdout }).on('line', (line) => {
  let msg
  try { msg = JSON.parse(line) } catch { check('driver prints JSON lines', false, line); return }
  if (msg.event) { events.push(msg); return }
  const p = pending.get(msg.re)
  if (p) { pending.delete(msg.re); p(msg) } else check('reply matches a request', false, msg)
})
const send = (cmd) => new Promise((resolve) => {
  const re = nextRe++
  pending.set(re, resolve)
  driver.stdin.write(JSON.stringify({ re, ...cmd }) + '\n')
})
const ok = async (what, cmd) => {
  const r = await send(cmd)
  check(what, r.ok === true, r)
  return r
}
const notOk = async (what, cmd, pred = () => true) => {
  const r = await send(cmd)
  check(what, r.ok === false && pred(r), r)
  return r
}

// --- a server refusing upgrades: 401 without token=good (or once `revoked`), 403 for origin
// http://evil; with token=good it accepts, answers as an empty document would (SyncStep2 of
// nothing) and keeps the socket until revoke() closes it with 4403.
const refuser = createServer((_req, res) => res.end('nope'))
const wss = new WebSocketServer({ noServer: true })
let revoked = false
refuser.on('upgrade', (req, socket, head) => {
  const u = new URL(req.url, 'http://x')
  const status = u.searchParams.get('token') !== 'good' || revoked ? 401 : req.headers.origin === 'http://evil' ? 403 : 101
  if (status === 101) {
    return wss.handleUpgrade(req, socket, head, (ws) => ws.send(new Uint8Array([0, 1, 2, 0, 0])))
  }
  socket.end(`HTTP/1.1 ${status} Refused\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`)
})
const revoke = () => { revoked = true; wss.clients.forEach((ws) => ws.close(4403, 'token revoked')) }
await new Promise((resolve) => refuser.listen(0, '127.0.0.1', resolve))
const refuserUrl = `ws://127.0.0.1:${refuser.address().port}`

const server = await startReferenceServer()
const url = server.url
console.log(`reference server on ${url}`)

try {
  // protocol robustness
  const bad = new Promise((resolve) => pending.set(null, resolve))
  driver.stdin.write('this is not json\n')
  const b = await bad
  check('bad JSON gets a failed reply', b.ok === false && /JSON/.test(b.error), b)
  await notOk('unknown command fails', { cmd: 'frobnicate' })
  await notOk('command on a missing client fails', { cmd: 'get', client: 'nobody' })
  await notOk('bad version fails', { cmd: 'connect', client: 'x', url, doc: 'd', version: 4 })

  for (const [va, vb] of [[2, 2], [3, 3], [2, 3], [3, 2]]) {
    const doc = `notes/${va}${vb}`
    const A = `a${va}${vb}`; const B = `b${va}${vb}`
    const tag = `v${va}->v${vb}`
    await ok(`${tag} connect A`, { cmd: 'connect', client: A, url, doc, token: 'T', version: va, user: 'alice', origin: 'http://127.0.0.1:8080' })
    await ok(`${tag} connect B`, { cmd: 'connect', client: B, url, doc, token: 'T', version: vb, user: 'bob' })
    await notOk(`${tag} duplicate client name fails`, { cmd: 'connect', client: A, url, doc, version: va })
    const st = await ok(`${tag} status`, { cmd: 'status', client: A })
    check(`${tag} status connected+synced`, st.connected === true && st.synced === true, st)

    await ok(`${tag} set`, { cmd: 'set', client: A, map: 'm', key: 'k', value: { n: 1, s: ['x', null] } })
    await ok(`${tag} wait sees set`, { cmd: 'wait', client: B, map: 'm', key: 'k', value: { n: 1, s: ['x', null] }, timeout_ms: 5000 })
    const w = await notOk(`${tag} wait for a wrong value times out`, { cmd: 'wait', client: B, map: 'm', key: 'k', value: 2, timeout_ms: 200 })
    check(`${tag} failed wait says what it has`, JSON.stringify(w.have) === JSON.stringify({ n: 1, s: ['x', null] }), w)
    await ok(`${tag} delete`, { cmd: 'delete', client: B, map: 'm', key: 'k' })
    await ok(`${tag} wait value null = absent`, { cmd: 'wait', client: A, map: 'm', key: 'k', value: null, timeout_ms: 5000 })

    await ok(`${tag} insert A`, { cmd: 'insert', client: A, text: 't', index: 0, value: 'hello' })
    await ok(`${tag} wait_text B hello`, { cmd: 'wait_text', client: B, text: 't', value: 'hello', timeout_ms: 5000 })
    await ok(`${tag} insert B`, { cmd: 'insert', client: B, text: 't', index: 5, value: ' world' })
    await ok(`${tag} wait_text A`, { cmd: 'wait_text', client: A, text: 't', value: 'hello world', timeout_ms: 5000 })
    await ok(`${tag} wait_text B`, { cmd: 'wait_text', client: B, text: 't', value: 'hello world', timeout_ms: 5000 })
    const g = await ok(`${tag} get`, { cmd: 'get', client: B })
    check(`${tag} get json`, g.json?.t === 'hello world' && g.json?.m && Object.keys(g.json.m).length === 0, g)

    await ok(`${tag} B sees alice`, { cmd: 'wait_presence', client: B, user: 'alice', present: true, timeout_ms: 5000 })
    await ok(`${tag} A sees bob`, { cmd: 'wait_presence', client: A, user: 'bob', present: true, timeout_ms: 5000 })
    await notOk(`${tag} A does not see itself`, { cmd: 'wait_presence', client: A, user: 'alice', present: true, timeout_ms: 200 },
      (r) => Array.isArray(r.states))
    await ok(`${tag} presence rename`, { cmd: 'presence', client: A, state: { user: { name: 'carol', color: '#fff' }, cursor: 3 } })
    await ok(`${tag} B sees carol`, { cmd: 'wait_presence', client: B, user: 'carol', present: true, timeout_ms: 5000 })
    await ok(`${tag} B no longer sees alice`, { cmd: 'wait_presence', client: B, user: 'alice', present: false, timeout_ms: 5000 })
    await ok(`${tag} presence null`, { cmd: 'presence', client: A, state: null })
    await ok(`${tag} B sees carol leave`, { cmd: 'wait_presence', client: B, user: 'carol', present: false, timeout_ms: 5000 })
    await ok(`${tag} presence back`, { cmd: 'presence', client: A, state: { user: { name: 'alice', color: '#30bced' } } })
    await ok(`${tag} B sees alice again`, { cmd: 'wait_presence', client: B, user: 'alice', present: true, timeout_ms: 5000 })

    await ok(`${tag} close A`, { cmd: 'close', client: A })
    await ok(`${tag} B sees alice leave after close`, { cmd: 'wait_presence', client: B, user: 'alice', present: false, timeout_ms: 5000 })
    await notOk(`${tag} closed client is gone`, { cmd: 'status', client: A })
    // a late joiner gets the whole document from the server
    await ok(`${tag} late joiner`, { cmd: 'connect', client: A, url, doc, version: va })
    await ok(`${tag} late joiner has the text`, { cmd: 'wait_text', client: A, text: 't', value: 'hello world', timeout_ms: 5000 })
    await ok(`${tag} late joiner sees bob`, { cmd: 'wait_presence', client: A, user: 'bob', present: true, timeout_ms: 5000 })
    await ok(`${tag} close A again`, { cmd: 'close', client: A })
  }

  // refusals: the HTTP status of the refused upgrade, for both client versions
  for (const v of [2, 3]) {
    const t0 = Date.now()
    await notOk(`v${v} 401 without the right token`, { cmd: 'connect', client: `r${v}`, url: refuserUrl, doc: 'd', token: 'bad', version: v },
      (r) => r.status === 401)
    await notOk(`v${v} 401 without any token`, { cmd: 'connect', client: `r${v}`, url: refuserUrl, doc: 'd', version: v },
      (r) => r.status === 401)
    await notOk(`v${v} 403 for a foreign origin`, { cmd: 'connect', client: `r${v}`, url: refuserUrl, doc: 'd', token: 'good', origin: 'http://evil', version: v },
      (r) => r.status === 403)
    check(`v${v} refusals are quick`, Date.now() - t0 < 3000, Date.now() - t0)
    await notOk(`v${v} a refused client is not kept`, { cmd: 'status', client: `r${v}` })
  }
  // revocation: the server closes open sockets with 4403, then refuses with 401
  for (const v of [2, 3]) {
    await ok(`v${v} connect to the token-checking server`, { cmd: 'connect', client: `k${v}`, url: refuserUrl, doc: 'd', token: 'good', version: v })
  }
  events.length = 0
  revoke()
  await new Promise((r) => setTimeout(r, 1500))
  for (const v of [2, 3]) {
    check(`v${v} closed event with the server's code`, events.some((e) => e.event === 'closed' && e.client === `k${v}` && e.code === 4403 && e.reason === 'token revoked'), events)
  }
  // 2.x keeps reconnecting (and is refused); 3.x stops reconnecting on codes 4400-4499
  check('v2 refused event on reconnect', events.some((e) => e.event === 'refused' && e.client === 'k2' && e.status === 401), events)
  check('v3 does not reconnect after 4403', !events.some((e) => e.client === 'k3' && e.event === 'refused'), events)
  check('one refused event per status', events.filter((e) => e.event === 'refused').length === 1, events)
  await notOk('v2 wait_connected fails while refused', { cmd: 'wait_connected', client: 'k2', timeout_ms: 300 }, (r) => r.refused === 401)
  const k3 = await ok('v3 status after revoke', { cmd: 'status', client: 'k3' })
  check('v3 disconnected after revoke', k3.connected === false && k3.synced === false, k3)
  await ok('close revoked v2', { cmd: 'close', client: 'k2' })
  await ok('close revoked v3', { cmd: 'close', client: 'k3' })

  const nobody = 'ws://127.0.0.1:1' // nothing listens there
  await notOk('connect to a closed port times out', { cmd: 'connect', client: 'z', url: nobody, doc: 'd', timeout_ms: 1500 },
    (r) => /timeout/.test(r.error) && /ECONNREFUSED/.test(r.error))

  // the server goes away and comes back: "closed" events, then wait_connected
  await ok('v2 connect before restart', { cmd: 'connect', client: 's2', url, doc: 'restart', version: 2, user: 'alice' })
  await ok('v3 connect before restart', { cmd: 'connect', client: 's3', url, doc: 'restart', version: 3, user: 'bob' })
  events.length = 0
  await server.restart()
  await new Promise((r) => setTimeout(r, 300))
  check('closed events for both clients', ['s2', 's3'].every((c) => events.some((e) => e.event === 'closed' && e.client === c && typeof e.code === 'number')), events)
  await ok('status while reconnecting', { cmd: 'status', client: 's3' })
  for (const c of ['s2', 's3']) {
    await ok(`${c} wait_connected after restart`, { cmd: 'wait_connected', client: c, timeout_ms: 10000 })
    const st = await ok(`${c} status after restart`, { cmd: 'status', client: c })
    check(`${c} connected and synced after restart`, st.connected && st.synced, st)
  }
  // Remote presence comes back only with the next awareness renewal (every 15 s): on
  // disconnect a client drops remote states but keeps their clocks, and the reconnecting
  // client re-sends its state with the same clock, which applyAwarenessUpdate ignores.
  const tp = Date.now()
  await ok('v3 sees alice after restart (next renewal)', { cmd: 'wait_presence', client: 's3', user: 'alice', present: true, timeout_ms: 25000 })
  await ok('v2 sees bob after restart (next renewal)', { cmd: 'wait_presence', client: 's2', user: 'bob', present: true, timeout_ms: 25000 })
  console.log(`     (presence back after ${Date.now() - tp} ms)`)
  await ok('set after restart', { cmd: 'set', client: 's2', map: 'm', key: 'after', value: true })
  await ok('wait after restart', { cmd: 'wait', client: 's3', map: 'm', key: 'after', value: true, timeout_ms: 5000 })
  // s2 and s3 are left open on purpose: closing stdin must close them
} finally {
  const exited = new Promise((resolve) => driver.once('exit', (code) => resolve(code)))
  driver.stdin.end()
  const code = await Promise.race([exited, new Promise((r) => setTimeout(() => r('still running'), 5000))])
  check('driver exits 0 when stdin closes', code === 0, code)
  if (code !== 0) driver.kill()
  await server.stop()
  refuser.close()
  clearTimeout(hardTimeout)
}
console.log(`selftest: ${passed} passed, ${failed} failed`)
process.exit(failed === 0 ? 0 : 1)
