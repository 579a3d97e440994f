// A real-browser test of examples/web: two headless Chromium pages (separate browser
// contexts, so nothing is shared but the servers) edit one document through y-websocket
// endpoints, typing with the keyboard.
//
// env: DL_WEB_PORT  port to serve examples/web on (default: a free one)
//      DL_WS_A, DL_TOKEN_A  endpoint and token for page A ("alice")
//      DL_WS_B, DL_TOKEN_B  endpoint and token for page B ("bob"); default: A's
//      DL_DOC      document name (default notes/web-test)
//      CHROMIUM    browser binary (default /usr/bin/chromium)
//      DL_SCREENSHOT  if set, a PNG of both pages is written with this prefix
// Without DL_WS_A it starts the reference y-websocket server and uses it for both pages.
// Prints "BROWSER OK" and exits 0; on failure prints what it saw and exits 1; exits 77
// ("SKIP: ...") if Chromium cannot start. Hard limit: 60 s.
import { mkdtemp, copyFile, mkdir, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { build } from 'esbuild'
import puppeteer from 'puppeteer-core'
import { serve } from '../../examples/web/serve.mjs'
import { startReferenceServer } from './refserver.mjs'

const HARD_LIMIT_MS = 60000
const webDir = fileURLToPath(new URL('../../examples/web/', import.meta.url))
const nodeModules = fileURLToPath(new URL('./node_modules/', import.meta.url))
const started = Date.now()
const left = () => Math.max(1000, HARD_LIMIT_MS - 5000 - (Date.now() - started))

const cleanups = []
const cleanup = async () => {
  while (cleanups.length) {
    try { await cleanups.pop()() } catch (e) { console.error('cleanup:', e?.message ?? e) }
  }
}
let finished = false
const finish = async (code, message) => {
  if (finished) return
  finished = true
  console.log(message)
  await cleanup()
  process.exit(code)
}
const hard = setTimeout(() => {
  finish(1, `FAIL: over ${HARD_LIMIT_MS / 1000} s\n${JSON.stringify(seen, null, 2)}`)
  setTimeout(() => process.exit(1), 3000).unref()
}, HARD_LIMIT_MS)
hard.unref()
process.on('SIGINT', () => finish(1, 'FAIL: interrupted'))
process.on('SIGTERM', () => finish(1, 'FAIL: terminated'))

const seen = { step: 'start', pages: {}, console: [] }
const step = (s) => { seen.step = s; console.error(`browser: ${s} (${Date.now() - started} ms)`) }

try {
  // 1. build the page into a temporary folder (the repo stays clean)
  step('build')
  const out = await mkdtemp(join(tmpdir(), 'dl-web-'))
  cleanups.push(() => rm(out, { recursive: true, force: true }))
  await mkdir(join(out, 'dist'))
  await copyFile(join(webDir, 'index.html'), join(out, 'index.html'))
  await build({
    entryPoints: [join(webDir, 'app.js')],
    bundle: true,
    format: 'esm',
    target: 'es2020',
    outfile: join(out, 'dist', 'app.js'),
    nodePaths: [nodeModules], // examples/web needs no npm install of its own
    logLevel: 'warning',
  })

  // 2. the endpoints, and the page's server
  let wsA = process.env.DL_WS_A
  let wsB = process.env.DL_WS_B
  if (!wsA) {
    step('start the reference y-websocket server')
    const ref = await startReferenceServer()
    cleanups.push(() => ref.stop())
    wsA = ref.url
  }
  wsB = wsB || wsA
  const tokenA = process.env.DL_TOKEN_A ?? ''
  const tokenB = process.env.DL_TOKEN_B ?? tokenA
  const doc = process.env.DL_DOC || 'notes/web-test'
  const http = await serve({ root: out, port: Number(process.env.DL_WEB_PORT || 0) })
  cleanups.push(() => new Promise((resolve) => { http.closeAllConnections?.(); http.close(() => resolve()) }))
  const web = `http://127.0.0.1:${http.address().port}`
  seen.web = web; seen.wsA = wsA; seen.wsB = wsB; seen.doc = doc

  // 3. the browser
  step('launch chromium')
  const executablePath = process.env.CHROMIUM || '/usr/bin/chromium'
  let browser
  try {
    browser = await puppeteer.launch({
      executablePath,
      headless: true,
      args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run'],
      timeout: 20000,
    })
  } catch (e) {
    clearTimeout(hard)
    await finish(77, `SKIP: cannot start ${executablePath}: ${String(e?.message ?? e).split('\n')[0]}`)
  }
  cleanups.push(() => browser.close())

  const open = async (who, ws, token) => {
    const ctx = await browser.createBrowserContext()
    const page = await ctx.newPage()
    page.on('console', (m) => seen.console.push(`${who} ${m.type()}: ${m.text()}`))
    page.on('pageerror', (e) => seen.console.push(`${who} pageerror: ${e.message}`))
    const q = new URLSearchParams({ ws, token, doc, name: who })
    await page.goto(`${web}/?${q}`, { waitUntil: 'load', timeout: left() })
    return page
  }
  const snapshot = async (page) => page.evaluate(() => ({
    status: document.getElementById('status')?.textContent,
    text: document.getElementById('editor')?.value,
    caret: [document.getElementById('editor')?.selectionStart, document.getElementById('editor')?.selectionEnd],
    presence: [...document.querySelectorAll('#presence li')].map((li) => ({ user: li.dataset.user, text: li.textContent })),
  }))
  const look = async () => {
    for (const [who, page] of Object.entries(pages)) {
      try { seen.pages[who] = await snapshot(page) } catch (e) { seen.pages[who] = `unreadable: ${e.message}` }
    }
  }
  const until = async (what, page, fn, arg) => {
    step(what)
    try {
      await page.waitForFunction(fn, { timeout: Math.min(20000, left()), polling: 50 }, arg)
    } catch (e) {
      await look()
      throw new Error(`${what}: ${e.message.split('\n')[0]}`)
    }
  }
  const pages = {}

  step('open pages')
  pages.alice = await open('alice', wsA, tokenA)
  pages.bob = await open('bob', wsB, tokenB)
  const { alice: A, bob: B } = pages
  const statusIs = (s) => document.getElementById('status')?.textContent === s
  await until('page A synced', A, statusIs, 'synced')
  await until('page B synced', B, statusIs, 'synced')

  // 4. type on A, see it on B
  const textIs = (s) => document.getElementById('editor').value === s
  step('type on A')
  await A.click('#editor')
  await A.keyboard.type('hello from A', { delay: 20 })
  await until('B shows what A typed', B, textIs, 'hello from A')

  // 5. type on B (at the end), see it on A; A's caret stays where it was
  step('type on B')
  await B.click('#editor')
  await B.keyboard.down('Control'); await B.keyboard.press('End'); await B.keyboard.up('Control')
  await B.keyboard.type(' and hello from B', { delay: 20 })
  await until('A shows what B typed', A, textIs, 'hello from A and hello from B')
  // B types at the start: A's caret (at 12, after "hello from A") must move along
  await B.keyboard.down('Control'); await B.keyboard.press('Home'); await B.keyboard.up('Control')
  await B.keyboard.type('> ', { delay: 20 })
  await until('A shows the prefix typed on B', A, textIs, '> hello from A and hello from B')
  await until('B shows the same text', B, textIs, '> hello from A and hello from B')
  await until('A keeps its caret after "hello from A"', A,
    () => document.getElementById('editor').selectionStart === 14 && document.getElementById('editor').selectionEnd === 14)

  // 6. presence both ways, with the caret each one reports
  const hasUser = (u) => document.querySelector(`#presence li[data-user="${u}"]`) !== null
  await until('B lists alice', B, hasUser, 'alice')
  await until('A lists bob', A, hasUser, 'bob')
  await until('B sees where alice\'s caret is', B,
    () => /caret at 14/.test(document.querySelector('#presence li[data-user="alice"]')?.textContent ?? ''))
  await until('A sees where bob\'s caret is', A,
    () => /caret at 2/.test(document.querySelector('#presence li[data-user="bob"]')?.textContent ?? ''))

  if (process.env.DL_SCREENSHOT) {
    await A.screenshot({ path: `${process.env.DL_SCREENSHOT}-alice.png` })
    await B.screenshot({ path: `${process.env.DL_SCREENSHOT}-bob.png` })
  }
  await look()
  console.error(JSON.stringify(seen.pages))
  clearTimeout(hard)
  await finish(0, 'BROWSER OK')
} catch (e) {
  clearTimeout(hard)
  await finish(1, `FAIL at "${seen.step}": ${e?.message ?? e}\n${JSON.stringify(seen, null, 2)}`)
}
