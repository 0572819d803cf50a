import { useEffect, useState } from 'react';
import { apiGet, messageOf } from '../api';
import {
  combineEngagement,
  engagementFromChannel,
  type EngagementFields,
  type EngagementNow,
} from '../engagement';
import { formatClock, formatCount, formatRate, formatSeconds } from '../format';
import { LineChart } from '../LineChart';
import { useLive, useNow } from '../live';
import { ErrorLine, Tile } from '../ui';
import type { EngagementAnswer } from '../wire/types';


type Metric = 'active_sessions' | 'avg_session_seconds' | 'events_per_session' | 'engagement_score';

const METRICS: { key: Metric; title: string; unit: string; format: (v: number | null | undefined) => string }[] = [
  { key: 'active_sessions', title: 'Active sessions', unit: 'sessions', format: formatCount },
  { key: 'avg_session_seconds', title: 'Average session duration', unit: 'seconds', format: formatSeconds },
  { key: 'events_per_session', title: 'Events per session', unit: 'events / session', format: formatRate },
  { key: 'engagement_score', title: 'Engagement score', unit: 'score points', format: formatCount },
];

type Range = 'hour' | 'day';
const RANGES: Record<Range, { label: string; ms: number; step: string; per: string }> = {
  hour: { label: 'Last hour', ms: 3_600_000, step: '1m', per: 'per minute' },
  day: { label: 'Last day', ms: 86_400_000, step: '1h', per: 'per hour (hours appear once closed)' },
};

/** The newest minute REST has, split by segment and by country, before the channel answers. */
async function loadNow(): Promise<EngagementNow> {
  const from = new Date(Date.now() - 5 * 60_000).toISOString();
  const [bySegment, byCountry] = await Promise.all([
    apiGet<EngagementAnswer>('/api/v1/engagement', { from, group_by: 'segment' }),
    apiGet<EngagementAnswer>('/api/v1/engagement', { from, group_by: 'country' }),
  ]);
  const newest = Math.max(0, ...bySegment.series.flatMap((s) => s.points.map((p) => Date.parse(p.t))));
  const at = (answer: EngagementAnswer, tag: string) =>
    Object.fromEntries(
      answer.series.flatMap((s) => {
        const point = s.points.find((p) => Date.parse(p.t) === newest);
        return point ? [[s.tags[tag] ?? 'unknown', point]] : [];
      }),
    );
  const segments = at(bySegment, 'segment');
  return {
    minute: newest > 0 ? new Date(newest).toISOString() : null,
    final: true,
    total: combineEngagement(Object.values(segments)),
    bySegment: segments,
    byCountry: at(byCountry, 'country'),
  };
}

/** The metric's history over the range, in all, read again as minutes pass. */
function useHistory(range: Range, minute: string | null) {
  const [answer, setAnswer] = useState<EngagementAnswer | null>(null);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    let cancelled = false;
    const to = Date.now();
    apiGet<EngagementAnswer>('/api/v1/engagement', {
      step: RANGES[range].step,
      from: new Date(to - RANGES[range].ms).toISOString(),
      to: new Date(to + 60_000).toISOString(),
    })
      .then((a) => !cancelled && (setAnswer(a), setError(null)))
      .catch((e: unknown) => !cancelled && setError(messageOf(e)));
    return () => {
      cancelled = true;
    };
  }, [range, minute]);
  return { answer, error };
}

function Breakdown({ title, groups, testId }: { title: string; groups: Record<string, EngagementFields>; testId: string }) {
  const rows = Object.entries(groups).sort((a, b) => b[1].active_sessions - a[1].active_sessions || a[0].localeCompare(b[0]));
  return (
    <div className="table-scroll">
      <table className="data" data-testid={testId}>
        <thead>
          <tr>
            <th>{title}</th>
            <th className="num">Active</th>
            <th className="num" title="average session duration">Avg duration</th>
            <th className="num">Events / session</th>
            <th className="num">Score</th>
          </tr>
        </thead>
        <tbody>
          {rows.length === 0 && (
            <tr>
              <td colSpan={5} className="dim">
                no sessions yet
              </td>
            </tr>
          )}
          {rows.map(([name, f]) => (
            <tr key={name} data-group={name}>
              <td>{name}</td>
              <td className="num">{formatCount(f.active_sessions)}</td>
              <td className="num">{formatSeconds(f.avg_session_seconds)}</td>
              <td className="num">{formatRate(f.events_per_session)}</td>
              <td className="num">{formatCount(f.engagement_score)}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

/** Sessions and engagement now, by segment and by country, and over the last hour or day. */
export function Engagement() {
  const now = useNow();
  const [range, setRange] = useState<Range>('hour');
  const live = useLive<EngagementNow>('engagement', loadNow, (data) => engagementFromChannel(data));
  const current = live.value;
  const history = useHistory(range, current?.minute ?? null);
  const scope = current?.minute
    ? `minute ${formatClock(Date.parse(current.minute))} UTC, event time, ${current.final ? 'closed' : 'open (early result)'}`
    : 'current minute, event time';
  const points = history.answer?.series[0]?.points ?? [];

  return (
    <div className="stack">
      <div className="tiles">
        {METRICS.map((m) => (
          <Tile key={m.key} title={m.title} scope={scope} updatedAt={live.updatedAt} now={now} testId={`engagement-${m.key}`}>
            <div className="value small" data-testid={`engagement-value-${m.key}`}>
              {current ? m.format(current.total[m.key]) : '–'}
            </div>
            {current && current.total[m.key] == null && <div className="hint">no session ended in this minute</div>}
          </Tile>
        ))}
      </div>
      <div className="grid-2">
        <Tile title="By segment" scope={scope} updatedAt={live.updatedAt} now={now}>
          <Breakdown title="Segment" groups={current?.bySegment ?? {}} testId="engagement-by-segment" />
        </Tile>
        <Tile title="By country" scope={scope} updatedAt={live.updatedAt} now={now}>
          <Breakdown title="Country" groups={current?.byCountry ?? {}} testId="engagement-by-country" />
        </Tile>
      </div>
      <div className="toolbar">
        <div className="segmented" role="group" aria-label="Range">
          {(Object.keys(RANGES) as Range[]).map((r) => (
            <button key={r} type="button" aria-pressed={r === range} onClick={() => setRange(r)}>
              {RANGES[r].label}
            </button>
          ))}
        </div>
      </div>
      <div className="grid-2">
        {METRICS.map((m) => (
          <Tile
            key={m.key}
            title={m.title}
            scope={`${RANGES[range].label.toLowerCase()}, ${RANGES[range].per}, event time, all segments and countries`}
            updatedAt={live.updatedAt}
            now={now}
          >
            <LineChart
              label={`${m.title} ${RANGES[range].per}`}
              unit={m.unit}
              format={m.format}
              from={now - RANGES[range].ms}
              to={now}
              series={[{ name: m.title, points: points.map((p) => ({ t: Date.parse(p.t), v: p[m.key] ?? null })) }]}
              testId={`engagement-chart-${m.key}`}
            />
          </Tile>
        ))}
      </div>
      <ErrorLine error={live.error ?? history.error} />
    </div>
  );
}
