// Campaign figures as the Ads pages read them from `GET /api/v1/campaigns`
// and the `campaigns` and `campaign:<id>` channels (docs/api.md).
import type { Json } from './data';

export interface CampaignFields {
  impressions: number;
  clicks: number;
  clicks_unattributed?: number;
  conversions: number;
  spend: number;
  revenue: number;
  /** Absent (channels) or null (REST) when the divisor is 0. */
  ctr?: number | null;
  cvr?: number | null;
  cpa?: number | null;
  roas?: number | null;
}

export interface CampaignRow extends CampaignFields {
  campaign_id: string;
}

export interface CampaignTable {
  /** The UTC day the totals are of (midnight, RFC 3339). */
  day: string | null;
  /** The newest minute with ads results, and whether it has closed. */
  minute: string | null;
  final: boolean;
  rows: CampaignRow[];
  /** Each campaign's values in `minute`, early until it closes. */
  current: CampaignRow[];
}

export type CampaignColumn =
  | 'campaign_id'
  | 'impressions'
  | 'clicks'
  | 'conversions'
  | 'spend'
  | 'revenue'
  | 'ctr'
  | 'cvr'
  | 'cpa'
  | 'roas';

export function columnValue(row: CampaignRow, key: CampaignColumn): number | string | null | undefined {
  return row[key];
}

function isObject(v: Json | undefined): v is { [key: string]: Json } {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Today's totals per campaign from the `campaigns` channel's data. */
export function campaignsFromChannel(data: Json): CampaignTable | null {
  if (!isObject(data)) return null;
  const campaigns = isObject(data.campaigns) ? data.campaigns : {};
  const rows: CampaignRow[] = [];
  const current: CampaignRow[] = [];
  for (const [id, entry] of Object.entries(campaigns)) {
    if (!isObject(entry)) continue;
    if (isObject(entry.today)) rows.push({ campaign_id: id, ...(entry.today as unknown as CampaignFields) });
    if (isObject(entry.current)) current.push({ campaign_id: id, ...(entry.current as unknown as CampaignFields) });
  }
  return {
    day: typeof data.day === 'string' ? data.day : null,
    minute: typeof data.minute === 'string' ? data.minute : null,
    final: data.final === true,
    rows,
    current,
  };
}

/** Today's midnight, UTC, of `now`. */
export function utcMidnight(now: number): string {
  return `${new Date(now).toISOString().slice(0, 10)}T00:00:00Z`;
}

/** The funnel's steps, each with its share of the step before. */
export function funnel(f: CampaignFields | null): { step: string; count: number; rate: number | null; rateName: string }[] {
  const impressions = f?.impressions ?? 0;
  const clicks = f?.clicks ?? 0;
  const conversions = f?.conversions ?? 0;
  return [
    { step: 'Impressions', count: impressions, rate: null, rateName: '' },
    { step: 'Clicks', count: clicks, rate: impressions > 0 ? clicks / impressions : null, rateName: 'CTR' },
    { step: 'Conversions', count: conversions, rate: clicks > 0 ? conversions / clicks : null, rateName: 'CVR' },
  ];
}
