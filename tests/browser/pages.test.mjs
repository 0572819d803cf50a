// Browser tests of the dashboard's pages beyond the overview, against one
// real `tidemark demo`: each page shows live data within 30 s of the demo's
// start, the Trending and Ads pages show what the REST API answers for the
// same closed window, and an analyst is offered no Admin page and is told
// "not allowed" on its URL. One measures how busy 50 live trending rows keep
// the main thread (printed as a JSON line). The last test freezes, stops and
// restarts the demo on the same port and data folder, for the stale tiles,
// the reconnecting badge and the resubscription. Keeps a screenshot of every
// page at 1280 and 390 px wide in both themes in artifacts/
// (PAGE-WIDTH-THEME.png).
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { bin, freePort, launchChromium, root, waitFor } from './harness.mjs';

const artifacts = join(root, 'artifacts');
const ANALYST = { name: 'ana', password: 'analyst-password-1' };
let demo, port, dataDir, base, admin, adminToken, browser, started;

/** Starts `tidemark demo` on `port` over `dataDir`; resolves to its admin once it answers. */
async function startDemo() {
  demo = spawn(bin, ['demo', '--listen', `127.0.0.1:${port}`, '--data-dir', dataDir,
    '--web-dir', join(root, 'dashboards', 'web', 'dist'), '--rate', '2000'], { stdio: ['ignore', 'pipe', 'inherit'] });
  let printed = '';
  demo.stdout.on('data', (chunk) => {
    printed += chunk;
  });
  await waitFor('health', async () => (await fetch(`${base}/api/v1/health`)).ok, 30_000);
  const [, name, password] = await waitFor('the demo admin', async () =>
    printed.match(/Log in as (\S+) with password (\S+)/), 30_000);
  return { name, password };
}

before(async () => {
  port = await freePort();
  dataDir = mkdtempSync(join(tmpdir(), 'tidemark-pages-'));
  base = `http://127.0.0.1:${port}`;
  // A rule that fires in every window with views, so the Alerts page, its
  // history and the banner have something to show.
  writeFileSync(join(dataDir, 'alert-rules.toml'), [
    '[[rule]]', 'name = "views_seen"', 'kind = "threshold"', 'measurement = "traffic"', 'field = "events"',
    'where = { event_type = "view" }', 'op = ">="', 'value = 1', 'summary = "Views are coming in"', '',
  ].join('\n'));
  started = Date.now();
  admin = await startDemo();
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
  if (demo && demo.exitCode === null && demo.signalCode === null) {
    const exited = new Promise((ok) => demo.once('exit', ok));
    demo.kill('SIGCONT');
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

const LAYOUTS = [[1280, 'dark'], [1280, 'light'], [390, 'dark'], [390, 'light']];

/** The page at `path` at both widths in both themes, after `prepare` on each. */
async function screenshots(name, path, prepare = async () => {}) {
  for (const [width, colorScheme] of LAYOUTS) {
    const page = await open(path, admin, width, colorScheme);
    await prepare(page);
    await settle(page);
    await page.screenshot({ path: join(artifacts, `${name}-${width}-${colorScheme}.png`), fullPage: true });
    await page.close();
  }
}

/**
 * Waits until the socket is live, every chart on the page has drawn its
 * points, fonts are in and the page has stopped growing (a full-page shot is
 * as tall as the page was when it began), with the pointer off the page (no
 * row shown as hovered).
 */
async function settle(page) {
  await page.mouse.move(0, 0);
  await waitFor('the socket live', async () =>
    (await page.getByTestId('ws-status').getAttribute('data-status')) === 'live', 10_000);
  await page.evaluate(() => document.fonts.ready);
  await waitFor('charts drawn', () => page.evaluate(() =>
    [...document.querySelectorAll('[data-points]')].every((c) => Number(c.dataset.points) === 0 || c.querySelector('svg'))), 10_000);
  let height = -1;
  await waitFor('the page\'s height to settle', async () => {
    const now = await page.evaluate(() => document.documentElement.scrollHeight);
    const same = now === height;
    height = now;
    if (!same) await page.waitForTimeout(250);
    return same;
  }, 10_000);
}

/** Whether the page is wider than its viewport (something overflows sideways). */
async function overflowsSideways(page) {
  return page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth + 1);
}

const withinStartup = () => Math.max(1_000, 30_000 - (Date.now() - started));

/** Each page's first live data, as a probe of the open page. */
const firstData = {
  '/trending': async (page) => (await page.locator('[data-testid=trending-table] tr[data-tag]').count()) > 0,
  // Today's totals count closed minutes only; the open minute is live from the first events.
  '/ads': async (page) => (await page.locator('tr[data-campaign-now]').count()) > 0,
  '/engagement': async (page) => (await page.locator('[data-testid=engagement-by-segment] tr[data-group]').count()) > 0
    && (await page.getByTestId('engagement-value-active_sessions').innerText()).replace(/[^0-9]/g, '') !== '',
  '/admin': async (page) => (await page.locator('[data-testid=admin-users] tr[data-user]').count()) > 0
    && (await page.locator('[data-testid=audit-table] tr[data-action]').count()) > 0,
};

/**
 * The query page's data is its answer to the default query over the last
 * hour; queries read stored (closed) minutes only, so the first may come
 * after the first half minute.
 */
async function queryAnswered(page) {
  if ((await page.getByTestId('query-result').getAttribute('data-outcome')) === 'none') {
    await page.getByRole('button', { name: 'Run' }).click();
  }
  if ((await page.locator('[data-testid=query-rows] tbody tr').count()) > 0) return true;
  await page.waitForTimeout(1000);
  await page.getByRole('button', { name: 'Run' }).click();
  return false;
}

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
  });
  await screenshots('trending-tag', '/trending', async (page) => {
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
    for (const chart of ['campaign-device-chart', 'campaign-country-chart']) {
      await waitFor(chart, async () => Number(await page.getByTestId(chart).getAttribute('data-points')) > 0, 90_000);
    }
  });
});

test('engagement shows sessions by segment and country and a chart per metric', async () => {
  const page = await open('/engagement');
  await waitFor('engagement by segment', () => firstData['/engagement'](page), 30_000);
  assert.ok((await page.locator('[data-testid=engagement-by-country] tr[data-group]').count()) > 0);
  await waitFor('the active sessions chart', async () =>
    Number(await page.getByTestId('engagement-chart-active_sessions').getAttribute('data-points')) > 0, 90_000);
  // Hours appear once closed, so a new demo's last day may be empty yet; it must still draw.
  await page.getByRole('button', { name: 'Last day' }).click();
  await waitFor('the hourly chart', async () =>
    (await page.getByTestId('engagement-chart-active_sessions').locator('svg').count()) > 0, 10_000);
  await page.close();
});

test('query shows rows, truncation, error codes and a timeout', async () => {
  const page = await open('/query');
  // Tables are listed with their columns (the traffic table's shown open).
  await waitFor('tables and columns', async () => {
    const text = await page.getByTestId('query-tables').textContent();
    return ['traffic', 'campaign_id', 'event_type', 'engagement'].every((name) => text.includes(name)) || null;
  }, 10_000).catch(async () => assert.fail(await page.getByTestId('query-tables').innerText()));
  await waitFor('query rows', () => queryAnswered(page), 60_000);
  const sql = page.getByLabel('SQL (SQLite dialect, read-only)');
  const run = async (text) => {
    await sql.fill(text);
    await page.getByRole('button', { name: 'Run' }).click();
    await waitFor('the query to finish', async () =>
      (await page.getByRole('button', { name: 'Run' }).isEnabled()), 20_000);
  };
  const hourAgo = new Date(Date.now() - 3_600_000).toISOString();
  // A self-join of the last hour's traffic has more rows than the page's limit of 1,000.
  await run(`SELECT a.events FROM traffic a, traffic b WHERE a.time >= '${hourAgo}' AND b.time >= '${hourAgo}'`);
  await waitFor('truncated', async () => (await page.getByTestId('query-truncated').count()) > 0, 10_000);
  await run('SELECT * FROM traffic');
  await waitFor('an error code', async () =>
    (await page.getByTestId('query-error').getAttribute('data-code')) === 'time_filter_required', 10_000);
  assert.match(await page.getByTestId('query-error').innerText(), /time_filter_required/);
  await page.getByLabel('Timeout').selectOption('1');
  // Four of them take far longer than a second.
  await run(`SELECT count(*) FROM traffic a, traffic b, traffic c, traffic d WHERE a.time >= '${hourAgo}'`
    + ` AND b.time >= '${hourAgo}' AND c.time >= '${hourAgo}' AND d.time >= '${hourAgo}'`);
  await waitFor('a timeout', async () => (await page.getByTestId('query-timeout').count()) > 0, 15_000);
  assert.match(await page.getByTestId('query-timeout').innerText(), /Timed out/);
  await page.close();
});

test('admin lists users, creates a token shown once, revokes it, and filters the audit log', async () => {
  const page = await open('/admin');
  await waitFor('users and audit entries', () => firstData['/admin'](page), 30_000);
  assert.ok(await page.locator(`tr[data-user="${ANALYST.name}"]`).count() > 0);
  assert.match(await page.getByTestId('served-database').innerText(), /tidemark/);
  // A new demo has promoted nothing: the history says so rather than showing an empty table.
  await waitFor('the promote history', async () => (await page.getByTestId('serving-history-empty').count()) > 0, 10_000);
  await page.getByLabel('Token name').fill('grafana');
  await page.getByLabel('Token role').selectOption('analyst');
  await page.getByRole('button', { name: 'Create token' }).click();
  const token = await waitFor('the new token', async () => {
    const text = (await page.getByTestId('new-token-value').count()) > 0 && await page.getByTestId('new-token-value').innerText();
    return text && text.startsWith('tmk_') ? text : null;
  }, 10_000);
  // The token works, and after revoking it no longer does.
  assert.equal((await fetch(`${base}/api/v1/auth/me`, { headers: { authorization: `Bearer ${token}` } })).status, 200);
  page.once('dialog', (d) => d.accept());
  await page.locator('[data-testid=admin-tokens] tr[data-token]').first().getByRole('button', { name: 'Revoke' }).click();
  await waitFor('the token gone', async () => (await page.locator('tr[data-token]').count()) === 0, 10_000);
  assert.equal((await fetch(`${base}/api/v1/auth/me`, { headers: { authorization: `Bearer ${token}` } })).status, 401);
  await page.getByRole('button', { name: 'Refresh' }).click();
  await page.getByLabel('Audit action').selectOption('token_create');
  await waitFor('the filtered audit log', async () => {
    const actions = await page.locator('[data-testid=audit-table] tr[data-action]').evaluateAll((rows) => rows.map((r) => r.dataset.action));
    return actions.length > 0 && actions.every((a) => a === 'token_create');
  }, 10_000);
  await page.close();
});

test('an analyst is not offered Admin and is told "not allowed" on its URL', async () => {
  const page = await open('/', ANALYST);
  const offered = await page.getByRole('navigation', { name: 'Pages' }).getByRole('link').allInnerTexts();
  assert.deepEqual(offered, ['Overview', 'Trending', 'Ads', 'Engagement', 'Alerts', 'Query']);
  await page.goto(`${base}/admin`);
  await page.getByLabel('Name').fill(ANALYST.name);
  await page.getByLabel('Password').fill(ANALYST.password);
  await page.getByRole('button', { name: 'Log in' }).click();
  await waitFor('not allowed', async () => (await page.getByTestId('not-allowed').count()) > 0, 10_000);
  assert.match(await page.getByTestId('not-allowed').innerText(), /Not allowed/);
  assert.equal(new URL(page.url()).pathname, '/admin');
  await page.close();
  for (const [width, colorScheme] of LAYOUTS) {
    const shot = await browser.newPage({ viewport: { width, height: 900 }, colorScheme });
    await shot.goto(`${base}/admin`);
    await shot.getByLabel('Name').fill(ANALYST.name);
    await shot.getByLabel('Password').fill(ANALYST.password);
    await shot.getByRole('button', { name: 'Log in' }).click();
    await waitFor('not allowed', async () => (await shot.getByTestId('not-allowed').count()) > 0, 10_000);
    await settle(shot);
    await shot.screenshot({ path: join(artifacts, `not-allowed-${width}-${colorScheme}.png`), fullPage: true });
    await shot.close();
  }
});

test('login screenshots', async () => {
  for (const [width, colorScheme] of LAYOUTS) {
    const page = await browser.newPage({ viewport: { width, height: 900 }, colorScheme });
    await page.goto(`${base}/login`);
    await page.getByLabel('Name').waitFor();
    await page.screenshot({ path: join(artifacts, `login-${width}-${colorScheme}.png`), fullPage: true });
    await page.close();
  }
});

test('no page is wider than a 390 px screen', async () => {
  const paths = ['/', '/trending', '/ads', '/engagement', '/alerts', '/query', '/admin'];
  for (const path of paths) {
    const page = await open(path, admin, 390, 'light');
    await waitFor(`live data on ${path}`, async () => !firstData[path] || firstData[path](page), 30_000);
    assert.equal(await overflowsSideways(page), false, `${path} is wider than 390 px`);
    await page.close();
  }
});

test('engagement, query and admin screenshots', async () => {
  await screenshots('overview', '/', async (page) => {
    await waitFor('events/s', async () => Number((await page.getByTestId('events-per-sec').innerText()).replace(/[^0-9.]/g, '')) > 0, 30_000);
  });
  await screenshots('engagement', '/engagement', async (page) => {
    await waitFor('the active sessions chart', async () =>
      Number(await page.getByTestId('engagement-chart-active_sessions').getAttribute('data-points')) > 0, 60_000);
  });
  await screenshots('query', '/query', async (page) => {
    await waitFor('query rows', () => queryAnswered(page), 30_000);
  });
  // A query whose SQL holds a long unbroken literal: its audit entry's
  // detail must wrap inside the card, at every width.
  const response = await fetch(`${base}/api/v1/query`, {
    method: 'POST',
    headers: { authorization: `Bearer ${adminToken}`, 'content-type': 'application/json' },
    body: JSON.stringify({
      sql: `SELECT count(*) AS n FROM traffic WHERE time >= '${new Date(Date.now() - 3_600_000).toISOString()}'`
        + ` AND event_type <> '${'no_such_event_type_'.repeat(12)}'`,
    }),
  });
  assert.ok(response.ok, `the long query: ${response.status}`);
  await screenshots('admin', '/admin', async (page) => {
    await waitFor('users and audit entries', () => firstData['/admin'](page), 30_000);
    await waitFor('the long query in the audit log', async () =>
      (await page.getByTestId('audit-table').innerText()).includes('no_such_event_type_no_such'), 10_000);
    const box = await page.getByTestId('audit-table').evaluate((table) => {
      const scroll = table.closest('.table-scroll');
      return { table: table.scrollWidth, shown: scroll.clientWidth };
    });
    assert.ok(box.table <= box.shown, `the audit table is ${box.table} px wide in ${box.shown} px`);
  });
});

test('alerts: a firing rule is listed live, in the history and as a banner on other pages', async () => {
  const page = await open('/alerts');
  await waitFor('the rule', async () => (await page.locator('[data-rule="views_seen"]').count()) === 1, 30_000);
  // The first window closes a minute after its end (the allowed lateness).
  await waitFor('views_seen firing', async () =>
    (await page.locator('[data-alert="views_seen"] .state-firing').count()) === 1, 240_000);
  // Stored once the writer's batch is in.
  const history = await waitFor('the stored alerts', async () => {
    const answer = await fetch(`${base}/api/v1/alerts?rule=views_seen`, {
      headers: { authorization: `Bearer ${adminToken}` },
    }).then((r) => r.json());
    return answer.alerts.length > 0 && answer;
  }, 30_000);
  assert.ok(history.alerts.every((a) => a.state === 'firing' && a.rule === 'views_seen'), JSON.stringify(history));
  await waitFor('the history table', async () =>
    (await page.getByTestId('alerts-history').innerText()).includes('views_seen'), 60_000);
  await page.close();
  const overview = await open('/');
  await waitFor('the banner', async () =>
    (await overview.getByTestId('alert-banner').count()) === 1
    && (await overview.getByTestId('alert-banner').innerText()).includes('views_seen'), 30_000);
  await overview.close();
  await screenshots('alerts', '/alerts', async (p) => {
    await waitFor('views_seen firing', async () =>
      (await p.locator('[data-alert="views_seen"] .state-firing').count()) === 1, 30_000);
  });
});

test('50 trending rows updating live leave the main thread idle most of the time', async () => {
  const page = await open('/trending');
  await page.getByRole('button', { name: '15 minutes' }).click();
  const rows = await waitFor('50 trending rows', async () => {
    const n = await page.locator('[data-testid=trending-table] tr[data-tag]').count();
    return n >= 50 ? n : null;
  }, 90_000);
  let updates = 0;
  const counting = { on: false };
  // The socket is already open, so its frames are counted through CDP.
  const cdp = await page.context().newCDPSession(page);
  await cdp.send('Network.enable');
  cdp.on('Network.webSocketFrameReceived', ({ response }) => {
    if (counting.on && response.payloadData.includes('"channel":"trending:15m"')) updates += 1;
  });
  await cdp.send('Performance.enable', { timeDomain: 'timeTicks' });
  const metrics = async () => Object.fromEntries((await cdp.send('Performance.getMetrics')).metrics.map((m) => [m.name, m.value]));
  await page.evaluate(() => {
    window.__longTasks = [];
    new PerformanceObserver((list) => window.__longTasks.push(...list.getEntries().map((e) => e.duration)))
      .observe({ type: 'longtask', buffered: false });
  });
  const seconds = 15;
  const before = await metrics();
  counting.on = true;
  const wallStart = Date.now();
  await new Promise((ok) => setTimeout(ok, seconds * 1000)); // the measurement's span, not a synchronisation
  counting.on = false;
  const after = await metrics();
  const wall = (Date.now() - wallStart) / 1000;
  const busy = after.TaskDuration - before.TaskDuration;
  const longTasks = await page.evaluate(() => window.__longTasks);
  const figure = {
    measure: 'trending_main_thread_busy',
    rows,
    seconds: Number(wall.toFixed(2)),
    channel_updates_per_second: Number((updates / wall).toFixed(2)),
    busy_seconds: Number(busy.toFixed(3)),
    busy_fraction: Number((busy / wall).toFixed(4)),
    script_seconds: Number((after.ScriptDuration - before.ScriptDuration).toFixed(3)),
    layout_seconds: Number((after.LayoutDuration - before.LayoutDuration).toFixed(3)),
    long_tasks: longTasks.length,
    longest_task_ms: Math.round(Math.max(0, ...longTasks)),
  };
  console.log(JSON.stringify(figure));
  assert.ok(rows >= 50, `${rows} rows`);
  assert.ok(figure.channel_updates_per_second >= 2, `the list updated ${figure.channel_updates_per_second} times a second`);
  assert.ok(figure.busy_fraction < 0.5, `the main thread was busy ${(figure.busy_fraction * 100).toFixed(1)} % of the time`);
  await cdp.detach();
  await page.close();
});

test('tiles say when they are stale and the badge when the connection is lost', async () => {
  const page = await open('/trending');
  await waitFor('trending rows', () => firstData['/trending'](page), 30_000);
  await waitFor('live', async () => (await page.getByTestId('ws-status').getAttribute('data-status')) === 'live', 10_000);
  assert.equal(await page.locator('[data-stale=true]').count(), 0);
  // A frozen server sends nothing: after 5 s without an update the tile says so.
  demo.kill('SIGSTOP');
  try {
    await waitFor('a stale tile', async () => (await page.locator('[data-testid=trending-tile] [data-stale=true]').count()) > 0, 15_000);
    assert.match(await page.getByTestId('trending-tile').innerText(), /stale: no update for/);
  } finally {
    demo.kill('SIGCONT');
  }
  await waitFor('fresh again', async () => (await page.locator('[data-testid=trending-tile] [data-stale=true]').count()) === 0, 20_000);
  // A server gone: the badge counts down to the next try.
  const exited = new Promise((ok) => demo.once('exit', ok));
  demo.kill('SIGTERM');
  await exited;
  await waitFor('reconnecting', async () => (await page.getByTestId('ws-status').getAttribute('data-status')) === 'retrying', 10_000);
  assert.match(await page.getByTestId('ws-status').innerText(), /reconnecting in \d+s/);

  // The same server again, on the same port and data: the page reconnects,
  // subscribes again and shows new updates, with the session it had (the
  // signing key is kept in the data folder).
  const snapshotAfterRestart = new Promise((ok) => page.on('websocket', (ws) => ws.on('framereceived', ({ payload }) => {
    if (typeof payload === 'string' && payload.includes('"type":"snapshot"') && payload.includes('"channel":"trending:')) ok();
  })));
  const stoppedAt = Date.now();
  admin = await startDemo();
  adminToken = (await post('/api/v1/auth/login', admin)).access_token;
  await waitFor('live again', async () => (await page.getByTestId('ws-status').getAttribute('data-status')) === 'live', 40_000);
  await snapshotAfterRestart;
  await waitFor('an update after the restart', async () =>
    Number(await page.getByTestId('trending-tile').getAttribute('data-updated-at')) > stoppedAt, 30_000);
  await waitFor('fresh after the restart', async () =>
    (await page.locator('[data-testid=trending-tile] [data-stale=true]').count()) === 0, 30_000);
  assert.equal(new URL(page.url()).pathname, '/trending', 'still signed in on the same page');
  await page.close();
});
