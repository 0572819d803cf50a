// Unit tests of the SDK's logic against a fake browser and a fake clock:
// batching, backoff, rejections, the queue cap, reloads, the unload beacon,
// sessions and UUIDv7 ordering.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { advance, fakeBrowser, loadSdk, settle, useFakeClock } from './env.mjs';

const URL_ = 'https://ingest.example.com';

async function started(t, options = {}, browser = {}) {
  useFakeClock(t);
  const page = fakeBrowser(browser);
  const sdk = await loadSdk();
  sdk.init({ url: URL_, key: 'k 1', ...options });
  await settle();
  return { page, sdk };
}

const sentIds = (page) => page.requests.flatMap((r) => r.lines.map((e) => e.event_id));

test('a batch goes out after 3 s, as NDJSON text with the key in the query', async (t) => {
  const { page, sdk } = await started(t);
  for (let i = 0; i < 49; i++) sdk.track('custom.tap', { n: i });
  await advance(2900);
  assert.equal(page.requests.length, 0, 'nothing before the interval');
  await advance(200);
  assert.equal(page.requests.length, 1);
  const [req] = page.requests;
  assert.equal(req.url, `${URL_}/v1/events?key=k%201`);
  assert.equal(req.init.headers['content-type'], 'text/plain;charset=UTF-8');
  assert.equal(req.init.keepalive, true);
  assert.deepEqual(req.lines.map((e) => e.n), [...Array(49).keys()]);
  const first = req.lines[0];
  assert.equal(first.event_type, 'custom.tap');
  assert.equal(first.device, 'web');
  assert.match(first.user_id, /^anon-/);
  assert.equal(typeof first.timestamp, 'number');
  assert.ok(first.session_id);
  await advance(10_000);
  assert.equal(page.requests.length, 1, 'answered events are not sent again');
  assert.equal(sdk.stats().queued, 0);
});

test('50 events or 32 KB send at once, and no batch is larger', async (t) => {
  const { page, sdk } = await started(t);
  for (let i = 0; i < 120; i++) sdk.track('custom.tap', { n: i });
  await advance(10);
  assert.deepEqual(page.requests.map((r) => r.lines.length), [50, 50, 20]);
  assert.deepEqual(page.requests.flatMap((r) => r.lines.map((e) => e.n)), [...Array(120).keys()]);

  page.requests.length = 0;
  const blob = 'x'.repeat(4000);
  for (let i = 0; i < 7; i++) sdk.track('custom.big', { blob });
  await advance(10);
  assert.equal(page.requests.length, 0, '7 events of 4 KB stay below 32 KB');
  sdk.track('custom.big', { blob });
  await advance(10);
  assert.ok(page.requests.length >= 1, 'the 8th event reaches 32 KB');
  await advance(3000);
  assert.equal(sentIds(page).length, 8);
  for (const r of page.requests) assert.ok(Buffer.byteLength(r.init.body) <= 32 * 1024);
});

test('maxBatch and flushIntervalMs are honoured', async (t) => {
  const { page, sdk } = await started(t, { maxBatch: 5, flushIntervalMs: 500 });
  for (let i = 0; i < 3; i++) sdk.track('custom.tap');
  await advance(400);
  assert.equal(page.requests.length, 0);
  await advance(200);
  assert.equal(page.requests.length, 1);
  for (let i = 0; i < 12; i++) sdk.track('custom.tap');
  await advance(10);
  assert.deepEqual(page.requests.map((r) => r.lines.length), [3, 5, 5, 2]);
});

test('5xx and network errors back off exponentially with jitter and honour Retry-After', async (t) => {
  let calls = 0;
  const { page, sdk } = await started(t, {}, {
    answer: () => {
      calls++;
      if (calls <= 4) return new Response('{"error":"store_unavailable"}', { status: 503 });
      if (calls == 5) throw new TypeError('Failed to fetch');
      if (calls == 6) return new Response('{}', { status: 503, headers: { 'retry-after': '20' } });
      return new Response('{"accepted":1,"duplicates":0,"rejected":[]}', { status: 202 });
    },
  });
  sdk.track('custom.tap');
  await advance(3000);
  assert.equal(page.requests.length, 1);
  await advance(120_000, 50);
  const at = page.requests.map((r) => r.at);
  const gaps = at.slice(1).map((t, i) => t - at[i]);
  assert.equal(page.requests.length, 7, `gaps ${gaps}`);
  // Attempt n waits between half and all of 1 s * 2^n.
  for (const [n, gap] of gaps.slice(0, 5).entries()) {
    const base = 1000 * 2 ** n;
    assert.ok(gap >= base / 2 && gap <= base + 100, `retry ${n}: ${gap} ms not in [${base / 2}, ${base}]`);
  }
  assert.ok(gaps[5] >= 20_000, `Retry-After 20 s honoured: ${gaps[5]}`);
  assert.deepEqual(new Set(sentIds(page)).size, 1, 'the same event each time');
  await advance(60_000, 1000);
  assert.equal(page.requests.length, 7, 'delivered: no more sends');
});

test('per-event rejections go to onReject once; the rest are done', async (t) => {
  const rejected = [];
  const { page, sdk } = await started(t, {
    onReject: (event, reason, error) => rejected.push({ event, reason, error }),
  }, {
    answer: () => new Response(JSON.stringify({
      accepted: 2, duplicates: 0,
      rejected: [{ index: 1, reason: 'missing_field', error: 'missing field `post_id`' }],
    }), { status: 202 }),
  });
  sdk.track('custom.a');
  sdk.track('view', {});
  sdk.track('custom.c');
  await advance(3000);
  assert.equal(rejected.length, 1);
  assert.equal(rejected[0].event.event_type, 'view');
  assert.equal(rejected[0].reason, 'missing_field');
  assert.equal(rejected[0].error, 'missing field `post_id`');
  await advance(30_000, 1000);
  assert.equal(page.requests.length, 1, 'rejected events are not retried');
});

test('a batch refused whole (400, 413) goes to onReject and is not retried, whatever onReject does', async (t) => {
  const rejected = [];
  t.mock.method(console, 'error', () => {});
  const { page, sdk } = await started(t, {
    onReject: (event, reason) => {
      rejected.push([event.properties.n, reason]);
      throw new Error('a failing callback');
    },
  }, {
    answer: (n) => n == 1
      ? new Response('{"accepted":0,"duplicates":0,"rejected":[{"index":0,"reason":"invalid_value","error":"bad"}]}', { status: 400 })
      : new Response('{"error":"request body exceeds 5242880 bytes"}', { status: 413 }),
  });
  sdk.track('custom.a', { properties: { n: 0 } });
  await sdk.flush();
  sdk.track('custom.b', { properties: { n: 1 } });
  sdk.track('custom.c', { properties: { n: 2 } });
  await sdk.flush();
  await advance(30_000, 1000);
  assert.deepEqual(rejected, [[0, 'invalid_value'], [1, 'http_413'], [2, 'http_413']]);
  assert.equal(page.requests.length, 2);
  assert.equal(sdk.stats().queued, 0);
});

test('a 401 stops sending, reports it and keeps the events', async (t) => {
  const errors = [];
  t.mock.method(console, 'error', (m) => errors.push(m));
  const { page, sdk } = await started(t, {}, {
    answer: () => new Response('{"error":"missing or invalid API key"}', { status: 401 }),
  });
  sdk.track('custom.a');
  await advance(3000);
  sdk.track('custom.b');
  await advance(60_000, 1000);
  assert.equal(page.requests.length, 1);
  assert.equal(sdk.stats().stopped, 'unauthorized');
  assert.equal(sdk.stats().queued, 2);
  assert.match(errors.join(), /401/);
});

test('offline, the queue keeps the newest 1,000 events and counts the dropped', async (t) => {
  const { page, sdk } = await started(t);
  page.navigator.onLine = false;
  for (let i = 0; i < 1005; i++) {
    sdk.track('custom.tap', { n: i });
    if (i % 100 == 0) await settle();
  }
  await advance(10_000, 1000);
  assert.equal(page.requests.length, 0, 'nothing is sent offline');
  assert.deepEqual(sdk.stats(), { queued: 1000, dropped: 5, stopped: undefined });
  page.navigator.onLine = true;
  page.dispatch('online');
  await advance(1000);
  const sent = page.requests.flatMap((r) => r.lines.map((e) => e.n));
  assert.deepEqual(sent, [...Array(1000).keys()].map((i) => i + 5), 'the oldest five went, in order');
});

test('the queue is capped at 5 MB, oldest first', async (t) => {
  const { page, sdk } = await started(t);
  page.navigator.onLine = false;
  const blob = 'y'.repeat(1024 * 1024);
  for (let i = 0; i < 6; i++) {
    sdk.track('custom.big', { n: i, blob });
    await settle();
  }
  assert.equal(sdk.stats().dropped, 2);
  assert.equal(sdk.stats().queued, 4);
  page.navigator.onLine = true;
  await sdk.flush();
  assert.deepEqual(page.requests.flatMap((r) => r.lines.map((e) => e.n)), [2, 3, 4, 5]);
});

test('events queued before a reload are sent by the next page', async (t) => {
  const { page, sdk } = await started(t);
  page.navigator.onLine = false;
  for (let i = 0; i < 10; i++) sdk.track('custom.tap', { n: i });
  await settle();
  await sdk.shutdown();
  page.navigator.onLine = true;
  const next = await loadSdk();
  next.init({ url: URL_, key: 'k' });
  await advance(3000);
  assert.deepEqual(page.requests.flatMap((r) => r.lines.map((e) => e.n)), [...Array(10).keys()]);
});

test('on pagehide the unsent events are beaconed in chunks of at most 64 KB, once', async (t) => {
  const { page, sdk } = await started(t);
  const blob = 'z'.repeat(3000);
  for (let i = 0; i < 40; i++) sdk.track('custom.bye', { n: i, blob });
  await advance(3100);
  assert.equal(page.requests.flatMap((r) => r.lines).length, 40);
  page.requests.length = 0;
  for (let i = 0; i < 30; i++) sdk.track('custom.bye', { n: 100 + i, blob });
  await settle();
  page.dispatch('pagehide');
  await settle();
  assert.ok(page.beacons.length >= 2, `${page.beacons.length} chunks`);
  for (const b of page.beacons) {
    assert.ok(Buffer.byteLength(b.body) <= 64 * 1024);
    assert.equal(b.url, `${URL_}/v1/events?key=k%201`);
  }
  const beaconed = page.beacons.flatMap((b) => b.body.split('\n').map((l) => JSON.parse(l).n));
  const fetched = page.requests.flatMap((r) => r.lines.map((e) => e.n));
  assert.deepEqual([...beaconed, ...fetched].sort((a, b) => a - b), [...Array(30).keys()].map((i) => 100 + i));
  // The next page finds nothing to send again.
  const next = await loadSdk();
  next.init({ url: URL_, key: 'k' });
  await advance(5000);
  assert.equal(page.requests.flatMap((r) => r.lines).length, fetched.length);
});

test('offline, a hidden then closed page beacons once and keeps its events for the next page', async (t) => {
  const { page, sdk } = await started(t);
  page.navigator.onLine = false;
  for (let i = 0; i < 3; i++) sdk.track('custom.bye', { n: i });
  await settle();
  globalThis.document.visibilityState = 'hidden';
  page.dispatch('visibilitychange');
  page.dispatch('pagehide');
  await settle();
  assert.equal(page.beacons.length, 1, 'beaconed once, not again on pagehide');
  assert.equal(sdk.stats().queued, 3, 'an untrusted beacon keeps the events');
  await sdk.shutdown();
  page.navigator.onLine = true;
  const next = await loadSdk();
  next.init({ url: URL_, key: 'k' });
  await advance(3000);
  assert.deepEqual(page.requests.flatMap((r) => r.lines.map((e) => e.n)), [0, 1, 2]);
});

test('a session ends after 30 minutes idle or 24 hours', async (t) => {
  const { page, sdk } = await started(t, { flushIntervalMs: 1000 });
  sdk.track('custom.a');
  await advance(10 * 60_000, 60_000);
  sdk.track('custom.b');
  await advance(31 * 60_000, 60_000);
  sdk.track('custom.c');
  await advance(2000);
  const sessions = page.requests.flatMap((r) => r.lines.map((e) => e.session_id));
  assert.equal(sessions.length, 3);
  assert.equal(sessions[0], sessions[1], '10 minutes idle is the same session');
  assert.notEqual(sessions[1], sessions[2], '31 minutes idle starts a new one');

  page.requests.length = 0;
  for (let i = 0; i < 75; i++) {
    sdk.track('custom.tick');
    await advance(20 * 60_000, 60_000);
  }
  const long = page.requests.flatMap((r) => r.lines.map((e) => e.session_id));
  assert.equal(long.length, 75);
  const changes = long.filter((s, i) => i > 0 && s !== long[i - 1]).length;
  assert.equal(changes, 1, 'a session active every 20 minutes for 25 hours is cut once, at 24 hours');
});

test('identify, page and profile make the event model\'s events', async (t) => {
  const { page, sdk } = await started(t);
  globalThis.location = { pathname: '/feed' };
  t.after(() => delete globalThis.location);
  sdk.identify('u42');
  sdk.page();
  sdk.profile({ country: 'DE', age_band: '25-34', segment: 'new' });
  await sdk.flush();
  const [view, prof] = page.requests.flatMap((r) => r.lines);
  assert.equal(view.event_type, 'page_view');
  assert.equal(view.page, '/feed');
  assert.equal(view.user_id, 'u42');
  assert.deepEqual([prof.event_type, prof.country, prof.age_band, prof.segment], ['profile_update', 'DE', '25-34', 'new']);
});

test('UUIDv7s are well-formed and sort in the order they were made', async (t) => {
  useFakeClock(t, 1_750_000_000_000);
  fakeBrowser();
  const { uuidv7 } = await loadSdk();
  const ids = [];
  for (let i = 0; i < 10_000; i++) ids.push(uuidv7());
  ids.push(uuidv7(Date.now() - 5000), uuidv7(Date.now() + 1), uuidv7(Date.now() + 2));
  for (const id of ids) assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.deepEqual([...ids].sort(), ids, 'sorted as made, within one millisecond and across a clock step back');
  assert.equal(new Set(ids).size, ids.length);
  assert.equal(parseInt(ids[0].replace(/-/g, '').slice(0, 12), 16), 1_750_000_000_000);
  const later = ids.at(-1).replace(/-/g, '');
  assert.ok(parseInt(later.slice(0, 12), 16) > 1_750_000_000_000);
});
