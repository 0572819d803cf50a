// Every REST answer and WebSocket message the dashboard reads, as the
// server sends it (docs/api.md). `samples.check.ts` holds a real sample of
// each, written by the server's tests (ws-server/tests/wire.rs), typed with
// these declarations: a field renamed, added or removed on either side
// fails `tsc`.
import type { CampaignFields } from '../ads';
import type { WireWindow } from '../data';
import type { EngagementFields } from '../engagement';
import type { TrendingList, TrendingTag } from '../trending';

export type { CampaignFields, EngagementFields, TrendingList, TrendingTag, WireWindow };

/** What a channel update's data is: a JSON merge patch of the channel's data. */
export type MergePatch<T> = T extends readonly unknown[]
  ? T
  : T extends object
    ? { [K in keyof T]?: MergePatch<T[K]> | null }
    : T;

export interface ChannelSnapshot<T> {
  type: 'snapshot';
  channel: string;
  seq: number;
  data: T;
}

export interface ChannelUpdate<T> {
  type: 'update';
  channel: string;
  seq: number;
  data: MergePatch<T>;
}

export interface AuthenticatedMessage {
  type: 'authenticated';
  role: string | null;
}

export interface ErrorMessage {
  type: 'error';
  code: string;
  message: string;
}

/** Every error answer of the REST API. */
export interface ErrorAnswer {
  error: string;
  code: string;
  /** The permission a 403 names. */
  permission?: string;
}

/** `POST /api/v1/auth/login` and `/refresh`. */
export interface TokenAnswer {
  access_token: string;
  token_type: 'Bearer';
  expires_in: number;
  refresh_token: string;
  refresh_expires_in: number;
  name: string;
  role: string;
}

/** `GET /api/v1/metrics`. */
export interface MetricsAnswer {
  name: string;
  field: string;
  step: string;
  series: { tags: Record<string, string>; points: { t: string; v: number | null }[] }[];
}

/** The `overview` channel's data. */
export interface OverviewData {
  windows: Record<string, WireWindow>;
}

/** The `trending:*` channels' data: REST's list, without its `null`s. */
export type TrendingChannel = Omit<TrendingList, 'start' | 'end'> & { start?: string; end?: string };

/** `GET /api/v1/trending/{tag}`. */
export interface TagHistory {
  tag: string;
  window: string;
  from: string;
  to: string;
  points: ({ t: string } & Omit<TrendingTag, 'tag'>)[];
}

/** `GET /api/v1/campaigns`. */
export interface CampaignsAnswer {
  from: string;
  to: string;
  step: string;
  campaigns: ({ campaign_id: string } & CampaignFields)[];
}

/** `GET /api/v1/campaigns/{id}`. */
export interface CampaignSeriesAnswer {
  campaign_id: string;
  step: string;
  group_by: 'device' | 'country' | null;
  series: { tags: Record<string, string>; points: ({ t: string } & CampaignFields)[] }[];
}

/** The `campaigns` channel's data. */
export interface CampaignsChannel {
  day?: string;
  minute?: string;
  final?: boolean;
  campaigns: Record<string, { current?: CampaignFields; today?: CampaignFields }>;
}

/** A campaign's values in `campaign:<id>`: in all, by device, by country. */
export interface CampaignSplit {
  total?: CampaignFields;
  by_device?: Record<string, CampaignFields>;
  by_country?: Record<string, CampaignFields>;
}

/** The `campaign:<id>` channel's data. */
export interface CampaignChannel {
  campaign_id: string;
  day?: string;
  minute?: string;
  final?: boolean;
  current?: CampaignSplit;
  today?: CampaignSplit;
}

/** `GET /api/v1/engagement`. */
export interface EngagementAnswer {
  step: string;
  group_by: 'segment' | 'country' | null;
  series: { tags: Record<string, string>; points: ({ t: string } & EngagementFields)[] }[];
}

/** The `engagement` channel's data: the newest minute per "country/segment". */
export interface EngagementChannel {
  minute?: string;
  final?: boolean;
  groups: Record<string, EngagementFields>;
}

/** `POST /api/v1/query`. */
export interface QueryAnswer {
  columns: string[];
  rows: (string | number | null)[][];
  row_count: number;
  truncated: boolean;
  points_read: number;
  elapsed_ms: number;
}

/** A table of `GET /api/v1/query/tables`. */
export interface QueryTable {
  name: string;
  columns: string[];
  tags: string[];
  fields: string[];
}

export interface QueryTablesAnswer {
  tables: QueryTable[];
  /** What `tier` may be (`rt` unless a query filters on it). */
  tiers: string[];
}

export interface UsersAnswer {
  users: { name: string; role: string }[];
}

export interface TokenListEntry {
  id: string;
  role: string;
  name: string | null;
  created: string;
}

export interface TokensAnswer {
  tokens: TokenListEntry[];
}

/** `POST /api/v1/tokens`: the only answer that shows the token. */
export interface TokenCreated {
  token: string;
  id: string;
  role: string;
  name: string;
}

export interface AuditEntry {
  time: string;
  actor: string;
  action: string;
  client: string | null;
  detail: Record<string, unknown>;
  prev: string;
}

export interface AuditAnswer {
  entries: AuditEntry[];
  truncated: boolean;
}

/** `GET /api/v1/serving`. */
export interface ServingAnswer {
  database: string;
  live_database: string;
  store: string;
}

export interface ServingChange {
  time: string;
  action: 'promote' | 'rollback';
  database: string;
  previous: string;
  by: string;
}

/** `GET /api/v1/serving/history`: newest first. */
export interface ServingHistory {
  database: string;
  live_database: string;
  history: ServingChange[];
}

/** The samples the server's tests write, by name, each with its type. */
export interface WireSamples {
  rest_auth_login: TokenAnswer;
  rest_error: ErrorAnswer;
  rest_metrics: MetricsAnswer;
  rest_trending: TrendingList;
  rest_trending_empty: TrendingList;
  rest_trending_tag: TagHistory;
  rest_campaigns: CampaignsAnswer;
  rest_campaign: CampaignSeriesAnswer;
  rest_engagement: EngagementAnswer;
  rest_query: QueryAnswer;
  rest_query_tables: QueryTablesAnswer;
  rest_users: UsersAnswer;
  rest_tokens: TokensAnswer;
  rest_token_created: TokenCreated;
  rest_audit: AuditAnswer;
  rest_serving: ServingAnswer;
  rest_serving_history: ServingHistory;
  ws_authenticated: AuthenticatedMessage;
  ws_error: ErrorMessage;
  ws_overview_snapshot: ChannelSnapshot<OverviewData>;
  ws_overview_update: ChannelUpdate<OverviewData>;
  ws_trending_snapshot: ChannelSnapshot<TrendingChannel>;
  ws_trending_update: ChannelUpdate<TrendingChannel>;
  ws_campaigns_snapshot: ChannelSnapshot<CampaignsChannel>;
  ws_campaigns_update: ChannelUpdate<CampaignsChannel>;
  ws_campaign_snapshot: ChannelSnapshot<CampaignChannel>;
  ws_campaign_update: ChannelUpdate<CampaignChannel>;
  ws_engagement_snapshot: ChannelSnapshot<EngagementChannel>;
  ws_engagement_update: ChannelUpdate<EngagementChannel>;
}
