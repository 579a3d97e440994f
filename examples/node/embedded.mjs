// Two devices' notes, synced: two agents embedded in one Node process, linked by code.
//
//   npm install ./bindings/node && node examples/node/embedded.mjs
import { createRequire } from 'node:module';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

const require = createRequire(import.meta.url);
const { Agent } = require(process.env.DEVICELINK_NODE || 'devicelink');

// Loopback only and no mDNS: the two "devices" meet at an address we give them.
const folder = (name) => mkdtempSync(path.join(tmpdir(), `devicelink-${name}-`));
const device = (name, dataDir) =>
  Agent.start({ dataDir, name, listen: ['/ip4/127.0.0.1/tcp/0'], mdns: false });
const dirs = [folder('laptop'), folder('phone')];
const [laptop, phone] = await Promise.all([device('laptop', dirs[0]), device('phone', dirs[1])]);

const host = await laptop.pairOpen(60); // the laptop shows a code...
const paired = await phone.pairJoin(host.code(), laptop.listenAddrs()[0]); // ...the phone types it
await host.wait();
console.log(`linked with ${paired.name}, verification ${paired.verification}`);

// Resolves at the next change on `doc` that came from device `from`.
const nextFrom = (doc, from) =>
  new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no change within 10 s')), 10000);
    const sub = doc.subscribe((_update, origin) => {
      if (origin !== from) return;
      clearTimeout(timer);
      sub.cancel();
      resolve();
    });
  });

const onLaptop = laptop.doc('notes');
const onPhone = phone.doc('notes');

let arrived = nextFrom(onPhone, laptop.deviceId());
await onLaptop.textAppend('body', 'Groceries: milk');
await arrived;
console.log('phone sees:', onPhone.text('body'));

arrived = nextFrom(onLaptop, phone.deviceId());
await onPhone.set('meta', 'done', false);
await arrived;
console.log('laptop sees:', JSON.stringify(onLaptop.getJson()));

await Promise.all([laptop.shutdown(), phone.shutdown()]);
dirs.forEach((dir) => rmSync(dir, { recursive: true, force: true }));
