import { useEffect, useMemo, useRef, useState } from 'react';
import { apiGet, messageOf } from '../api';
import { formatClock, formatCount, formatDecimal } from '../format';
import { LineChart } from '../LineChart';
import { useLive, useNow } from '../live';
import { rankChanges, type RankChange } from '../ranks';
import {
  advanceTrending,
  closedWindowStart,
  EMPTY_TRENDING,
  TRENDING_WINDOWS,
  trendingFromChannel,
  type TrendingList,
  type TrendingState,
  type TrendingWindow,
} from '../trending';
import { ErrorLine, Tile } from '../ui';
import type { TagHistory } from '../wire/types';

const WINDOW_LABEL: Record<TrendingWindow, string> = { '1m': '1 minute', '5m': '5 minutes', '15m': '15 minutes' };
const HISTORY_HOURS = 6;


function Change({ change }: { change: RankChange | undefined }) {
  if (!change || change.kind === 'same') return <span className="change same" title="same rank as the window before">·</span>;
  if (change.kind === 'new') return <span className="change new" title="not in the window before">new</span>;
  const arrow = change.kind === 'up' ? '▲' : '▼';
  return (
    <span className={`change ${change.kind}`} title={`${change.kind} ${change.by} since the window before`}>
      {arrow}
      {change.by}
    </span>
  );
}

function windowScope(list: TrendingList | null, size: TrendingWindow): string {
  if (!list?.start) return `window of ${WINDOW_LABEL[size]}, event time`;
  const span = `${formatClock(Date.parse(list.start))}–${list.end ? formatClock(Date.parse(list.end)) : '…'} UTC`;
  return `${WINDOW_LABEL[size]} window ${span}, event time, ${list.final ? 'closed' : 'open (early result)'}`;
}

interface LivePoint {
  t: string;
  rank: number;
  score: number;
}

/** The tag's stored windows, and the newest (open) window's early result after them. */
function History({ tag, size, live }: { tag: string; size: TrendingWindow; live: LivePoint | null }) {
  const [history, setHistory] = useState<TagHistory | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [loadedAt, setLoadedAt] = useState<number | null>(null);
  const now = useNow();
  useEffect(() => {
    let cancelled = false;
    const load = () => {
      const to = Date.now();
      apiGet<TagHistory>(`/api/v1/trending/${encodeURIComponent(tag)}`, {
        window: size,
        from: new Date(to - HISTORY_HOURS * 3_600_000).toISOString(),
        to: new Date(to).toISOString(),
      })
        .then((h) => {
          if (cancelled) return;
          setHistory(h);
          setLoadedAt(Date.now());
          setError(null);
        })
        .catch((e: unknown) => !cancelled && setError(messageOf(e)));
    };
    setHistory(null);
    load();
    // The history grows by a window a minute: read it again as it does.
    const id = window.setInterval(load, 60_000);
    return () => {
      cancelled = true;
      window.clearInterval(id);
    };
  }, [tag, size]);
  const stored = history?.points ?? [];
  const points: LivePoint[] =
    live && !stored.some((p) => p.t === live.t) ? [...stored, live] : stored;
  const from = now - HISTORY_HOURS * 3_600_000;
  return (
    <Tile
      title={`“${tag}” over the last ${HISTORY_HOURS} hours`}
      scope={`${WINDOW_LABEL[size]} windows, by window start; only windows it was in the top 50`}
      updatedAt={loadedAt}
      now={loadedAt ?? now}
      testId="tag-history"
    >
      <div className="chart-stack">
        <LineChart
          label={`Rank of ${tag}`}
          unit="rank (1 = top)"
          inverted
          yMax={50}
          from={from}
          to={now}
          format={(v) => (v === null ? '–' : `#${formatCount(v)}`)}
          series={[{ name: 'rank', points: points.map((p) => ({ t: Date.parse(p.t), v: p.rank })) }]}
          testId="tag-rank-chart"
        />
        <LineChart
          label={`Score of ${tag}`}
          unit="score"
          from={from}
          to={now}
          format={formatDecimal}
          series={[{ name: 'score', points: points.map((p) => ({ t: Date.parse(p.t), v: p.score })) }]}
          testId="tag-score-chart"
        />
      </div>
      <div className="hint" data-testid="tag-history-count">
        {history
          ? `${formatCount(stored.length)} closed window${stored.length === 1 ? '' : 's'} in the top 50${live ? ', and the open window (early result)' : ''}`
          : 'loading…'}
      </div>
      <ErrorLine error={error} />
    </Tile>
  );
}

function liveTagPoint(current: TrendingList | null, tag: string): LivePoint | null {
  const found = current?.start ? current.tags.find((t) => t.tag === tag) : undefined;
  return found && current?.start ? { t: current.start, rank: found.rank, score: found.score } : null;
}

/**
 * The newest closed window, from REST: read again whenever the channel moves
 * to a later window, and every few seconds until the window has closed.
 */
function useClosedWindow(size: TrendingWindow, start: string | null) {
  const [closed, setClosed] = useState<{ list: TrendingList; at: number } | null>(null);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    if (start === null) return;
    let cancelled = false;
    let timer: number | undefined;
    const load = () => {
      apiGet<TrendingList>('/api/v1/trending', { window: size, limit: '50', at: start })
        .then((list) => {
          if (cancelled) return;
          setError(null);
          // A window the store has not written yet answers closed but empty: wait for its list.
          if (list.final && list.start === start && list.tags.length > 0) setClosed({ list, at: Date.now() });
          else timer = window.setTimeout(load, 3000);
        })
        .catch((e: unknown) => {
          if (cancelled) return;
          setError(messageOf(e));
          timer = window.setTimeout(load, 5000);
        });
    };
    load();
    return () => {
      cancelled = true;
      window.clearTimeout(timer);
    };
  }, [size, start]);
  useEffect(() => setClosed(null), [size]);
  return { closed: closed?.list.window === size ? closed : null, error };
}

/** The live top 50 of a window, with rank changes and a tag's history. */
export function Trending() {
  const [size, setSize] = useState<TrendingWindow>('5m');
  const [showClosed, setShowClosed] = useState(false);
  const [selected, setSelected] = useState<string | null>(null);
  const now = useNow();
  const historyColumn = useRef<HTMLDivElement>(null);
  // Where the history sits above the table (narrow screens), bring it into
  // view when a tag far down the list is picked.
  useEffect(() => {
    if (selected && window.innerWidth <= 1000) historyColumn.current?.scrollIntoView({ block: 'start' });
  }, [selected]);
  const live = useLive<TrendingState>(
    `trending:${size}`,
    async () =>
      advanceTrending(EMPTY_TRENDING, await apiGet<TrendingList>('/api/v1/trending', { window: size, limit: '50' })),
    (data, _patch, previous) => advanceTrending(previous ?? EMPTY_TRENDING, trendingFromChannel(data)),
  );
  const { current, previous } = live.value ?? EMPTY_TRENDING;
  const { closed, error: closedError } = useClosedWindow(size, closedWindowStart(current));
  const shown = showClosed ? (closed?.list ?? null) : current;
  // The newest window's ranks against the window before it: its final list
  // once known, else the last early list seen of it.
  const baseline = useMemo(() => {
    if (!current?.start) return null;
    const before = closedWindowStart(current);
    if (closed && closed.list.start === before && before !== current.start) return closed.list;
    return previous;
  }, [current, previous, closed]);
  const changes = useMemo(
    () => rankChanges(shown?.tags ?? [], shown === current ? (baseline?.tags ?? null) : null),
    [shown, current, baseline],
  );

  return (
    <div className="stack">
      <div className="toolbar">
        <div className="segmented" role="group" aria-label="Window">
          {TRENDING_WINDOWS.map((w) => (
            <button key={w} type="button" aria-pressed={w === size} onClick={() => setSize(w)}>
              {WINDOW_LABEL[w]}
            </button>
          ))}
        </div>
        <div className="segmented" role="group" aria-label="Which window">
          <button type="button" aria-pressed={!showClosed} onClick={() => setShowClosed(false)}>
            Newest window
          </button>
          <button type="button" aria-pressed={showClosed} onClick={() => setShowClosed(true)}>
            Last closed window
          </button>
        </div>
      </div>
      <div className="trending-layout">
      <Tile
        title={`Top 50, ${WINDOW_LABEL[size]} window`}
        scope={windowScope(shown, size)}
        updatedAt={live.updatedAt}
        now={now}
        testId="trending-tile"
      >
        <div className="table-scroll">
          <table
            className="data"
            data-testid="trending-table"
            data-window={size}
            data-start={shown?.start ?? ''}
            data-final={shown?.final ? 'true' : 'false'}
          >
            <thead>
              <tr>
                <th className="num">Rank</th>
                <th title="against the window before">Δ</th>
                <th>Tag</th>
                <th className="num">Score</th>
                <th className="num" title="distinct users">Users</th>
                <th className="num">Events</th>
              </tr>
            </thead>
            <tbody>
              {(shown?.tags.length ?? 0) === 0 && (
                <tr>
                  <td colSpan={6} className="dim">
                    {showClosed ? 'no closed window yet: the first closes a minute after the first events' : 'no tags yet'}
                  </td>
                </tr>
              )}
              {shown?.tags.map((t) => (
                <tr
                  key={t.tag}
                  data-tag={t.tag}
                  className={`clickable ${selected === t.tag ? 'selected' : ''}`}
                  onClick={() => setSelected(t.tag)}
                >
                  <td className="num" data-field="rank">{formatCount(t.rank)}</td>
                  <td>
                    <Change change={changes.get(t.tag)} />
                  </td>
                  <td>
                    <button type="button" className="link tag" onClick={() => setSelected(t.tag)}>
                      {t.tag}
                    </button>
                  </td>
                  <td className="num" data-field="score" data-value={t.score}>{formatDecimal(t.score)}</td>
                  <td className="num" data-field="users" data-value={t.users}>{formatCount(t.users)}</td>
                  <td className="num" data-field="events" data-value={t.events}>{formatCount(t.events)}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
        <ErrorLine error={live.error ?? (showClosed ? closedError : null)} />
      </Tile>
      <div className="history-column" ref={historyColumn}>
        {selected ? (
          <History tag={selected} size={size} live={liveTagPoint(current, selected)} />
        ) : (
          <div className="card hint">Click a tag for its rank and score over the last {HISTORY_HOURS} hours.</div>
        )}
      </div>
      </div>
    </div>
  );
}
