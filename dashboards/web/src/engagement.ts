// Engagement figures: the `engagement` channel holds the newest minute per
// (country, segment) pair; the page shows them summed by segment, by country
// and in all, combining each field the way `GET /api/v1/engagement` does.
import type { Json } from './data';

export interface EngagementFields {
  sessions_started: number;
  sessions_ended: number;
  active_sessions: number;
  engagement_score: number;
  /** Absent (channel) or null (REST) when no session ended. */
  avg_session_seconds?: number | null;
  events_per_session?: number | null;
}

export interface EngagementNow {
  minute: string | null;
  final: boolean;
  total: EngagementFields;
  bySegment: Record<string, EngagementFields>;
  byCountry: Record<string, EngagementFields>;
}

/**
 * Sums counts and the score; the averages are weighted by the sessions that
 * ended, as only those have a duration, and stay unknown when none did.
 */
export function combineEngagement(parts: EngagementFields[]): EngagementFields {
  const out: EngagementFields = { sessions_started: 0, sessions_ended: 0, active_sessions: 0, engagement_score: 0 };
  let weighted = 0;
  let seconds = 0;
  let events = 0;
  for (const p of parts) {
    out.sessions_started += p.sessions_started ?? 0;
    out.sessions_ended += p.sessions_ended ?? 0;
    out.active_sessions += p.active_sessions ?? 0;
    out.engagement_score += p.engagement_score ?? 0;
    const ended = p.sessions_ended ?? 0;
    if (ended > 0 && typeof p.avg_session_seconds === 'number' && typeof p.events_per_session === 'number') {
      weighted += ended;
      seconds += p.avg_session_seconds * ended;
      events += p.events_per_session * ended;
    }
  }
  out.avg_session_seconds = weighted > 0 ? seconds / weighted : null;
  out.events_per_session = weighted > 0 ? events / weighted : null;
  return out;
}

function groupBy(entries: [string, EngagementFields][], part: (key: string) => string): Record<string, EngagementFields> {
  const groups = new Map<string, EngagementFields[]>();
  for (const [key, fields] of entries) {
    const name = part(key);
    groups.set(name, [...(groups.get(name) ?? []), fields]);
  }
  return Object.fromEntries([...groups].map(([name, parts]) => [name, combineEngagement(parts)]));
}

/** The channel's groups ("US/new") summed by segment, by country and in all. */
export function engagementFromChannel(data: Json): EngagementNow | null {
  if (typeof data !== 'object' || data === null || Array.isArray(data)) return null;
  const d = data as { minute?: string; final?: boolean; groups?: Record<string, EngagementFields> };
  if (typeof d.minute !== 'string') return null;
  const entries = Object.entries(d.groups ?? {});
  const country = (key: string) => key.slice(0, Math.max(0, key.indexOf('/'))) || key;
  const segment = (key: string) => (key.includes('/') ? key.slice(key.indexOf('/') + 1) : 'unknown');
  return {
    minute: d.minute,
    final: d.final === true,
    total: combineEngagement(entries.map(([, f]) => f)),
    bySegment: groupBy(entries, segment),
    byCountry: groupBy(entries, country),
  };
}
