// The trending list as the page follows it: the newest window and the list
// of the window before it, for rank changes. The channel follows the newest
// window only, so the window before it is usually seen open for the last
// time and closes after the channel has moved on: its final list comes from
// REST (`closedWindowStart`).
import type { Json } from './data';

export type TrendingWindow = '1m' | '5m' | '15m';
export const TRENDING_WINDOWS: TrendingWindow[] = ['1m', '5m', '15m'];

export interface TrendingTag {
  tag: string;
  rank: number;
  score: number;
  users: number;
  events: number;
}

/** `GET /api/v1/trending` and the `trending:*` channels' data. */
export interface TrendingList {
  window: string;
  start: string | null;
  end: string | null;
  final: boolean;
  tags: TrendingTag[];
}

export interface TrendingState {
  current: TrendingList | null;
  /** The last list seen of the window before `current`'s. */
  previous: TrendingList | null;
}

export const EMPTY_TRENDING: TrendingState = { current: null, previous: null };

const MINUTE_MS = 60_000;

/**
 * The start of the newest window that may be closed while `current` is
 * open: windows hop by a minute, so the one starting a minute earlier.
 */
export function closedWindowStart(current: TrendingList | null): string | null {
  if (!current?.start) return null;
  if (current.final) return current.start;
  return new Date(Date.parse(current.start) - MINUTE_MS).toISOString().replace('.000Z', 'Z');
}

/** Channel data as a list; null until the channel has a window. */
export function trendingFromChannel(data: Json): TrendingList | null {
  if (typeof data !== 'object' || data === null || Array.isArray(data)) return null;
  const d = data as unknown as Partial<TrendingList>;
  if (typeof d.start !== 'string') return null;
  return {
    window: String(d.window ?? ''),
    start: d.start,
    end: d.end ?? null,
    final: d.final === true,
    tags: Array.isArray(d.tags) ? [...d.tags].sort((a, b) => a.rank - b.rank) : [],
  };
}

/** The state after `list` arrived (a REST answer or a channel message). */
export function advanceTrending(state: TrendingState, list: TrendingList | null): TrendingState {
  if (list === null || list.start === null) return state;
  const { current } = state;
  let previous = state.previous;
  if (current && current.start !== null && current.start !== list.start) {
    // A move to a later window keeps the old one to compare ranks with; an
    // older one (a correction after reconnecting) does not count as a move.
    if (Date.parse(list.start) > Date.parse(current.start)) previous = current;
    else return state;
  }
  return { current: list, previous };
}
