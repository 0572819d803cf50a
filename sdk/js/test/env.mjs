// A fake browser for the unit tests: localStorage, navigator, fetch and the
// page's events, with node's mock timers as the clock. Without IndexedDB and
// Web Locks the SDK runs on its localStorage fallback, as a single tab.
import { mock } from 'node:test';

let copies = 0;

export function fakeBrowser({ answer = () => new Response('{"rejected":[]}', { status: 202 }) } = {}) {
  const items = new Map();
  const listeners = new Map();
  const page = {
    requests: [],
    beacons: [],
    answer,
    localStorage: {
      getItem: (k) => (items.has(k) ? items.get(k) : null),
      setItem: (k, v) => items.set(k, String(v)),
      removeItem: (k) => items.delete(k),
    },
    navigator: {
      onLine: true,
      userAgent: 'Mozilla/5.0 (X11; Linux x86_64) Chrome/140.0',
      sendBeacon: (url, body) => (page.beacons.push({ url, body }), true),
    },
    async fetch(url, init) {
      page.requests.push({ url, init, at: Date.now(), lines: init.body.split('\n').map((l) => JSON.parse(l)) });
      return page.answer(page.requests.length, init);
    },
    dispatch(type) {
      for (const f of listeners.get(type) || []) f({ type });
    },
  };
  Object.assign(globalThis, {
    localStorage: page.localStorage,
    fetch: page.fetch,
    addEventListener: (t, f) => listeners.set(t, [...(listeners.get(t) || []), f]),
    removeEventListener: (t, f) => listeners.set(t, (listeners.get(t) || []).filter((g) => g !== f)),
    document: { visibilityState: 'visible' },
  });
  Object.defineProperty(globalThis, 'navigator', { value: page.navigator, configurable: true, writable: true });
  return page;
}

/** A fresh copy of the SDK, as a new page load gets. */
export async function loadSdk() {
  return import(`../dist/tidemark.mjs?copy=${++copies}`);
}

/** Lets the SDK's promise chains (storage, fetch answers) run to their end. */
export async function settle() {
  for (let i = 0; i < 50; i++) await new Promise((r) => setImmediate(r));
}

export function useFakeClock(t, now = Date.UTC(2026, 11, 4, 10)) {
  mock.timers.enable({ apis: ['setTimeout', 'Date'], now });
  t.after(() => mock.timers.reset());
}

/** Advances the fake clock by `ms` in steps, letting promises run between timers. */
export async function advance(ms, step = 100) {
  for (let done = 0; done < ms; done += step) {
    mock.timers.tick(Math.min(step, ms - done));
    await settle();
  }
}
