// A shared notes page: a <textarea> bound to a Y.Text, synced through a y-websocket endpoint
// (a devicelink agent, or any y-websocket server), with a "who is here" list from awareness.
//
// Query string: ?ws=ws://127.0.0.1:4455&token=TOKEN&doc=notes/web&name=alice
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'

const q = new URLSearchParams(location.search)
const wsUrl = q.get('ws') || 'ws://127.0.0.1:4455'
const token = q.get('token') || ''
const docName = q.get('doc') || 'notes/web'
const COLORS = ['#30bced', '#6eeb83', '#ffbc42', '#ecd444', '#ee6352', '#9ac2c9', '#8acb88', '#1be7ff']
const ANIMALS = ['otter', 'heron', 'lynx', 'badger', 'wren', 'ibex', 'newt', 'puffin']
const randomName = () => `${ANIMALS[Math.floor(Math.random() * ANIMALS.length)]}-${Math.floor(Math.random() * 1000)}`
const name = q.get('name') || randomName()
const colorOf = (s) => COLORS[[...s].reduce((h, c) => (h * 31 + c.codePointAt(0)) >>> 0, 7) % COLORS.length]
const color = colorOf(name)

const editor = /** @type {HTMLTextAreaElement} */ (document.getElementById('editor'))
const statusEl = document.getElementById('status')
const presenceEl = document.getElementById('presence')
document.getElementById('me').textContent = name
document.getElementById('me').style.borderColor = color
document.getElementById('docname').textContent = docName

const ydoc = new Y.Doc()
const ytext = ydoc.getText('text')
const provider = new WebsocketProvider(wsUrl, docName, ydoc, {
  params: token ? { token } : {},
  // Tabs of the same browser would otherwise sync through a BroadcastChannel and bypass
  // the server; ?bc=1 turns it back on.
  disableBc: q.get('bc') !== '1',
})
const awareness = provider.awareness
awareness.setLocalState({ user: { name, color }, cursor: null })

// --- connection status -------------------------------------------------------------------
let lastStatus = 'connecting'
const showStatus = () => {
  const s = provider.synced ? 'synced' : lastStatus
  statusEl.textContent = s
  statusEl.dataset.state = s
}
provider.on('status', ({ status }) => { lastStatus = status; showStatus() })
provider.on('sync', showStatus)
provider.on('connection-error', () => {
  // A browser is not told why an upgrade failed: a wrong token (401), a foreign origin or
  // document (403) and an agent that is not running look the same from here.
  if (!provider.synced) { lastStatus = 'refused or unreachable (check ws, token, origin, doc)'; showStatus() }
})
// The connection actually in use (the ws URL, the document; never the token itself).
document.getElementById('connection').textContent = `${wsUrl}/${docName}${token ? ' (with a token)' : ''}`
showStatus()

// --- textarea -> Y.Text: apply the minimal diff ---------------------------------------------
const LOCAL = Symbol('textarea')
const isLowSurrogate = (c) => c >= 0xdc00 && c <= 0xdfff
const applyLocalEdit = () => {
  const before = ytext.toString()
  const after = editor.value
  if (before === after) return
  // common prefix, limited so that a typed character repeating its neighbour is put at the caret
  let start = 0
  const max = Math.min(before.length, after.length)
  while (start < max && before.charCodeAt(start) === after.charCodeAt(start)) start++
  const grown = after.length - before.length
  if (grown > 0 && editor.selectionEnd - grown >= 0) start = Math.min(start, editor.selectionEnd - grown)
  // common suffix, not overlapping the prefix
  let endBefore = before.length
  let endAfter = after.length
  while (endBefore > start && endAfter > start && before.charCodeAt(endBefore - 1) === after.charCodeAt(endAfter - 1)) {
    endBefore--; endAfter--
  }
  // never split a surrogate pair
  while (start > 0 && isLowSurrogate(after.charCodeAt(start))) start--
  while (endBefore < before.length && isLowSurrogate(before.charCodeAt(endBefore))) { endBefore++; endAfter++ }
  ydoc.transact(() => {
    if (endBefore > start) ytext.delete(start, endBefore - start)
    if (endAfter > start) ytext.insert(start, after.slice(start, endAfter))
  }, LOCAL)
}
editor.addEventListener('input', () => { applyLocalEdit(); reportCursor() })

// --- Y.Text -> textarea: apply remote changes, keeping the local selection ------------------
ytext.observe((event, tr) => {
  if (tr.origin === LOCAL) return
  let { selectionStart: s, selectionEnd: e, selectionDirection: dir, scrollTop } = editor
  let index = 0
  for (const op of event.delta) {
    if (op.retain !== undefined) {
      index += op.retain
    } else if (op.insert !== undefined) {
      const n = typeof op.insert === 'string' ? op.insert.length : 1
      if (index < s) s += n
      if (index < e) e += n
      index += n
    } else if (op.delete !== undefined) {
      if (index < s) s -= Math.min(op.delete, s - index)
      if (index < e) e -= Math.min(op.delete, e - index)
    }
  }
  editor.value = ytext.toString()
  editor.setSelectionRange(s, e, dir)
  editor.scrollTop = scrollTop
  reportCursor()
})

// --- presence: my caret out, everyone else's in ------------------------------------------
let lastCursor = null
const reportCursor = () => {
  const focused = document.activeElement === editor
  const cursor = focused ? { anchor: editor.selectionStart, head: editor.selectionEnd } : null
  if (JSON.stringify(cursor) === JSON.stringify(lastCursor)) return
  lastCursor = cursor
  awareness.setLocalStateField('cursor', cursor)
}
document.addEventListener('selectionchange', reportCursor)
editor.addEventListener('selectionchange', reportCursor)
editor.addEventListener('keyup', reportCursor)
editor.addEventListener('mouseup', reportCursor)
editor.addEventListener('focus', reportCursor)
editor.addEventListener('blur', reportCursor)

const renderPresence = () => {
  const items = []
  for (const [clientID, state] of awareness.getStates()) {
    if (clientID === ydoc.clientID || !state?.user) continue
    const li = document.createElement('li')
    li.dataset.user = String(state.user.name ?? '')
    li.dataset.client = String(clientID)
    const dot = document.createElement('span')
    dot.className = 'dot'
    dot.style.background = typeof state.user.color === 'string' ? state.user.color : '#999'
    const who = document.createElement('span')
    who.className = 'name'
    who.textContent = String(state.user.name ?? 'anonymous')
    const where = document.createElement('span')
    where.className = 'cursor'
    const c = state.cursor
    if (c && typeof c === 'object' && Number.isInteger(c.anchor)) {
      where.textContent = c.head !== undefined && c.head !== c.anchor ? `selecting ${Math.min(c.anchor, c.head)}–${Math.max(c.anchor, c.head)}` : `caret at ${c.anchor}`
    } else if (Number.isInteger(c)) {
      where.textContent = `caret at ${c}`
    } else {
      where.textContent = 'not editing'
    }
    li.append(dot, who, where)
    items.push(li)
  }
  items.sort((a, b) => a.dataset.user.localeCompare(b.dataset.user))
  presenceEl.replaceChildren(...items)
  document.getElementById('nobody').hidden = items.length > 0
}
awareness.on('change', renderPresence)
renderPresence()

// for debugging from the console
Object.assign(window, { ydoc, ytext, provider })
