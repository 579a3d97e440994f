// devicelink for Node.js: the native addon (built by build.js at install time).
'use strict';
const path = require('node:path');

let addon;
try {
  addon = require(path.join(__dirname, 'devicelink.node'));
} catch (e) {
  throw new Error(
    `devicelink: the native addon is missing or broken (${e.message}); ` +
      'reinstall with `npm install ./bindings/node` from a devicelink checkout (needs cargo)'
  );
}

module.exports = addon;
