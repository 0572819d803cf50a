// End-to-end browser test: starts `tidemark demo` on a free loopback port,
// logs in with the admin it prints, and checks in headless Chromium that the
// dashboard counts its own view with the SDK and shows non-zero live counts
// within 30 s. Keeps screenshots in artifacts/ (login.png, dashboard.png).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { bin, freePort, launchChromium, root, waitFor } from './harness.mjs';

test('demo dashboard shows live counts within 30 s', async (t) => {
  const port = await freePort();
  const dataDir = mkdtempSync(join(tmpdir(), 'tidemark-demo-'));
  const demo = spawn(bin, ['demo', '--listen', `127.0.0.1:${port}`, '--data-dir', dataDir,
    '--web-dir', join(root, 'dashboards', 'web', 'dist'), '--rate', '2000'], { stdio: ['ignore', 'pipe', 'inherit'] });
  let printed = '';
  demo.stdout.on('data', (chunk) => {
    printed += chunk;
    process.stdout.write(chunk);
  });
  let browser;
  t.after(async () => {
    if (browser) await browser.close();
    const exited = new Promise((ok) => (demo.exitCode !== null ? ok() : demo.once('exit', ok)));
    demo.kill('SIGTERM');
    await exited;
    rmSync(dataDir, { recursive: true, force: true, maxRetries: 3 });
  });
  const started = Date.now();
  const base = `http://127.0.0.1:${port}`;
  await waitFor('health', async () => (await fetch(`${base}/api/v1/health`)).ok, 30_000);

  browser = await launchChromium();
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const [, user, password] = await waitFor('the demo admin', async () =>
    printed.match(/Log in as (\S+) with password (\S+)/), 30_000);

  // Without a session the dashboard is the login page, and its data is not
  // served to anyone without a token.
  assert.equal((await fetch(`${base}/api/v1/metrics?name=traffic&field=events`)).status, 401);
  await page.goto(base + '/');
  await page.getByLabel('Name').fill(user);
  await page.getByLabel('Password').fill('not the password');
  await page.getByRole('button', { name: 'Log in' }).click();
  await waitFor('a refused login', async () => (await page.getByRole('alert').count()) > 0, 10_000);
  assert.match(await page.getByRole('alert').innerText(), /wrong name or password/);
  assert.equal(new URL(page.url()).pathname, '/login');
  mkdirSync(join(root, 'artifacts'), { recursive: true });
  await page.screenshot({ path: join(root, 'artifacts', 'login.png') });
  await page.getByLabel('Password').fill(password);
  // The dashboard counts its own view with the SDK, posting to its own origin.
  const viewPosted = page.waitForResponse((r) => new URL(r.url()).pathname === '/v1/events', { timeout: 20_000 });
  await page.getByRole('button', { name: 'Log in' }).click();
  await waitFor('the dashboard', async () => (await page.getByTestId('signed-in-as').count()) > 0, 10_000);
  assert.match(await page.getByTestId('signed-in-as').innerText(), /demo \(admin\)/);
  const posted = await viewPosted;
  assert.equal(posted.status(), 202, await posted.text());
  const view = JSON.parse(posted.request().postData().split('\n')[0]);
  assert.equal(view.event_type, 'page_view');
  assert.equal(view.user_id, 'dashboard:demo');
  const number = async (testId) => {
    const text = await page.getByTestId(testId).first().innerText();
    return Number(text.replace(/[^0-9.]/g, '')) || 0;
  };
  const remaining = () => Math.max(1_000, 30_000 - (Date.now() - started));
  await waitFor('non-zero events/s', async () => (await number('events-per-sec')) > 0, remaining());
  await waitFor('non-zero unique users', async () => (await number('unique-users')) > 0, remaining());
  assert.ok(Date.now() - started <= 30_000, 'live counts appeared within 30 s of start');
  assert.match(await page.getByTestId('ws-status').first().innerText(), /live|connected/i);
  // Let the history chart draw its points before the picture is taken.
  await page.waitForTimeout(1500);
  await page.screenshot({ path: join(root, 'artifacts', 'dashboard.png'), fullPage: true });
});
