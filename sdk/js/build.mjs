// Builds dist/: the ESM module, the single-file IIFE (global `tidemark`) and
// the type declarations. `--size` also prints the core's min+gzip size and
// fails above the budget.
import { build } from 'esbuild';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { gzipSync } from 'node:zlib';

export const BUDGET_BYTES = 5 * 1024;

const common = { entryPoints: ['src/index.ts'], bundle: true, minify: true, target: 'es2020', logLevel: 'warning' };
await build({ ...common, format: 'esm', outfile: 'dist/tidemark.mjs' });
await build({ ...common, format: 'iife', globalName: 'tidemark', outfile: 'dist/tidemark.iife.js' });
execFileSync(process.execPath, ['node_modules/typescript/bin/tsc', '-p', '.'], { stdio: 'inherit' });

/** Minified and gzipped (level 9) bytes of each build. */
export function sizes() {
  return Object.fromEntries(['dist/tidemark.mjs', 'dist/tidemark.iife.js'].map((f) => {
    const code = readFileSync(f);
    return [f, { min: code.length, gzip: gzipSync(code, { level: 9 }).length }];
  }));
}

if (process.argv.includes('--size')) {
  let over = false;
  for (const [file, { min, gzip }] of Object.entries(sizes())) {
    console.log(`${file}: ${min} bytes minified, ${gzip} bytes min+gzip (budget ${BUDGET_BYTES})`);
    over ||= gzip > BUDGET_BYTES;
  }
  if (over) process.exit(1);
}
