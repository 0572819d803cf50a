// The core's budget: at most 5 KB minified and gzipped, whichever build.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BUDGET_BYTES, sizes } from '../build.mjs';

test(`the core is at most ${BUDGET_BYTES} bytes min+gzip`, () => {
  for (const [file, { gzip }] of Object.entries(sizes())) {
    console.log(`# ${file}: ${gzip} bytes min+gzip`);
    assert.ok(gzip <= BUDGET_BYTES, `${file} is ${gzip} bytes min+gzip, over ${BUDGET_BYTES}`);
  }
});
