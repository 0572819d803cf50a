import { useState } from 'react';
import { apiGet } from '../api';
import {
  campaignsFromChannel,
  columnValue,
  utcMidnight,
  type CampaignColumn,
  type CampaignTable,
} from '../ads';
import { formatClock, formatCount, formatDecimal, formatMultiple, formatPercent } from '../format';
import { useLive, useNow } from '../live';
import { followLink } from '../router';
import { sortRows, toggleSort, type SortState } from '../sorting';
import { ErrorLine, Tile } from '../ui';
import type { CampaignsAnswer } from '../wire/types';

interface Column {
  key: Exclude<CampaignColumn, 'campaign_id'>;
  title: string;
  format: (v: number | null | undefined) => string;
  hint?: string;
}

export const CAMPAIGN_COLUMNS: Column[] = [
  { key: 'impressions', title: 'Impressions', format: formatCount },
  { key: 'clicks', title: 'Clicks', format: formatCount },
  { key: 'conversions', title: 'Conversions', format: formatCount },
  { key: 'spend', title: 'Spend', format: formatDecimal },
  { key: 'revenue', title: 'Revenue', format: formatDecimal },
  { key: 'ctr', title: 'CTR', format: formatPercent, hint: 'clicks / impressions' },
  { key: 'cvr', title: 'CVR', format: formatPercent, hint: 'conversions / clicks' },
  { key: 'cpa', title: 'CPA', format: formatDecimal, hint: 'spend / conversions' },
  { key: 'roas', title: 'ROAS', format: formatMultiple, hint: 'revenue / spend' },
];


function scopeOf(table: CampaignTable | null): string {
  if (!table?.day) return 'today (UTC), closed minutes, event time';
  const open = table.minute && !table.final ? `; the open minute ${formatClock(Date.parse(table.minute))} counts once closed` : '';
  return `today, ${table.day.slice(0, 10)} (UTC), closed minutes, event time${open}`;
}

export function SortHeader<K extends string>({
  sort,
  column,
  title,
  hint,
  onSort,
  numeric = true,
}: {
  sort: SortState<K>;
  column: K;
  title: string;
  hint?: string;
  onSort: (key: K) => void;
  numeric?: boolean;
}) {
  const active = sort.key === column;
  return (
    <th
      className={numeric ? 'num' : undefined}
      aria-sort={active ? (sort.direction === 'asc' ? 'ascending' : 'descending') : 'none'}
      title={hint}
    >
      <button type="button" className="sort" onClick={() => onSort(column)}>
        {title}
        {active ? (sort.direction === 'asc' ? ' ▲' : ' ▼') : ''}
      </button>
    </th>
  );
}

/** Every campaign's totals for today, live and sortable. */
export function Ads() {
  const now = useNow();
  const [sort, setSort] = useState<SortState<CampaignColumn>>({ key: 'spend', direction: 'desc' });
  const live = useLive<CampaignTable>(
    'campaigns',
    async () => {
      const answer = await apiGet<CampaignsAnswer>('/api/v1/campaigns');
      return { day: utcMidnight(Date.parse(answer.from)), minute: null, final: true, rows: answer.campaigns, current: [] };
    },
    (data) => campaignsFromChannel(data),
  );
  const table = live.value;
  const rows = sortRows(table?.rows ?? [], sort, columnValue, (r) => r.campaign_id);
  const onSort = (key: CampaignColumn) => setSort((s) => toggleSort(s, key));

  return (
    <div className="stack">
      <Tile title="Campaigns" scope={scopeOf(table)} updatedAt={live.updatedAt} now={now} testId="campaigns-tile">
        <div className="table-scroll">
          <table
            className="data"
            data-testid="campaigns-table"
            data-day={table?.day ?? ''}
            data-minute={table?.minute ?? ''}
            data-final={table?.final ? 'true' : 'false'}
          >
            <thead>
              <tr>
                <SortHeader sort={sort} column="campaign_id" title="Campaign" onSort={onSort} numeric={false} />
                {CAMPAIGN_COLUMNS.map((c) => (
                  <SortHeader key={c.key} sort={sort} column={c.key} title={c.title} hint={c.hint} onSort={onSort} />
                ))}
              </tr>
            </thead>
            <tbody>
              {rows.length === 0 && (
                <tr>
                  <td colSpan={CAMPAIGN_COLUMNS.length + 1} className="dim">
                    no closed minute today yet: the first closes a minute after the first events
                  </td>
                </tr>
              )}
              {rows.map((row) => (
                <tr key={row.campaign_id} data-campaign={row.campaign_id}>
                  <td>
                    <a href={`/ads/${encodeURIComponent(row.campaign_id)}`} onClick={followLink}>
                      {row.campaign_id}
                    </a>
                  </td>
                  {CAMPAIGN_COLUMNS.map((c) => (
                    <td key={c.key} className="num" data-field={c.key} data-value={row[c.key] ?? ''}>
                      {c.format(row[c.key])}
                    </td>
                  ))}
                </tr>
              ))}
            </tbody>
          </table>
        </div>
        <ErrorLine error={live.error} />
      </Tile>
      <Tile
        title="Current minute"
        scope={
          table?.minute
            ? `${formatClock(Date.parse(table.minute))} UTC, event time, ${table.final ? 'closed' : 'open (early result)'}`
            : 'the newest minute with ads results, event time'
        }
        updatedAt={live.updatedAt}
        now={now}
        testId="current-minute-tile"
      >
        <div className="table-scroll">
          <table className="data" data-testid="current-minute-table">
            <thead>
              <tr>
                <th>Campaign</th>
                {CAMPAIGN_COLUMNS.slice(0, 5).map((c) => (
                  <th key={c.key} className="num">
                    {c.title}
                  </th>
                ))}
              </tr>
            </thead>
            <tbody>
              {(table?.current.length ?? 0) === 0 && (
                <tr>
                  <td colSpan={6} className="dim">
                    waiting for the first minute
                  </td>
                </tr>
              )}
              {sortRows(table?.current ?? [], sort, columnValue, (r) => r.campaign_id).map((row) => (
                <tr key={row.campaign_id} data-campaign-now={row.campaign_id}>
                  <td>{row.campaign_id}</td>
                  {CAMPAIGN_COLUMNS.slice(0, 5).map((c) => (
                    <td key={c.key} className="num">
                      {c.format(row[c.key])}
                    </td>
                  ))}
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      </Tile>
      <div className="hint">Click a column to sort by it; a campaign for its funnel and its last hour by device and country.</div>
    </div>
  );
}
