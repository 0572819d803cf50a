import { authFetch } from './auth';
import type { MetricsAnswer } from './wire/types';

// The dashboard's view of the last hour: one entry per 1-minute window, merged
// from the REST history (totals) and the WebSocket overview channel (by type).

export const MINUTE_MS = 60_000;
export const HOUR_MS = 60 * MINUTE_MS;

export interface MinuteWindow {
  start: number; // epoch ms
  final: boolean;
  /** Events per event type; empty when only the history total is known. */
  traffic: Record<string, number>;
  total: number;
  activeUsers: number;
}

/** A window as the overview channel holds it (docs/api.md). */
export interface WireWindow {
  window_start: string;
  final: boolean;
  traffic: Record<string, number>;
  active_users: number;
}


export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/**
 * A channel message. `data` is the channel's whole data in a snapshot and
 * what changed in an update (a JSON merge patch: see `mergePatch`); `seq`
 * goes up by one per change.
 */
export type ServerMessage =
  | { type: 'snapshot'; channel: string; seq: number; data: Json }
  | { type: 'update'; channel: string; seq: number; data: Json }
  | { type: 'authenticated'; role: string | null }
  | { type: 'error'; code: string; message: string };

function isObject(v: Json | undefined): v is { [key: string]: Json } {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/**
 * Applies an update's data to a channel's data (JSON merge patch, RFC 7396):
 * objects merge key by key, `null` removes a key, anything else replaces.
 * Returns a new value; `target` is left as it was.
 */
export function mergePatch(target: Json, patch: Json): Json {
  if (!isObject(patch)) return patch;
  const out: { [key: string]: Json } = isObject(target) ? { ...target } : {};
  for (const [key, value] of Object.entries(patch)) {
    if (value === null) delete out[key];
    else out[key] = mergePatch(out[key] ?? null, value);
  }
  return out;
}

/** The window starts an overview update names. */
export function windowKeys(patch: Json): string[] {
  return isObject(patch) && isObject(patch.windows) ? Object.keys(patch.windows) : [];
}

/** The windows of overview data that `keys` names (all when omitted). */
export function overviewWindows(data: Json, keys?: string[]): WireWindow[] {
  const windows = isObject(data) && isObject(data.windows) ? data.windows : {};
  return (keys ?? Object.keys(windows))
    .map((k) => windows[k])
    .filter(isObject)
    .map((w) => w as unknown as WireWindow);
}

export type Windows = Map<number, MinuteWindow>;

export function fromWire(w: WireWindow): MinuteWindow | null {
  const start = Date.parse(w.window_start);
  if (Number.isNaN(start)) return null;
  const traffic = w.traffic ?? {};
  const total = Object.values(traffic).reduce((a, b) => a + b, 0);
  return { start, final: w.final, traffic, total, activeUsers: w.active_users ?? 0 };
}

/** Live windows replace what is known for their start; only the last hour is kept. */
export function mergeLive(windows: Windows, incoming: WireWindow[], now: number): Windows {
  const next = new Map(windows);
  for (const wire of incoming) {
    const w = fromWire(wire);
    if (w) next.set(w.start, w);
  }
  return trim(next, now);
}

/** History fills in windows the live channel has not (yet) delivered. */
export function mergeHistory(
  windows: Windows,
  totals: Map<number, number>,
  users: Map<number, number>,
  now: number,
): Windows {
  const next = new Map(windows);
  for (const start of new Set([...totals.keys(), ...users.keys()])) {
    if (next.has(start)) continue;
    next.set(start, {
      start,
      final: true,
      traffic: {},
      total: totals.get(start) ?? 0,
      activeUsers: users.get(start) ?? 0,
    });
  }
  return trim(next, now);
}

function trim(windows: Windows, now: number): Windows {
  const newest = Math.max(now - (now % MINUTE_MS), ...windows.keys());
  for (const start of windows.keys()) {
    if (start <= newest - HOUR_MS) windows.delete(start);
  }
  return windows;
}


/** Per-minute totals of one field over the last hour, from the REST API. */
export async function fetchLastHour(name: string, field: string): Promise<Map<number, number>> {
  const from = new Date(Date.now() - HOUR_MS).toISOString();
  const params = new URLSearchParams({ name, field, step: '1m', from });
  const response = await authFetch(`/api/v1/metrics?${params}`);
  if (!response.ok) throw new Error(`${name}: HTTP ${response.status}`);
  const answer = (await response.json()) as MetricsAnswer;
  const out = new Map<number, number>();
  for (const series of answer.series) {
    for (const p of series.points) {
      const t = Date.parse(p.t);
      if (!Number.isNaN(t) && p.v !== null) out.set(t, (out.get(t) ?? 0) + p.v);
    }
  }
  return out;
}

/** Seconds of the window that have passed, between 1 and 60. */
export function elapsedSeconds(start: number, now: number): number {
  return Math.min(60, Math.max(1, (now - start) / 1000));
}
