// Starts the reference y-websocket server (the `y-websocket` 2.1.0 package's bin/server.cjs)
// on 127.0.0.1 and a free port. Used by selftest.mjs and browser.mjs when validating without
// a devicelink agent. The reference server ignores tokens and origins.
import { spawn } from 'node:child_process'
import { createServer } from 'node:net'
import { createRequire } from 'node:module'
import { dirname, join } from 'node:path'

const require = createRequire(import.meta.url)
export const serverPath = join(dirname(require.resolve('y-websocket/package.json')), 'bin', 'server.cjs')

export const freePort = () => new Promise((resolve, reject) => {
  const s = createServer()
  s.on('error', reject)
  s.listen(0, '127.0.0.1', () => {
    const { port } = s.address()
    s.close(() => resolve(port))
  })
})

// Returns { port, url, stop(), restart() }. restart() stops it and starts it again on the
// same port (all documents are lost: the reference server keeps them in memory only).
export const startReferenceServer = async (port) => {
  port = port ?? await freePort()
  let child = null
  const start = () => new Promise((resolve, reject) => {
    child = spawn(process.execPath, [serverPath], {
      env: { ...process.env, HOST: '127.0.0.1', PORT: String(port) },
      stdio: ['ignore', 'pipe', 'inherit'],
    })
    const t = setTimeout(() => reject(new Error('reference server did not start in 10 s')), 10000)
    child.once('error', (e) => { clearTimeout(t); reject(e) })
    child.once('exit', (code) => { clearTimeout(t); reject(new Error(`reference server exited: ${code}`)) })
    let buf = ''
    child.stdout.on('data', (d) => {
      buf += d
      if (buf.includes('running at')) { clearTimeout(t); resolve() }
    })
  })
  const stop = () => new Promise((resolve) => {
    if (!child || child.exitCode !== null || child.signalCode !== null) return resolve()
    child.removeAllListeners('exit')
    child.once('exit', () => resolve())
    child.kill()
  })
  await start()
  const onExit = () => child?.kill()
  process.on('exit', onExit)
  return {
    port,
    url: `ws://127.0.0.1:${port}`,
    get pid () { return child.pid },
    stop: async () => { process.off('exit', onExit); await stop() },
    restart: async () => { await stop(); await start() },
  }
}
