import { useCallback, useEffect, useMemo, useRef, useState } from 'react';
import { formatCount, formatRate } from '../format';
import { LineChart } from '../LineChart';
import {
  HOUR_MS,
  MINUTE_MS,
  elapsedSeconds,
  fetchLastHour,
  mergeHistory,
  mergeLive,
  type WireWindow,
  type Windows,
  type MinuteWindow,
} from '../data';
import { useNow, useOverview } from '../live';
import { Freshness } from '../ui';

interface RateSample {
  start: number;
  total: number;
  at: number;
}

/** The last hour at a glance: events per second, active users, events by type. */
export function Overview() {
  const [windows, setWindows] = useState<Windows>(() => new Map());
  const [rate, setRate] = useState<number | null>(null);
  const [historyError, setHistoryError] = useState<string | null>(null);
  const lastSample = useRef<RateSample | null>(null);
  const now = useNow(1000);
  const [updatedAt, setUpdatedAt] = useState<number | null>(null);

  // The merged windows also live in a ref so both sources merge into the
  // latest value without side effects inside state updaters.
  const windowsRef = useRef<Windows>(new Map());
  const publish = (next: Windows) => {
    windowsRef.current = next;
    setWindows(next);
  };

  const onWindows = useCallback((incoming: WireWindow[]) => {
    const at = Date.now();
    setUpdatedAt(at);
    const next = mergeLive(windowsRef.current, incoming, at);
    publish(next);
    const newest = [...next.values()].reduce<MinuteWindow | null>(
      (a, w) => (a === null || w.start > a.start ? w : a),
      null,
    );
    if (!newest) return;
    // Events/s from successive values of the open window; the first value of
    // a window only gives its average so far.
    const prev = lastSample.current;
    if (!prev || prev.start !== newest.start) {
      setRate(newest.total / elapsedSeconds(newest.start, at));
      lastSample.current = { start: newest.start, total: newest.total, at };
    } else if (at - prev.at >= 250) {
      if (newest.total >= prev.total) setRate((newest.total - prev.total) / ((at - prev.at) / 1000));
      lastSample.current = { start: newest.start, total: newest.total, at };
    }
  }, []);

  useOverview(onWindows);

  useEffect(() => {
    let cancelled = false;
    Promise.all([fetchLastHour('traffic', 'events'), fetchLastHour('active_users', 'users')])
      .then(([totals, users]) => {
        if (!cancelled) publish(mergeHistory(windowsRef.current, totals, users, Date.now()));
      })
      .catch((e: unknown) => {
        if (!cancelled) setHistoryError(e instanceof Error ? e.message : String(e));
      });
    return () => {
      cancelled = true;
    };
  }, []);

  const sorted = useMemo(() => [...windows.values()].sort((a, b) => a.start - b.start), [windows]);
  const current = sorted.length > 0 ? sorted[sorted.length - 1] : null;
  const elapsed = current ? elapsedSeconds(current.start, now) : 1;
  const types = current
    ? Object.entries(current.traffic).sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]))
    : [];
  const maxTypeCount = Math.max(1, ...types.map(([, c]) => c));
  // A rate from an update older than a few seconds says nothing about now.
  const stale = lastSample.current === null || now - lastSample.current.at > 5000;
  const liveRate = current === null ? null : stale ? current.total / elapsed : rate;
  // Each type's share of this minute's events, applied to the live rate, so
  // the rows add up to the headline figure.
  const typeRate = (count: number) =>
    current && current.total > 0 && liveRate !== null ? (liveRate * count) / current.total : count / elapsed;

  return (
    <>

      <section className="cards">
        <div className="card">
          <div className="label">Events / s</div>
          <div className="value" data-testid="events-per-sec">
            {liveRate === null ? '–' : formatRate(liveRate)}
          </div>
          <div className="hint">
            {current ? `${formatCount(current.total)} events in the current minute, event time` : 'waiting for data'}
          </div>
          <Freshness updatedAt={updatedAt} now={now} />
        </div>
        <div className="card">
          <div className="label">Unique users</div>
          <div className="value" data-testid="unique-users">
            {current ? formatCount(current.activeUsers) : '–'}
          </div>
          <div className="hint">active in the current minute, event time</div>
        </div>
        <div className="card wide">
          <div className="label">Events / s by type</div>
          <div className="scope">current minute, event time</div>
          <table className="types" data-testid="type-table">
            <tbody>
              {types.length === 0 && (
                <tr>
                  <td className="dim">no events yet</td>
                </tr>
              )}
              {types.map(([type, count]) => (
                <tr key={type} data-event-type={type}>
                  <td className="type">{type}</td>
                  <td className="bar-cell">
                    <div className="bar" style={{ width: `${(count / maxTypeCount) * 100}%` }} />
                  </td>
                  <td className="num">{formatRate(typeRate(count))}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      </section>

      <section className="card chart-card" data-testid="history-chart">
        <div className="chart-head">
          <div>
            <div className="label">Last hour, per minute</div>
            <div className="scope">event time; the newest minute is open (early result)</div>
          </div>
          <Freshness updatedAt={updatedAt} now={now} />
        </div>
        <div className="chart-pair">
          <LineChart
            label="Events per minute over the last hour"
            unit="events / min"
            format={formatCount}
            from={now - (now % MINUTE_MS) - HOUR_MS + MINUTE_MS}
            to={now - (now % MINUTE_MS)}
            series={[{ name: 'events', points: sorted.map((w) => ({ t: w.start, v: w.total })) }]}
            testId="overview-events-chart"
          />
          <LineChart
            label="Active users per minute over the last hour"
            unit="active users"
            format={formatCount}
            from={now - (now % MINUTE_MS) - HOUR_MS + MINUTE_MS}
            to={now - (now % MINUTE_MS)}
            series={[{ name: 'active users', points: sorted.map((w) => ({ t: w.start, v: w.activeUsers })) }]}
            testId="overview-users-chart"
          />
        </div>
        {historyError && <div className="hint error">history unavailable: {historyError}</div>}
      </section>
    </>
  );
}
