/** The README's example program, run as it is against the server under test. */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { SECRET, SERVER_URL } from './harness.js';

test('examples/first-message.mjs sends a PQXDH first message that the other device reads', async () => {
  const script = fileURLToPath(new URL('../../examples/first-message.mjs', import.meta.url));
  const { stdout } = await promisify(execFile)(process.execPath, [script], {
    env: { ...process.env, KEYSERVER_URL: SERVER_URL, KEYSERVER_TOKEN_SECRET: SECRET },
  });
  assert.match(stdout, /^Alice sent a PreKey message of \d+ bytes$/m);
  assert.match(stdout, /^Bob read: hello Bob$/m);
  assert.match(stdout, /^Bob maintain: \{"oneTimePreKeysUploaded":0,/m);
});
