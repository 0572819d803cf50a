import { authFetch } from './auth';

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

/** A window as the server sends it on the overview channel. */
export interface WireWindow {
  window_start: string;
  final: boolean;
  traffic: Record<string, number>;
  active_users: number;
}

export type ServerMessage =
  | { type: 'snapshot'; channel: string; windows: WireWindow[] }
  | { type: 'update'; channel: string; windows: WireWindow[] }
  | { type: 'error'; code: string; message: string };

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

interface MetricsAnswer {
  series: { tags: Record<string, string>; points: { t: string; v: number | null }[] }[];
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
