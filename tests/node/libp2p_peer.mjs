// A stock js-libp2p peer (TCP + Noise + Yamux, default settings) for the interop tests.
//
//   node libp2p_peer.mjs <config.json>
//
// config: { "addr": "/ip4/127.0.0.1/tcp/PORT/p2p/ID", "key": "<protobuf private key, hex>",
//           "protocol": "/devicelink/sync/1.4.0", "send": "<file whose bytes are written>",
//           "hold_ms": 3000 }
//
// It dials the agent, opens one stream, writes the file's bytes (the caller frames them), keeps
// reading what the agent sends for hold_ms after the last write, and prints one JSON line:
// { "sent": n, "received": n, "connection_closed": bool, "error": s }.
// js-libp2p's Yamux writes data frames as large as the send window the agent granted, which is
// what the interop test is about.
import './node20.mjs'
import { readFileSync } from 'node:fs'
import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { privateKeyFromProtobuf } from '@libp2p/crypto/keys'
import { multiaddr } from '@multiformats/multiaddr'

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'))
const payload = readFileSync(config.send)
const result = { sent: 0, received: 0, connection_closed: false, error: null }

const node = await createLibp2p({
  privateKey: privateKeyFromProtobuf(Buffer.from(config.key, 'hex')),
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  addresses: { listen: [] }
})
node.addEventListener('connection:close', () => { result.connection_closed = true })

const finish = async () => {
  console.log(JSON.stringify(result))
  await node.stop().catch(() => {})
  process.exit(0)
}
const deadline = setTimeout(() => { result.error = result.error ?? 'timed out'; finish() }, config.limit_ms ?? 60000)

try {
  await node.start()
  const stream = await node.dialProtocol(multiaddr(config.addr), config.protocol)
  stream.addEventListener('message', (event) => { result.received += event.data.byteLength })
  // Whole-payload writes: the muxer splits them by the send window, not by any size of ours.
  const chunk = 8 * 1024 * 1024
  for (let at = 0; at < payload.byteLength; at += chunk) {
    const piece = payload.subarray(at, Math.min(at + chunk, payload.byteLength))
    if (!stream.send(piece)) {
      await stream.onDrain({ signal: AbortSignal.timeout(30000) })
    }
    result.sent += piece.byteLength
  }
  await new Promise((resolve) => setTimeout(resolve, config.hold_ms ?? 3000))
} catch (e) {
  result.error = String(e?.message ?? e)
}
clearTimeout(deadline)
await finish()
