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
fs.copyFileSync(path.join(target, 'release', file), path.join(__dirname, 'devicelink.node'));
console.log(`devicelink: addon built in ${((Date.now() - started) / 1000).toFixed(0)} s`);
