// Business alerts: the `alerts` channel's state (what is pending or firing
// now), the history route and the rules route, as the dashboard reads them.
import type { Json } from './data';

export interface ActiveAlert {
  key: string;
  rule: string;
  tags: Record<string, string>;
  state: 'pending' | 'firing';
  value: number | null;
  threshold: number | null;
  /** When it entered its state (the window's start, event time). */
  since: string;
  /** The newest window it was evaluated in. */
  window: string;
}

export interface AlertHistoryEntry {
  time: string;
  rule: string;
  tags: Record<string, string>;
  state: 'pending' | 'firing' | 'resolved' | null;
  value: number | null;
  threshold: number | null;
}

export interface AlertHistoryAnswer {
  alerts: AlertHistoryEntry[];
  truncated: boolean;
}

/** A rule as the rules API answers it: the TOML keys of docs/alerts.md. */
export interface AlertRule {
  name: string;
  kind: 'threshold' | 'change' | 'trending' | 'campaign';
  for: number;
  resolve_for: number;
  summary?: string;
  [key: string]: unknown;
}

export interface AlertRulesAnswer {
  rules: AlertRule[];
}

function asRecord(v: Json | undefined): Record<string, Json> {
  return v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Record<string, Json>) : {};
}

/** The alerts of the channel's data, firing first, then by rule and series. */
export function activeAlerts(data: Json | null): ActiveAlert[] {
  const alerts = asRecord(asRecord(data ?? undefined).alerts);
  return Object.entries(alerts)
    .map(([key, raw]) => {
      const a = asRecord(raw);
      const tags = Object.fromEntries(Object.entries(asRecord(a.tags)).map(([k, v]) => [k, String(v)]));
      return {
        key,
        rule: String(a.rule ?? key),
        tags,
        state: a.state === 'firing' ? 'firing' : 'pending',
        value: typeof a.value === 'number' ? a.value : null,
        threshold: typeof a.threshold === 'number' ? a.threshold : null,
        since: String(a.since ?? ''),
        window: String(a.window ?? ''),
      } satisfies ActiveAlert;
    })
    .sort((x, y) => (x.state === y.state ? x.key.localeCompare(y.key) : x.state === 'firing' ? -1 : 1));
}

/** `country=de, device=ios`, or `all` for the series over everything. */
export function seriesLabel(tags: Record<string, string>): string {
  const parts = Object.entries(tags).map(([k, v]) => `${k}=${v}`);
  return parts.length ? parts.join(', ') : 'all';
}

/** A rule's condition in one line, e.g. `traffic.events{event_type=like} < 100 for 3 windows`. */
export function describeRule(rule: AlertRule): string {
  const where = (rule.where ?? {}) as Record<string, string>;
  const filter = Object.keys(where).length ? `{${Object.entries(where).map(([k, v]) => `${k}=${v}`).join(',')}}` : '';
  const by = Array.isArray(rule.group_by) && rule.group_by.length ? ` per ${rule.group_by.join(', ')}` : '';
  const forWindows = rule.for > 1 ? ` for ${rule.for} windows` : '';
  switch (rule.kind) {
    case 'threshold':
      return `${rule.measurement}.${rule.field}${filter}${by} ${rule.op} ${rule.value}${forWindows}`;
    case 'change':
      return `${rule.measurement}.${rule.field}${filter}${by} ${rule.direction} of ${rule.percent} % against the last ${rule.baseline} windows${forWindows}`;
    case 'trending':
      return `trending ${rule.window} ${rule.metric}${rule.tag ? ` of ${rule.tag}` : ''} ${rule.op} ${rule.value}${forWindows}`;
    case 'campaign':
      return `campaign ${String(rule.metric).toUpperCase()}${rule.campaign_id ? ` of ${rule.campaign_id}` : ''} ${rule.op} ${rule.value}${forWindows}`;
    default:
      return rule.kind;
  }
}
