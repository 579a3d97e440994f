// Builds the native addon from this checkout (cargo, release) and puts it next to index.js as
// devicelink.node. Run by `npm install ./bindings/node`; needs the Rust toolchain.
'use strict';
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const path = require('node:path');

const root = path.resolve(__dirname, '..', '..');
const started = Date.now();
execFileSync('cargo', ['build', '--release', '-p', 'devicelink-node'], {
  cwd: root,
  stdio: 'inherit',
});
const target = process.env.CARGO_TARGET_DIR
  ? path.resolve(root, process.env.CARGO_TARGET_DIR)
  : path.join(root, 'target');
const file = {
  darwin: 'libdevicelink_node.dylib',
  win32: 'devicelink_node.dll',
}[process.platform] || 'libdevicelink_node.so';
const addon = path.join(__dirname, 'devicelink.node');
fs.copyFileSync(path.join(target, 'release', file), addon);
// The release profile keeps line tables for the agent's backtraces; an app ships without them.
if (process.platform !== 'win32') {
  try {
    execFileSync('strip', process.platform === 'darwin' ? ['-S', addon] : ['--strip-debug', addon]);
  } catch (e) {
    console.warn(`devicelink: could not strip the addon (${e.message}); it works, only larger`);
  }
}
const mb = (fs.statSync(addon).size / 1e6).toFixed(1);
console.log(`devicelink: addon built in ${((Date.now() - started) / 1000).toFixed(0)} s (${mb} MB)`);
