// Browser tests of the JavaScript SDK (sdk/js) in headless Chromium against a
// real `tidemark run`: a test page on another origin (allowed by
// --cors-origin) loads the SDK's IIFE build, and each scenario checks that
// its events reach ingest (its metrics) exactly once. The last test closes
// the windows and reads every scenario's count back through the REST API.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { bin, freePort, launchChromium, root, waitFor } from './harness.mjs';

const sdkBuild = join(root, 'sdk', 'js', 'dist', 'tidemark.iife.js');
const KEY = 'sdk-test-key';

let dataDir, ingestPort, pagePort, base, pageOrigin, token, server, pageServer, browser;
/** Events each scenario's type should count, read back at the end. */
const expected = {};

function startTidemark() {
  const proc = spawn(bin, ['run', '--listen', `127.0.0.1:${ingestPort}`, '--data-dir', dataDir,
    '--api-key', KEY, '--cors-origin', pageOrigin, '--web-dir', join(dataDir, 'no-dashboard')],
  { stdio: ['ignore', 'ignore', 'inherit'] });
  const exited = new Promise((ok) => proc.once('exit', ok));
  return { proc, exited };
}

async function stopTidemark() {
  server.proc.kill('SIGTERM');
  await server.exited;
}

async function healthy() {
  await waitFor('tidemark health', async () => (await fetch(`${base}/api/v1/health`)).ok, 30_000);
}

async function api(path) {
  const res = await fetch(base + path, { headers: { authorization: `Bearer ${token}` } });
  assert.equal(res.status, 200, `${path}: ${res.status}`);
  return res;
}

/** Ingest's counters of this tidemark process. */
async function ingestCounts() {
  const text = await (await api('/metrics')).text();
  const value = (name) => Number(text.match(new RegExp(`^${name} (\\d+)`, 'm'))?.[1] ?? 0);
  return {
    accepted: value('tidemark_ingest_events_accepted_total'),
    duplicates: value('tidemark_ingest_duplicates_total'),
  };
}

/** Waits until ingest accepted `n` more events than in `from`; fails on more. */
async function delivered(from, n, what) {
  const counts = await waitFor(`${n} ${what} events at ingest`, async () => {
    const now = await ingestCounts();
    return now.accepted >= from.accepted + n && now;
  }, 30_000);
  assert.equal(counts.accepted, from.accepted + n, `${what}: more events accepted than tracked`);
  return counts;
}

async function sdkPage(context, flushIntervalMs = 3000) {
  const page = await context.newPage();
  page.on('pageerror', (err) => console.error(`page error: ${err}`));
  await page.goto(`${pageOrigin}/?flush=${flushIntervalMs}`);
  await page.waitForFunction(() => window.ready === true);
  return page;
}

const track = (page, type, n, fields = {}) =>
  page.evaluate(([type, n, fields]) => {
    for (let i = 0; i < n; i++) tidemark.track(type, { ...fields, properties: { i } });
  }, [type, n, fields]);

before(async () => {
  dataDir = mkdtempSync(join(tmpdir(), 'tidemark-sdk-'));
  [ingestPort, pagePort] = [await freePort(), await freePort()];
  base = `http://127.0.0.1:${ingestPort}`;
  pageOrigin = `http://127.0.0.1:${pagePort}`;
  const created = spawnSync(bin, ['token', 'create', '--role', 'analyst', '--name', 'sdk-test',
    '--data-dir', dataDir], { encoding: 'utf8' });
  token = created.stdout.match(/tmk_\S+/)?.[0];
  assert.ok(token, `no token in: ${created.stdout}${created.stderr}`);

  const script = readFileSync(sdkBuild);
  pageServer = createServer((req, res) => {
    const url = new URL(req.url, pageOrigin);
    if (url.pathname === '/tidemark.iife.js') {
      res.writeHead(200, { 'content-type': 'text/javascript' }).end(script);
      return;
    }
    const flush = Number(url.searchParams.get('flush')) || 3000;
    res.writeHead(200, { 'content-type': 'text/html' }).end(`<!doctype html><title>SDK test</title>
<script src="/tidemark.iife.js"></script>
<script>
  window.rejected = [];
  tidemark.init({ url: ${JSON.stringify(base)}, key: ${JSON.stringify(KEY)}, flushIntervalMs: ${flush},
    onReject: (event, reason) => window.rejected.push([event.event_type, reason]) });
  window.ready = true;
</script>`);
  });
  await new Promise((ok) => pageServer.listen(pagePort, '127.0.0.1', ok));

  server = startTidemark();
  await healthy();
  browser = await launchChromium();
});

after(async () => {
  if (browser) await browser.close();
  if (pageServer) pageServer.close();
  if (server && server.proc.exitCode === null) await stopTidemark();
  if (dataDir) rmSync(dataDir, { recursive: true, force: true, maxRetries: 3 });
});

test('exactly once: tracked events arrive once each', async () => {
  const context = await browser.newContext();
  const page = await sdkPage(context);
  const from = await ingestCounts();
  await track(page, 'custom.sdk_once', 120);
  const to = await delivered(from, 120, 'tracked');
  assert.equal(to.duplicates, from.duplicates, 'no event was sent twice');
  expected['custom.sdk_once'] = 120;
  await context.close();
});

test('offline: events are queued, then delivered once when back online', async () => {
  const context = await browser.newContext();
  const page = await sdkPage(context);
  const from = await ingestCounts();
  await context.setOffline(true);
  await track(page, 'custom.sdk_offline', 30);
  await page.evaluate(() => tidemark.flush());
  assert.equal(await page.evaluate(() => tidemark.stats().queued), 30);
  assert.equal((await ingestCounts()).accepted, from.accepted, 'nothing is sent offline');
  await context.setOffline(false);
  const to = await delivered(from, 30, 'offline');
  assert.equal(to.duplicates, from.duplicates);
  await waitFor('an empty queue', () => page.evaluate(() => tidemark.stats().queued === 0), 10_000);
  expected['custom.sdk_offline'] = 30;
  await context.close();
});

test('reload: events still queued (ingest answering 503) are delivered after the reload', async () => {
  const context = await browser.newContext();
  const page = await sdkPage(context);
  const from = await ingestCounts();
  let refused = 0;
  await context.route(`${base}/v1/events**`, (route) => {
    refused++;
    return route.fulfill({ status: 503, headers: { 'retry-after': '1', 'access-control-allow-origin': pageOrigin },
      body: '{"error":"log unavailable"}' });
  });
  await track(page, 'custom.sdk_reload', 20);
  await page.evaluate(() => tidemark.flush());
  assert.ok(refused >= 1, 'the SDK tried and was refused');
  assert.equal(await page.evaluate(() => tidemark.stats().queued), 20);
  await page.reload();
  await page.waitForFunction(() => window.ready === true);
  await context.unroute(`${base}/v1/events**`);
  await delivered(from, 20, 'reloaded');
  await waitFor('an empty queue', () => page.evaluate(() => tidemark.stats().queued === 0), 10_000);
  expected['custom.sdk_reload'] = 20;
  await context.close();
});

test('server down: the SDK retries while tidemark is stopped, and all arrive once it is back', async () => {
  const context = await browser.newContext();
  const page = await sdkPage(context, 500);
  await stopTidemark();
  await track(page, 'custom.sdk_down', 25);
  await page.evaluate(() => tidemark.flush());
  assert.equal(await page.evaluate(() => tidemark.stats().queued), 25);
  server = startTidemark();
  await healthy();
  // A new process: its counters start from zero.
  const to = await delivered({ accepted: 0 }, 25, 'retried');
  assert.equal(to.duplicates, 0);
  expected['custom.sdk_down'] = 25;
  await context.close();
});

test('per-event rejections: the invalid event reaches onReject, the rest are counted', async () => {
  const context = await browser.newContext();
  const page = await sdkPage(context);
  const from = await ingestCounts();
  await track(page, 'custom.sdk_reject', 5);
  await track(page, 'view', 1);
  await track(page, 'custom.sdk_reject', 5);
  await page.evaluate(() => tidemark.flush());
  await delivered(from, 10, 'valid');
  assert.deepEqual(await page.evaluate(() => window.rejected), [['view', 'missing_field']]);
  expected['custom.sdk_reject'] = 10;
  await context.close();
});

test('two tabs on one origin share the queue without sending an event twice', async () => {
  const context = await browser.newContext();
  // Long intervals: both tabs' events sit in the shared queue together.
  const [a, b] = [await sdkPage(context, 60_000), await sdkPage(context, 60_000)];
  const from = await ingestCounts();
  for (let round = 0; round < 4; round++) {
    await track(a, 'custom.sdk_tabs', 10);
    await track(b, 'custom.sdk_tabs', 10);
  }
  await Promise.all([a.evaluate(() => tidemark.flush()), b.evaluate(() => tidemark.flush()),
    a.evaluate(() => tidemark.flush()), b.evaluate(() => tidemark.flush())]);
  const to = await delivered(from, 80, 'two-tab');
  assert.equal(to.duplicates, from.duplicates, 'no event was sent by both tabs');
  expected['custom.sdk_tabs'] = 80;
  await context.close();
});

test('unload: a page closed right after track delivers by beacon, and no other tab resends', async () => {
  const context = await browser.newContext();
  const [closing, other] = [await sdkPage(context, 60_000), await sdkPage(context, 60_000)];
  const from = await ingestCounts();
  await track(closing, 'custom.sdk_unload', 5);
  await closing.close();
  const to = await delivered(from, 5, 'beaconed');
  // The other tab takes over what the closed one left, and finds it sent.
  await other.evaluate(() => tidemark.flush());
  assert.equal(await other.evaluate(() => tidemark.stats().queued), 0);
  assert.deepEqual(await ingestCounts(), to, 'nothing sent again');
  expected['custom.sdk_unload'] = 5;
  await context.close();
});

test('every scenario\'s events are counted exactly once through the REST API', async () => {
  assert.equal(Object.keys(expected).length, 7, 'every scenario ran');
  // Events ahead of time on many users move every partition's watermark past
  // the scenarios' minutes, so their windows close and are stored.
  const close = Date.now() + 3 * 60_000;
  const body = Array.from({ length: 64 }, (_, u) => JSON.stringify({ event_id: `close-${u}`,
    event_type: 'custom.sdk_close', user_id: `closer-${u}`, timestamp: close })).join('\n');
  const res = await fetch(`${base}/v1/events`, { method: 'POST', body, headers: { authorization: `Bearer ${KEY}` } });
  assert.equal(res.status, 202, await res.text());

  const from = new Date(Date.now() - 30 * 60_000).toISOString();
  const to = new Date(Date.now() + 10 * 60_000).toISOString();
  let counts = {};
  await waitFor('every scenario counted', async () => {
    const json = await (await api(`/api/v1/metrics?name=traffic&field=events&group_by=event_type&from=${from}&to=${to}`)).json();
    counts = Object.fromEntries(json.series.map((s) => [s.tags.event_type, s.points.reduce((n, p) => n + p.v, 0)]));
    for (const [type, n] of Object.entries(expected)) {
      assert.ok((counts[type] ?? 0) <= n, `${type}: ${counts[type]} counted, ${n} tracked`);
    }
    return Object.entries(expected).every(([type, n]) => counts[type] === n);
  }, 90_000).catch((err) => {
    throw new Error(`${err.message}; counted ${JSON.stringify(counts)}, expected ${JSON.stringify(expected)}`);
  });
  assert.equal(counts.view, undefined, 'the rejected event is not counted');
});
