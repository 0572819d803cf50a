// Unit tests of the dashboard's data logic: number formatting, sorting,
// rank changes, the trending list's window tracking, engagement's
// combination of groups, the campaigns channel's reading and how channel
// messages change the data kept (merge patches, seq gaps).
import { describe, expect, it } from 'vitest';
import { campaignsFromChannel, funnel } from '../src/ads';
import { applyMessage, type ChannelState } from '../src/channel';
import { combineEngagement, engagementFromChannel } from '../src/engagement';
import { formatCount, formatDecimal, formatMultiple, formatPercent, formatSeconds, MISSING } from '../src/format';
import { rankChanges } from '../src/ranks';
import { sortRows, toggleSort } from '../src/sorting';
import {
  advanceTrending,
  closedWindowStart,
  EMPTY_TRENDING,
  trendingFromChannel,
  type TrendingList,
} from '../src/trending';

describe('formatting', () => {
  it('writes counts with separators and no decimals', () => {
    expect(formatCount(1234567)).toBe('1,234,567');
    expect(formatCount(0)).toBe('0');
  });
  it('writes money and scores with two decimals', () => {
    expect(formatDecimal(12.5)).toBe('12.50');
    expect(formatDecimal(3.14159)).toBe('3.14');
  });
  it('writes ratios as percentages and ROAS as a multiple', () => {
    expect(formatPercent(0.031)).toBe('3.10%');
    expect(formatMultiple(6.4)).toBe('6.40×');
  });
  it('writes short durations in seconds and long ones in minutes', () => {
    expect(formatSeconds(95.5)).toBe('95.5 s');
    expect(formatSeconds(125)).toBe('2 min 5 s');
  });
  it('writes an unknown value (a ratio whose divisor is 0) as a dash', () => {
    expect(formatPercent(null)).toBe(MISSING);
    expect(formatCount(undefined)).toBe(MISSING);
    expect(formatDecimal(Number.NaN)).toBe(MISSING);
  });
});

describe('rank changes', () => {
  const previous = [
    { tag: 'a', rank: 1 },
    { tag: 'b', rank: 2 },
    { tag: 'c', rank: 3 },
  ];
  it('tells up, down, same and new apart', () => {
    const changes = rankChanges(
      [
        { tag: 'b', rank: 1 },
        { tag: 'a', rank: 2 },
        { tag: 'c', rank: 3 },
        { tag: 'd', rank: 4 },
      ],
      previous,
    );
    expect(changes.get('b')).toEqual({ kind: 'up', by: 1 });
    expect(changes.get('a')).toEqual({ kind: 'down', by: 1 });
    expect(changes.get('c')).toEqual({ kind: 'same' });
    expect(changes.get('d')).toEqual({ kind: 'new' });
  });
  it('calls nothing new before a window to compare with is known', () => {
    expect(rankChanges([{ tag: 'x', rank: 1 }], null).get('x')).toEqual({ kind: 'same' });
  });
});

describe('sorting', () => {
  const rows = [
    { id: 'c2', ctr: 0.1 },
    { id: 'c10', ctr: null },
    { id: 'c1', ctr: 0.3 },
    { id: 'c3', ctr: 0.1 },
  ];
  const value = (r: (typeof rows)[number], key: 'ctr' | 'id') => r[key];
  it('sorts descending and ascending, ties by id in numeric order', () => {
    expect(sortRows(rows, { key: 'ctr', direction: 'desc' }, value, (r) => r.id).map((r) => r.id)).toEqual([
      'c1',
      'c2',
      'c3',
      'c10',
    ]);
    expect(sortRows(rows, { key: 'ctr', direction: 'asc' }, value, (r) => r.id).map((r) => r.id)).toEqual([
      'c2',
      'c3',
      'c1',
      'c10',
    ]);
  });
  it('puts unknown values last in both directions', () => {
    for (const direction of ['asc', 'desc'] as const) {
      expect(sortRows(rows, { key: 'ctr', direction }, value, (r) => r.id).at(-1)?.id).toBe('c10');
    }
  });
  it('flips the same column and starts another descending', () => {
    expect(toggleSort({ key: 'ctr', direction: 'desc' }, 'ctr')).toEqual({ key: 'ctr', direction: 'asc' });
    expect(toggleSort({ key: 'ctr', direction: 'asc' }, 'id')).toEqual({ key: 'id', direction: 'desc' });
  });
});

describe('trending windows', () => {
  const list = (start: string, final: boolean, tags: string[]): TrendingList => ({
    window: '1m',
    start,
    end: null,
    final,
    tags: tags.map((tag, i) => ({ tag, rank: i + 1, score: 1, users: 1, events: 1 })),
  });
  it('keeps the last list of the window before to compare with', () => {
    let state = advanceTrending(EMPTY_TRENDING, list('2026-12-03T10:00:00Z', false, ['a']));
    state = advanceTrending(state, list('2026-12-03T10:00:00Z', false, ['a', 'b']));
    expect(state.previous).toBeNull();
    state = advanceTrending(state, list('2026-12-03T10:01:00Z', false, ['b', 'a']));
    expect(state.previous?.tags.length).toBe(2);
    expect(state.previous?.start).toBe('2026-12-03T10:00:00Z');
    expect(state.current?.start).toBe('2026-12-03T10:01:00Z');
  });
  it('names the window a minute before an open one as the newest closed one', () => {
    expect(closedWindowStart(list('2026-12-03T10:05:00Z', false, []))).toBe('2026-12-03T10:04:00Z');
    expect(closedWindowStart(list('2026-12-03T10:05:00Z', true, []))).toBe('2026-12-03T10:05:00Z');
    expect(closedWindowStart(null)).toBeNull();
  });
  it('ignores an older window arriving late', () => {
    const state = advanceTrending(EMPTY_TRENDING, list('2026-12-03T10:01:00Z', false, ['a']));
    expect(advanceTrending(state, list('2026-12-03T10:00:00Z', true, ['b']))).toBe(state);
  });
  it('reads channel data, sorted by rank, and none before a window exists', () => {
    expect(trendingFromChannel({ window: '5m', final: false, tags: [] })).toBeNull();
    const read = trendingFromChannel({
      window: '5m',
      start: '2026-12-03T10:00:00Z',
      end: '2026-12-03T10:05:00Z',
      final: true,
      tags: [
        { tag: 'b', rank: 2, score: 1, users: 1, events: 1 },
        { tag: 'a', rank: 1, score: 2, users: 2, events: 2 },
      ],
    });
    expect(read?.tags.map((t) => t.tag)).toEqual(['a', 'b']);
  });
});

describe('engagement', () => {
  it('sums counts and weights the averages by the sessions that ended', () => {
    const all = combineEngagement([
      { sessions_started: 2, sessions_ended: 1, active_sessions: 10, engagement_score: 5, avg_session_seconds: 100, events_per_session: 4 },
      { sessions_started: 3, sessions_ended: 3, active_sessions: 20, engagement_score: 7, avg_session_seconds: 20, events_per_session: 8 },
      { sessions_started: 1, sessions_ended: 0, active_sessions: 5, engagement_score: 1 },
    ]);
    expect(all.active_sessions).toBe(35);
    expect(all.engagement_score).toBe(13);
    expect(all.avg_session_seconds).toBe(40);
    expect(all.events_per_session).toBe(7);
  });
  it('leaves the averages unknown when no session ended', () => {
    const none = combineEngagement([{ sessions_started: 1, sessions_ended: 0, active_sessions: 1, engagement_score: 1 }]);
    expect(none.avg_session_seconds).toBeNull();
  });
  it('splits the channel\'s country/segment groups both ways', () => {
    const now = engagementFromChannel({
      minute: '2026-12-03T10:00:00Z',
      final: false,
      groups: {
        'US/new': { sessions_started: 1, sessions_ended: 0, active_sessions: 4, engagement_score: 2 },
        'US/returning': { sessions_started: 1, sessions_ended: 0, active_sessions: 6, engagement_score: 3 },
        'DE/new': { sessions_started: 1, sessions_ended: 0, active_sessions: 1, engagement_score: 1 },
      },
    });
    expect(now?.byCountry.US.active_sessions).toBe(10);
    expect(now?.bySegment.new.active_sessions).toBe(5);
    expect(now?.total.active_sessions).toBe(11);
  });
});

describe('ads', () => {
  it('reads today\'s totals and the current minute from the campaigns channel', () => {
    const table = campaignsFromChannel({
      day: '2026-12-03T00:00:00Z',
      minute: '2026-12-03T10:00:00Z',
      final: false,
      campaigns: {
        c1: { current: { impressions: 5, clicks: 1, conversions: 0, spend: 1, revenue: 0 } },
        c2: {
          today: { impressions: 100, clicks: 4, conversions: 1, spend: 2, revenue: 8, ctr: 0.04, roas: 4 },
          current: { impressions: 3, clicks: 0, conversions: 0, spend: 0.1, revenue: 0 },
        },
      },
    });
    expect(table?.rows.map((r) => r.campaign_id)).toEqual(['c2']);
    expect(table?.current.map((r) => r.campaign_id)).toEqual(['c1', 'c2']);
    expect(table?.rows[0].cvr).toBeUndefined();
  });
  it('gives each funnel step its share of the one before', () => {
    const steps = funnel({ impressions: 1000, clicks: 50, conversions: 5, spend: 0, revenue: 0 });
    expect(steps.map((s) => s.rate)).toEqual([null, 0.05, 0.1]);
    expect(funnel({ impressions: 0, clicks: 0, conversions: 0, spend: 0, revenue: 0 })[1].rate).toBeNull();
  });
});

describe('channel messages', () => {
  const empty: ChannelState = { seq: null, data: null };
  it('takes a snapshot, merges the next update, and passes the patch on', () => {
    const first = applyMessage(empty, { type: 'snapshot', seq: 7, data: { a: 1, b: { c: 2 } } });
    expect(first.kind).toBe('deliver');
    const next = applyMessage(first.state, { type: 'update', seq: 8, data: { b: { c: 3 }, a: null } });
    expect(next).toEqual({ kind: 'deliver', state: { seq: 8, data: { b: { c: 3 } } }, patch: { b: { c: 3 }, a: null } });
  });
  it('asks for a new snapshot on a gap in seq, and ignores updates until it comes', () => {
    const at7: ChannelState = { seq: 7, data: { a: 1 } };
    const gap = applyMessage(at7, { type: 'update', seq: 9, data: { a: 2 } });
    expect(gap.kind).toBe('resubscribe');
    expect(gap.state.seq).toBeNull();
    expect(applyMessage(gap.state, { type: 'update', seq: 10, data: { a: 3 } }).kind).toBe('ignore');
    const again = applyMessage(gap.state, { type: 'snapshot', seq: 10, data: { a: 3 } });
    expect(again.state).toEqual({ seq: 10, data: { a: 3 } });
  });
});
