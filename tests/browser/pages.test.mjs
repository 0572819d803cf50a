// Browser tests of the dashboard's pages beyond the overview, against one
// real `tidemark demo`: each page shows live data within 30 s of the demo's
// start, the Trending and Ads pages show what the REST API answers for the
// same closed window, and an analyst is offered no Admin page and is told
// "not allowed" on its URL. Keeps a screenshot of every page at 1280 and
// 390 px wide in artifacts/ (dashboard-PAGE-WIDTH.png).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { bin, freePort, launchChromium, root, waitFor } from './harness.mjs';

const artifacts = join(root, 'artifacts');
const ANALYST = { name: 'ana', password: 'analyst-password-1' };
let demo, dataDir, base, admin, adminToken, browser, started;

before(async () => {
  const port = await freePort();
  dataDir = mkdtempSync(join(tmpdir(), 'tidemark-pages-'));
  base = `http://127.0.0.1:${port}`;
  started = Date.now();
  demo = spawn(bin, ['demo', '--listen', `127.0.0.1:${port}`, '--data-dir', dataDir,
    '--web-dir', join(root, 'dashboards', 'web', 'dist'), '--rate', '2000'], { stdio: ['ignore', 'pipe', 'inherit'] });
  let printed = '';
  demo.stdout.on('data', (chunk) => {
    printed += chunk;
  });
  await waitFor('health', async () => (await fetch(`${base}/api/v1/health`)).ok, 30_000);
  const [, name, password] = await waitFor('the demo admin', async () =>
    printed.match(/Log in as (\S+) with password (\S+)/), 30_000);
  admin = { name, password };
  adminToken = (await post('/api/v1/auth/login', admin)).access_token;
  const put = await fetch(`${base}/api/v1/users/${ANALYST.name}`, {
    method: 'PUT',
    headers: { authorization: `Bearer ${adminToken}`, 'content-type': 'application/json' },
    body: JSON.stringify({ role: 'analyst', password: ANALYST.password }),
  });
  assert.ok(put.ok, `adding the analyst: ${put.status}`);
  browser = await launchChromium();
  mkdirSync(artifacts, { recursive: true });
});

after(async () => {
  if (browser) await browser.close();
  if (demo) {
    const exited = new Promise((ok) => (demo.exitCode !== null ? ok() : demo.once('exit', ok)));
    demo.kill('SIGTERM');
    await exited;
  }
  if (dataDir) rmSync(dataDir, { recursive: true, force: true, maxRetries: 3 });
});

async function post(path, body) {
  const response = await fetch(base + path, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  assert.ok(response.ok, `${path}: ${response.status}`);
  return response.json();
}

async function rest(path) {
  const response = await fetch(base + path, { headers: { authorization: `Bearer ${adminToken}` } });
  assert.ok(response.ok, `${path}: ${response.status}`);
  return response.json();
}

/** A page logged in as `who`, opened at `path`. */
async function open(path, who = admin, width = 1280, colorScheme = 'dark') {
  const page = await browser.newPage({ viewport: { width, height: 900 }, colorScheme });
  page.on('pageerror', (e) => console.error('page error:', e.message));
  await page.goto(base + path);
  await page.getByLabel('Name').fill(who.name);
  await page.getByLabel('Password').fill(who.password);
  await page.getByRole('button', { name: 'Log in' }).click();
  await waitFor('the dashboard', async () => (await page.getByTestId('signed-in-as').count()) > 0, 10_000);
  return page;
}

/** Both widths' screenshots of the page at `path`, after `prepare` on each. */
async function screenshots(name, path, prepare = async () => {}) {
  // The wide one in the dark theme, the narrow one in the light theme.
  for (const [width, colorScheme] of [[1280, 'dark'], [390, 'light']]) {
    const page = await open(path, admin, width, colorScheme);
    await prepare(page);
    await page.waitForTimeout(1000);
    await page.screenshot({ path: join(artifacts, `dashboard-${name}-${width}.png`), fullPage: true });
    await page.close();
  }
}

const withinStartup = () => Math.max(1_000, 30_000 - (Date.now() - started));

/** Each page's first live data, as a probe of the open page. */
const firstData = {
  '/trending': async (page) => (await page.locator('[data-testid=trending-table] tr[data-tag]').count()) > 0,
  // Today's totals count closed minutes only; the open minute is live from the first events.
  '/ads': async (page) => (await page.locator('tr[data-campaign-now]').count()) > 0,
};

test('every page shows live data within 30 s of the start', async () => {
  await Promise.all(Object.entries(firstData).map(async ([path, probe]) => {
    const page = await open(path);
    await waitFor(`live data on ${path}`, () => probe(page), withinStartup());
    assert.ok(Date.now() - started <= 30_000, `${path} showed live data within 30 s of start`);
    await page.close();
  }));
});

test('trending: a tag\'s history opens on a click', async () => {
  const page = await open('/trending');
  await waitFor('trending rows', () => firstData['/trending'](page), 30_000);
  await page.locator('tr[data-tag]').first().click();
  await waitFor('the tag history', async () =>
    Number(await page.getByTestId('tag-rank-chart').getAttribute('data-points')) > 0, 20_000);
  await page.close();
});

test('trending shows the REST answer for the last closed 1-minute window', async () => {
  const page = await open('/trending');
  await page.getByRole('button', { name: '1 minute' }).click();
  await page.getByRole('button', { name: 'Last closed window' }).click();
  const deadline = Date.now() + 150_000;
  let mismatch;
  let shown;
  while (Date.now() < deadline) {
    shown = await page.getByTestId('trending-table').evaluate((table) => ({
      start: table.dataset.start,
      final: table.dataset.final,
      rows: [...table.querySelectorAll('tr[data-tag]')].map((tr) => ({
        tag: tr.dataset.tag,
        rank: Number(tr.querySelector('[data-field=rank]').textContent.replace(/,/g, '')),
        score: Number(tr.querySelector('[data-field=score]').dataset.value),
        users: Number(tr.querySelector('[data-field=users]').dataset.value),
        events: Number(tr.querySelector('[data-field=events]').dataset.value),
        text: tr.querySelector('[data-field=events]').textContent,
      })),
    }));
    if (shown.final === 'true' && shown.rows.length > 0) {
      const answer = await rest(`/api/v1/trending?window=1m&limit=50&at=${encodeURIComponent(shown.start)}`);
      const expected = answer.tags.map(({ tag, rank, score, users, events }) => ({ tag, rank, score, users, events }));
      const got = shown.rows.map(({ text, ...row }) => row);
      for (const row of shown.rows) assert.equal(row.text.replace(/,/g, ''), String(row.events));
      if (answer.final && answer.start === shown.start && JSON.stringify(got) === JSON.stringify(expected)) {
        await page.close();
        return;
      }
      mismatch = { start: shown.start, got: got.slice(0, 3), expected: expected.slice(0, 3) };
    }
    await page.waitForTimeout(1000);
  }
  assert.fail(`no closed window equal to REST's: ${JSON.stringify(mismatch ?? { ...shown, rows: shown?.rows.length })}`);
});

test('trending screenshots', async () => {
  await screenshots('trending', '/trending', async (page) => {
    await waitFor('trending rows', async () => (await page.locator('tr[data-tag]').count()) > 0, 30_000);
    await page.locator('tr[data-tag]').first().click();
    await waitFor('the tag history', async () =>
      Number(await page.getByTestId('tag-rank-chart').getAttribute('data-points')) > 0, 20_000);
  });
});

test('ads shows today\'s campaigns equal to REST for the same closed minutes', async () => {
  const page = await open('/ads');
  await waitFor('campaign rows', async () => (await page.locator('tr[data-campaign]').count()) > 0, 120_000);
  const fields = ['impressions', 'clicks', 'conversions', 'spend', 'revenue', 'ctr', 'cvr', 'cpa', 'roas'];
  const deadline = Date.now() + 120_000;
  let mismatch;
  while (Date.now() < deadline) {
    const shown = await page.getByTestId('campaigns-table').evaluate((table, names) => ({
      day: table.dataset.day,
      minute: table.dataset.minute,
      final: table.dataset.final,
      rows: Object.fromEntries([...table.querySelectorAll('tr[data-campaign]')].map((tr) => [tr.dataset.campaign,
        Object.fromEntries(names.map((f) => {
          const raw = tr.querySelector(`[data-field=${f}]`).dataset.value;
          return [f, raw === '' ? null : Number(raw)];
        }))])),
    }), fields);
    if (shown.minute) {
      // Today's totals count the closed minutes of the day: up to the newest
      // minute, or through it once it has closed.
      const minute = Date.parse(shown.minute);
      const to = new Date(shown.final === 'true' ? minute + 60_000 : minute).toISOString();
      const answer = await rest(`/api/v1/campaigns?from=${encodeURIComponent(shown.day)}&to=${encodeURIComponent(to)}`);
      const expected = Object.fromEntries(answer.campaigns.filter((c) => c.impressions > 0 || c.clicks > 0 || c.spend > 0)
        .map((c) => [c.campaign_id, Object.fromEntries(fields.map((f) => [f, c[f]]))]));
      const close = (a, b) => (a === null || b === null ? a === b : Math.abs(a - b) <= 1e-9 * Math.max(1, Math.abs(b)));
      const same = Object.keys(expected).length > 0
        && Object.keys(expected).length === Object.keys(shown.rows).length
        && Object.entries(expected).every(([id, want]) => shown.rows[id] && fields.every((f) => close(shown.rows[id][f], want[f])));
      if (same) {
        // The numbers are written the same way they are stored.
        const first = Object.keys(expected)[0];
        const text = await page.locator(`tr[data-campaign="${first}"] [data-field=impressions]`).innerText();
        assert.equal(text.replace(/,/g, ''), String(expected[first].impressions));
        await page.close();
        return;
      }
      mismatch = { minute: shown.minute, final: shown.final, shown: shown.rows, expected };
    }
    await page.waitForTimeout(1000);
  }
  assert.fail(`the campaigns table never equalled REST's: ${JSON.stringify(mismatch)}`);
});

test('ads: a campaign\'s page shows its funnel and its last hour by device and country', async () => {
  const page = await open('/ads');
  await waitFor('campaign rows', async () => (await page.locator('tr[data-campaign]').count()) > 0, 30_000);
  const sortedBefore = await page.locator('tr[data-campaign]').evaluateAll((rows) => rows.map((r) => r.dataset.campaign));
  await page.getByRole('button', { name: /^Campaign/ }).click();
  const sortedById = await page.locator('tr[data-campaign]').evaluateAll((rows) => rows.map((r) => r.dataset.campaign));
  assert.deepEqual(sortedById, [...sortedBefore].sort((a, b) => b.localeCompare(a, 'en', { numeric: true })));
  await page.locator('tr[data-campaign] a').first().click();
  await waitFor('the funnel', async () =>
    Number(await page.locator('[data-step=impressions]').getAttribute('data-value')) > 0, 30_000);
  await waitFor('the device chart', async () =>
    Number(await page.getByTestId('campaign-device-chart').getAttribute('data-points')) > 0, 90_000);
  await waitFor('the country chart', async () =>
    Number(await page.getByTestId('campaign-country-chart').getAttribute('data-points')) > 0, 30_000);
  assert.ok((await page.locator('[data-testid=campaign-by-device] tr[data-split]').count()) > 0);
  await page.close();
});

test('ads screenshots', async () => {
  await screenshots('ads', '/ads', async (page) => {
    await waitFor('campaign rows', async () => (await page.locator('tr[data-campaign]').count()) > 0, 30_000);
  });
  const id = (await rest('/api/v1/campaigns')).campaigns[0].campaign_id;
  await screenshots('campaign', `/ads/${id}`, async (page) => {
    await waitFor('the device chart', async () =>
      Number(await page.getByTestId('campaign-device-chart').getAttribute('data-points')) > 0, 90_000);
  });
});
