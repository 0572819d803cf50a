/**
 * @tidemark/sdk: sends a web app's events to tidemark's ingest
 * (`POST /v1/events`). Events are kept in IndexedDB (or localStorage) until
 * ingest has answered for them, sent in NDJSON batches, retried with
 * backoff, shared between the tabs of an origin without being sent twice,
 * and beaconed when the page goes away. See docs/sdk.md.
 */
import { openStore, type Rec, type Store } from './store';
import { uuidv7 } from './uuid';

export { uuidv7 };

export type Fields = Record<string, unknown>;

/** An event as sent: the fields given to `track`, and those the SDK adds. */
export interface TrackedEvent extends Fields {
  event_id: string;
  event_type: string;
  user_id: string;
  timestamp: number;
  session_id: string;
  device: string;
}

export interface Options {
  /** Base URL of ingest, e.g. `https://ingest.example.com`; `''` for the page's own origin. */
  url: string;
  /** An ingest key (`--api-key`): write-only, fine to ship in a page. */
  key: string;
  /** Longest time an event waits before its batch is sent (default 3000). */
  flushIntervalMs?: number;
  /** Most events in one request (default 50). */
  maxBatch?: number;
  /** Called once for every event ingest refused, with its reason code; it is not sent again. */
  onReject?: (event: TrackedEvent, reason: string, error: string) => void;
}

export interface Stats {
  /** Events in storage, of every tab. */
  queued: number;
  /** Events dropped because the queue was over 1,000 events or 5 MB. */
  dropped: number;
  /** Why sending stopped (`unauthorized`, `forbidden`), if it did. */
  stopped?: string;
}

const BATCH_BYTES = 32 * 1024;
const BEACON_BYTES = 64 * 1024;
const QUEUE_EVENTS = 1000;
const QUEUE_BYTES = 5 * 1024 * 1024;
const SESSION_IDLE_MS = 30 * 60 * 1000;
const SESSION_MAX_MS = 24 * 60 * 60 * 1000;
const BACKOFF_MAX_MS = 60 * 1000;
const TAB_LOCK = 'tidemark-tab:';
const QUEUE_LOCK = 'tidemark-queue';
const BEACONED = 'tidemark_beaconed:';
const ls = () => localStorage;
const encoder = new TextEncoder();

let opts: Required<Omit<Options, 'onReject'>> & Pick<Options, 'onReject'>;
let store: Promise<Store>;
/** This page's id: it owns the events it makes while it holds its tab lock. */
let tab = '';
/** This page's events not yet answered for: what the unload beacon sends. */
let mine: Rec[] = [];
/** Events this page is sending or has beaconed: never picked for a batch again. */
const busy = new Set<string>();
/** Events beaconed but kept (the beacon may be lost): not beaconed again by the
 * `pagehide` that follows `visibilitychange`, only sent again by a batch. */
const beaconedKept = new Set<string>();
let unsaved: Rec[] = [];
let saving: Promise<void> = Promise.resolve();
let sending: Promise<number> | undefined;
let timer: ReturnType<typeof setTimeout> | undefined;
let due = 0;
let retryAt = 0;
let failures = 0;
let queued = 0;
let dropped = 0;
let stopped: string | undefined;
let releaseTab: (() => void) | undefined;
let user = '';
let device = 'web';

const locks = (): LockManager | undefined => (globalThis.navigator as Navigator | undefined)?.locks;
const online = () => globalThis.navigator?.onLine !== false;

/** Runs `body` while no other tab of the origin runs one (where Web Locks exist). */
const exclusive = <T>(body: () => Promise<T>): Promise<T> =>
  locks() ? (locks()!.request(QUEUE_LOCK, body) as Promise<T>) : body();

function remember(key: string, make: () => string): string {
  let value = ls().getItem(key);
  if (!value) ls().setItem(key, (value = make()));
  return value;
}

/** The session shared by the origin's tabs: new after 30 minutes idle or 24 hours. */
function session(now: number): string {
  const [id, start, last] = (ls().getItem('tidemark_session') || '').split(' ');
  const fresh = !id || now - +last > SESSION_IDLE_MS || now - +start > SESSION_MAX_MS;
  const s = fresh ? [uuidv7(now), now] : [id, start];
  ls().setItem('tidemark_session', `${s[0]} ${s[1]} ${now}`);
  return s[0] as string;
}

/** Starts the SDK; call it once per page, before anything else. */
export function init(options: Options): void {
  opts = { flushIntervalMs: 3000, maxBatch: 50, ...options };
  store = openStore();
  tab = uuidv7();
  stopped = undefined;
  failures = retryAt = 0;
  user = remember('tidemark_user', () => 'anon-' + uuidv7());
  const ua = globalThis.navigator?.userAgent || '';
  device = /iPhone|iPad|iPod/.test(ua) ? 'ios' : /Android/.test(ua) ? 'android' : 'web';
  // Held for the page's life: other tabs take this page's events only once it is gone.
  locks()?.request(TAB_LOCK + tab, () => new Promise<void>((done) => (releaseTab = done)));
  if (typeof addEventListener == 'function') {
    addEventListener('pagehide', beacon);
    addEventListener('visibilitychange', hidden);
    addEventListener('online', nudge);
  }
  // Events left by a closed tab or by the page before a reload.
  schedule(opts.flushIntervalMs);
}

/** Queues one event of `eventType` (`custom.<name>` for your own) with `fields`. */
export function track(eventType: string, fields: Fields = {}): void {
  if (!opts) throw new Error('tidemark: call init() first');
  const now = Date.now();
  const event = {
    ...fields,
    event_id: uuidv7(now),
    event_type: eventType,
    user_id: user,
    timestamp: now,
    session_id: session(now),
    device,
  };
  const line = JSON.stringify(event);
  const rec = { id: event.event_id, o: tab, n: encoder.encode(line).length + 1, e: line };
  mine.push(rec);
  unsaved.push(rec);
  saving = saving.then(save);
  const bytes = mine.reduce((sum, r) => sum + r.n, 0);
  schedule(mine.length >= opts.maxBatch || bytes >= BATCH_BYTES ? 0 : opts.flushIntervalMs);
}

/** A `page_view` of the current path. */
export function page(fields: Fields = {}): void {
  track('page_view', { page: globalThis.location?.pathname, ...fields });
}

/** Sets the `user_id` of later events (kept across reloads). */
export function identify(userId: string): void {
  user = userId;
  ls().setItem('tidemark_user', userId);
}

/** A `profile_update` of the current user. */
export function profile(fields: { country?: string; age_band?: string; segment?: string }): void {
  track('profile_update', fields);
}

/** Sends every queued event now; resolves when the queue is empty or a send failed. */
export async function flush(): Promise<void> {
  await drain();
}

/** Sends batch after batch until none is left or one fails; the last result. */
async function drain(): Promise<number> {
  let result;
  while ((result = await send()) > 0);
  return result;
}

/** Sends what it can, then stops timers and listeners. */
export async function shutdown(): Promise<void> {
  await flush();
  clearTimeout(timer);
  timer = undefined;
  if (typeof removeEventListener == 'function') {
    removeEventListener('pagehide', beacon);
    removeEventListener('visibilitychange', hidden);
    removeEventListener('online', nudge);
  }
  releaseTab?.();
}

/** What the queue holds and what was dropped. */
export function stats(): Stats {
  return { queued, dropped, stopped };
}

async function save(): Promise<void> {
  if (!unsaved.length) return;
  try {
    await exclusive(async () => {
      // Taken under the lock: until then `pick` knows them as not stored yet.
      const fresh = unsaved;
      unsaved = [];
      const s = await store;
      await s.put(fresh);
      const all = await s.all();
      let bytes = all.reduce((sum, r) => sum + r.n, 0);
      let cut = 0;
      while (all.length - cut > QUEUE_EVENTS || bytes > QUEUE_BYTES) bytes -= all[cut++].n;
      if (cut) {
        const gone = new Set(all.slice(0, cut).map((r) => r.id));
        dropped += cut;
        mine = mine.filter((r) => !gone.has(r.id));
        await s.del([...gone]);
      }
      queued = all.length - cut;
    });
  } catch {
    // Storage refused (quota, a closed database): the events stay in memory
    // and are sent from there.
  }
}

function nudge(): void {
  schedule(0);
}

/** Makes sure a send happens within `ms`, but not before the backoff allows. */
function schedule(ms: number): void {
  if (stopped) return;
  const at = Math.max(Date.now() + ms, retryAt);
  if (timer !== undefined && due <= at) return;
  clearTimeout(timer);
  due = at;
  timer = setTimeout(tick, at - Date.now());
}

async function tick(): Promise<void> {
  timer = undefined;
  // A failed send waits for its backoff; events of other tabs are looked at
  // again in case their tab goes away.
  if (await drain()) schedule(0);
  else if (queued) schedule(opts.flushIntervalMs);
}

/** One batch: 1 when it was answered, 0 when there was nothing to send, -1 when it failed. */
function send(): Promise<number> {
  return (sending ||= sendBatch().finally(() => (sending = undefined)));
}

async function sendBatch(): Promise<number> {
  await saving;
  if (stopped || !online() || !opts) return 0;
  const batch = await exclusive(pick);
  if (!batch.length) return 0;
  batch.forEach((r) => busy.add(r.id));
  try {
    const res = await post(batch.map((r) => r.e).join('\n'));
    const status = res.status;
    if (status == 401 || status == 403) {
      stopped = status == 401 ? 'unauthorized' : 'forbidden';
      console.error(`tidemark: ingest answered ${status}; sending stopped, events kept`);
      return 0;
    }
    if (status == 408 || status == 429 || status >= 500) {
      return backoff(res.headers.get('retry-after'));
    }
    const body = await res.json().catch(() => ({}));
    // 202: some were rejected; 400: all were; other 4xx: the request itself.
    const rejected: { index: number; reason: string; error: string }[] =
      status < 300 || body.rejected
        ? body.rejected || []
        : batch.map((_, index) => ({ index, reason: `http_${status}`, error: body.error || '' }));
    for (const r of rejected) {
      const rec = batch[r.index];
      try {
        if (rec) opts.onReject?.(JSON.parse(rec.e), r.reason, r.error);
      } catch (err) {
        // The app's callback failing must not make the batch look unsent.
        console.error(err);
      }
    }
    failures = retryAt = 0;
    await forget(batch);
    return 1;
  } catch {
    return backoff(null);
  } finally {
    batch.forEach((r) => busy.delete(r.id));
  }
}

/** Exponential backoff with equal jitter, never sooner than `Retry-After`. */
function backoff(retryAfter: string | null): number {
  const base = Math.min(BACKOFF_MAX_MS, 1000 * 2 ** failures++);
  const told = retryAfter ? +retryAfter * 1000 || Date.parse(retryAfter) - Date.now() || 0 : 0;
  retryAt = Date.now() + Math.max(told, base / 2 + (Math.random() * base) / 2);
  return -1;
}

function post(body: string): Promise<Response> {
  // text/plain and the key in the query make a CORS "simple" request: no preflight.
  return fetch(endpoint(), {
    method: 'POST',
    body,
    keepalive: true,
    headers: { 'content-type': 'text/plain;charset=UTF-8' },
  });
}

const endpoint = () => `${opts.url.replace(/\/$/, '')}/v1/events?key=${encodeURIComponent(opts.key)}`;

/** Under the queue lock: takes over the events of tabs that are gone, and picks this tab's oldest batch. */
async function pick(): Promise<Rec[]> {
  const s = await store;
  const all = await s.all();
  const held = locks() && new Set(((await locks()!.query()).held || []).map((l) => l.name));
  const orphans = held ? all.filter((r) => r.o != tab && !held.has(TAB_LOCK + r.o)) : [];
  const beaconed = new Set<string>();
  for (const o of new Set(orphans.map((r) => r.o))) {
    for (const id of JSON.parse(ls().getItem(BEACONED + o) || '[]')) beaconed.add(id);
    ls().removeItem(BEACONED + o);
  }
  const claimed = orphans.filter((r) => !beaconed.has(r.id)).map((r) => ({ ...r, o: tab }));
  await s.put(claimed);
  await s.del([...beaconed]);
  // Taken over: this page's to beacon too if it goes away.
  mine.push(...claimed);
  // Ours: stored as ours (another tab may have taken over one before this
  // page's lock was granted), or only in memory when storage failed.
  const stored = new Set(all.map((r) => r.id));
  const memoryOnly = mine.filter((r) => !stored.has(r.id) && !unsaved.includes(r));
  const byId = new Map(memoryOnly.map((r) => [r.id, r] as const));
  for (const r of all) if (!held || r.o == tab) byId.set(r.id, r);
  for (const r of claimed) byId.set(r.id, r);
  queued = all.length - beaconed.size;
  const batch: Rec[] = [];
  let bytes = 0;
  for (const id of [...byId.keys()].sort()) {
    const r = byId.get(id)!;
    if (busy.has(id)) continue;
    if (batch.length == opts.maxBatch || (batch.length && bytes + r.n > BATCH_BYTES)) break;
    batch.push(r);
    bytes += r.n;
  }
  return batch;
}

async function forget(batch: Rec[]): Promise<void> {
  const ids = new Set(batch.map((r) => r.id));
  mine = mine.filter((r) => !ids.has(r.id));
  try {
    await exclusive(async () => (await store).del([...ids]));
    queued = Math.max(0, queued - ids.size);
  } catch {
    // Left in storage: sent again later, and dropped by ingest as a duplicate.
  }
}

function hidden(): void {
  if (document.visibilityState == 'hidden') beacon();
}

/**
 * The page may be going away: send this tab's unsent events now, in chunks
 * of at most 64 KB, with `sendBeacon` (or `fetch` `keepalive`). Beaconed
 * events are recorded synchronously so that whichever tab takes over this
 * one's queue drops them instead of sending them again; when the network
 * is down or the last send failed, the beacon is likely lost too, so the
 * events stay queued and may arrive twice (ingest drops the copy by id).
 */
function beacon(): void {
  if (!opts || stopped) return;
  const trusted = online() && !failures;
  const out = mine.filter((r) => !busy.has(r.id) && !beaconedKept.has(r.id));
  let chunk: Rec[] = [];
  let bytes = 0;
  const sent: string[] = [];
  const ship = () => {
    if (!chunk.length) return;
    const body = chunk.map((r) => r.e).join('\n');
    let ok = false;
    try {
      ok = navigator.sendBeacon(endpoint(), body);
    } catch {
      // Some browsers throw instead of answering false.
    }
    if (!ok) void post(body).catch(() => {});
    if (ok && trusted) sent.push(...chunk.map((r) => r.id));
    else chunk.forEach((r) => beaconedKept.add(r.id));
    chunk = [];
    bytes = 0;
  };
  for (const r of out) {
    if (bytes + r.n > BEACON_BYTES) ship();
    chunk.push(r);
    bytes += r.n;
  }
  ship();
  if (!sent.length) return;
  const key = BEACONED + tab;
  ls().setItem(key, JSON.stringify(JSON.parse(ls().getItem(key) || '[]').concat(sent)));
  sent.forEach((id) => busy.add(id));
  const gone = new Set(sent);
  mine = mine.filter((r) => !gone.has(r.id));
  // The page may live on (a hidden tab): then the record is no longer needed.
  void exclusive(async () => (await store).del(sent)).then(() => {
    const left = JSON.parse(ls().getItem(key) || '[]').filter((id: string) => !gone.has(id));
    if (left.length) ls().setItem(key, JSON.stringify(left));
    else ls().removeItem(key);
    queued = Math.max(0, queued - sent.length);
  }, () => {});
}
