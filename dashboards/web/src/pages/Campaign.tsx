import { useEffect, useState } from 'react';
import { funnel, type CampaignFields } from '../ads';
import { apiGet, messageOf } from '../api';
import type { Json } from '../data';
import { formatClock, formatCount, formatDecimal, formatPercent } from '../format';
import { LineChart, type ChartSeries } from '../LineChart';
import { useLive, useNow } from '../live';
import { followLink } from '../router';
import { ErrorLine, Tile } from '../ui';
import { CAMPAIGN_COLUMNS } from './Ads';
import type { CampaignChannel, CampaignSeriesAnswer } from '../wire/types';

type CampaignLive = CampaignChannel;
type SeriesAnswer = CampaignSeriesAnswer;

type SeriesField = 'impressions' | 'clicks' | 'conversions' | 'spend' | 'revenue';
const SERIES_FIELDS: { key: SeriesField; title: string; unit: string; format: (v: number | null) => string }[] = [
  { key: 'impressions', title: 'Impressions', unit: 'impressions / min', format: formatCount },
  { key: 'clicks', title: 'Clicks', unit: 'clicks / min', format: formatCount },
  { key: 'conversions', title: 'Conversions', unit: 'conversions / min', format: formatCount },
  { key: 'spend', title: 'Spend', unit: 'spend / min', format: formatDecimal },
  { key: 'revenue', title: 'Revenue', unit: 'revenue / min', format: formatDecimal },
];

const HOUR_MS = 3_600_000;

/**
 * The campaign's last hour per minute, split by `groupBy`, from REST; read
 * again whenever the channel's newest minute moves on.
 */
function useSplitSeries(id: string, groupBy: 'device' | 'country', minute: string | undefined) {
  const [answer, setAnswer] = useState<SeriesAnswer | null>(null);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    let cancelled = false;
    const to = Date.now();
    apiGet<SeriesAnswer>(`/api/v1/campaigns/${encodeURIComponent(id)}`, {
      step: '1m',
      group_by: groupBy,
      from: new Date(to - HOUR_MS).toISOString(),
      to: new Date(to + 60_000).toISOString(),
    })
      .then((a) => !cancelled && (setAnswer(a), setError(null)))
      .catch((e: unknown) => !cancelled && setError(messageOf(e)));
    return () => {
      cancelled = true;
    };
  }, [id, groupBy, minute]);
  return { answer, error };
}

function toSeries(answer: SeriesAnswer | null, groupBy: string, field: SeriesField): ChartSeries[] {
  return (answer?.series ?? [])
    .map((s) => ({
      name: s.tags[groupBy] ?? 'all',
      points: s.points.map((p) => ({ t: Date.parse(p.t), v: p[field] ?? null })),
    }))
    .sort((a, b) => a.name.localeCompare(b.name));
}

function SplitTable({ title, split, testId }: { title: string; split: Record<string, CampaignFields> | undefined; testId: string }) {
  const rows = Object.entries(split ?? {}).sort((a, b) => b[1].impressions - a[1].impressions || a[0].localeCompare(b[0]));
  return (
    <div className="table-scroll">
      <table className="data" data-testid={testId}>
        <thead>
          <tr>
            <th>{title}</th>
            {CAMPAIGN_COLUMNS.map((c) => (
              <th key={c.key} className="num" title={c.hint}>
                {c.title}
              </th>
            ))}
          </tr>
        </thead>
        <tbody>
          {rows.length === 0 && (
            <tr>
              <td colSpan={CAMPAIGN_COLUMNS.length + 1} className="dim">
                nothing today yet
              </td>
            </tr>
          )}
          {rows.map(([key, f]) => (
            <tr key={key} data-split={key}>
              <td>{key}</td>
              {CAMPAIGN_COLUMNS.map((c) => (
                <td key={c.key} className="num">
                  {c.format(f[c.key])}
                </td>
              ))}
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

/** One campaign: today's funnel, its split by device and country, and its last hour. */
export function Campaign({ id }: { id: string }) {
  const now = useNow();
  const [field, setField] = useState<SeriesField>('impressions');
  const live = useLive<CampaignLive>(`campaign:${id}`, null, (data: Json) => data as unknown as CampaignLive);
  const today = live.value?.today;
  const steps = funnel(today?.total ?? null);
  const top = Math.max(1, steps[0].count);
  const byDevice = useSplitSeries(id, 'device', live.value?.minute);
  const byCountry = useSplitSeries(id, 'country', live.value?.minute);
  const fieldInfo = SERIES_FIELDS.find((f) => f.key === field)!;
  const day = live.value?.day?.slice(0, 10) ?? 'today';
  const todayScope = `today, ${day} (UTC), closed minutes, event time`;
  const hourScope = `last hour per minute, event time, to ${formatClock(now)} UTC`;

  return (
    <div className="stack">
      <div className="toolbar">
        <a href="/ads" onClick={followLink}>
          ← All campaigns
        </a>
        <h2 className="page-title">Campaign {id}</h2>
      </div>
      <div className="grid-2">
        <Tile title="Funnel" scope={todayScope} updatedAt={live.updatedAt} now={now} testId="funnel">
          <div className="funnel">
            {steps.map((s) => (
              <div key={s.step} className="funnel-step" data-step={s.step.toLowerCase()} data-value={s.count}>
                <div className="funnel-label">
                  <span>{s.step}</span>
                  <span className="num">{formatCount(s.count)}</span>
                </div>
                <div className="funnel-bar" style={{ width: `${Math.max(0.5, (s.count / top) * 100)}%` }} />
                {s.rateName && (
                  <div className="hint">
                    {s.rateName} {formatPercent(s.rate)} of the step before
                  </div>
                )}
              </div>
            ))}
          </div>
        </Tile>
        <Tile title="Money" scope={todayScope} updatedAt={live.updatedAt} now={now}>
          <table className="data">
            <tbody>
              {CAMPAIGN_COLUMNS.filter((c) => !['impressions', 'clicks', 'conversions'].includes(c.key)).map((c) => (
                <tr key={c.key}>
                  <td title={c.hint}>{c.title}</td>
                  <td className="num">{c.format(today?.total?.[c.key])}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </Tile>
      </div>
      <Tile title="By device" scope={todayScope} updatedAt={live.updatedAt} now={now}>
        <SplitTable title="Device" split={today?.by_device} testId="campaign-by-device" />
      </Tile>
      <Tile title="By country" scope={todayScope} updatedAt={live.updatedAt} now={now}>
        <SplitTable title="Country" split={today?.by_country} testId="campaign-by-country" />
      </Tile>
      <div className="toolbar">
        <div className="segmented" role="group" aria-label="Series">
          {SERIES_FIELDS.map((f) => (
            <button key={f.key} type="button" aria-pressed={f.key === field} onClick={() => setField(f.key)}>
              {f.title}
            </button>
          ))}
        </div>
      </div>
      <div className="grid-2">
        <Tile title={`${fieldInfo.title} by device`} scope={hourScope} updatedAt={live.updatedAt} now={now}>
          <LineChart
            label={`${fieldInfo.title} per minute by device`}
            unit={fieldInfo.unit}
            format={fieldInfo.format}
            from={now - HOUR_MS}
            to={now}
            series={toSeries(byDevice.answer, 'device', field)}
            testId="campaign-device-chart"
          />
          <ErrorLine error={byDevice.error} />
        </Tile>
        <Tile title={`${fieldInfo.title} by country`} scope={hourScope} updatedAt={live.updatedAt} now={now}>
          <LineChart
            label={`${fieldInfo.title} per minute by country`}
            unit={fieldInfo.unit}
            format={fieldInfo.format}
            from={now - HOUR_MS}
            to={now}
            series={toSeries(byCountry.answer, 'country', field)}
            testId="campaign-country-chart"
          />
          <ErrorLine error={byCountry.error} />
        </Tile>
      </div>
    </div>
  );
}
