// js-libp2p 3.x targets Node 22; on Node 20 it needs Promise.withResolvers (Node 22 built in).
// Imported first by the scripts that load js-libp2p, so it runs before those modules do.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve, reject
    const promise = new Promise((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}
