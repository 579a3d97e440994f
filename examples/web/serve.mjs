// A tiny dependency-free static file server for this page, on 127.0.0.1 only.
// `npm start` (or `node serve.mjs`) serves this folder on PORT (default 8080); run
// `npm run build` first so that dist/app.js exists. Other scripts may import serve().
import { createServer } from 'node:http'
import { readFile } from 'node:fs/promises'
import { extname, join, resolve, sep } from 'node:path'
import { fileURLToPath } from 'node:url'

const TYPES = {
  '.html': 'text/html; charset=utf-8',
  '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8',
  '.map': 'application/json; charset=utf-8',
  '.css': 'text/css; charset=utf-8',
  '.json': 'application/json; charset=utf-8',
  '.svg': 'image/svg+xml',
  '.png': 'image/png',
  '.ico': 'image/x-icon',
}

// Serves `root` on host:port; resolves to the listening http.Server.
export const serve = ({ root = fileURLToPath(new URL('.', import.meta.url)), port = 8080, host = '127.0.0.1' } = {}) =>
  new Promise((resolvePromise, reject) => {
    root = resolve(root)
    const server = createServer(async (req, res) => {
      let path
      try {
        path = decodeURIComponent(new URL(req.url, 'http://x').pathname)
      } catch {
        res.writeHead(400).end('bad request')
        return
      }
      if (path.endsWith('/')) path += 'index.html'
      const file = resolve(join(root, path))
      if (file !== root && !file.startsWith(root + sep)) {
        res.writeHead(403).end('forbidden')
        return
      }
      if (req.method !== 'GET' && req.method !== 'HEAD') {
        res.writeHead(405, { Allow: 'GET, HEAD' }).end()
        return
      }
      try {
        const body = await readFile(file)
        res.writeHead(200, {
          'Content-Type': TYPES[extname(file)] ?? 'application/octet-stream',
          'Content-Length': body.length,
          'Cache-Control': 'no-store',
        })
        res.end(req.method === 'HEAD' ? undefined : body)
      } catch {
        res.writeHead(404, { 'Content-Type': 'text/plain' }).end(`not found: ${path}`)
      }
    })
    server.once('error', reject)
    server.listen(port, host, () => resolvePromise(server))
  })

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const port = Number(process.env.PORT || 8080)
  const server = await serve({ port })
  console.log(`serving http://127.0.0.1:${server.address().port}`)
}
