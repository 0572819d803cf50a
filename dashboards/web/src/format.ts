// One way to write each kind of number, used by every page, so the same
// value reads the same everywhere: counts with thousands separators, money
// and scores with two decimals, ratios as percentages, durations in seconds.
// A value that is not known (a ratio whose divisor is 0) is an en dash.

const counts = new Intl.NumberFormat('en', { maximumFractionDigits: 0 });
const decimals = new Intl.NumberFormat('en', { minimumFractionDigits: 2, maximumFractionDigits: 2 });
const oneDecimal = new Intl.NumberFormat('en', { minimumFractionDigits: 1, maximumFractionDigits: 1 });
const percents = new Intl.NumberFormat('en', { style: 'percent', minimumFractionDigits: 2, maximumFractionDigits: 2 });
const compacts = new Intl.NumberFormat('en', { notation: 'compact', maximumFractionDigits: 1 });

export const MISSING = '–';

function known(v: number | null | undefined): v is number {
  return typeof v === 'number' && Number.isFinite(v);
}

/** Integral counts: 12,345. */
export function formatCount(v: number | null | undefined): string {
  return known(v) ? counts.format(v) : MISSING;
}

/** Money (spend, revenue, CPA) and scores: 12.50. */
export function formatDecimal(v: number | null | undefined): string {
  return known(v) ? decimals.format(v) : MISSING;
}

/** A rate or a per-session figure: 7.2. */
export function formatRate(v: number | null | undefined): string {
  return known(v) ? oneDecimal.format(v) : MISSING;
}

/** A ratio between 0 and 1 as a percentage: 3.10%. */
export function formatPercent(v: number | null | undefined): string {
  return known(v) ? percents.format(v) : MISSING;
}

/** A multiple, as ROAS is: 6.40×. */
export function formatMultiple(v: number | null | undefined): string {
  return known(v) ? `${decimals.format(v)}×` : MISSING;
}

/** Seconds as 95.5 s, or 2 min 5 s from two minutes on. */
export function formatSeconds(v: number | null | undefined): string {
  if (!known(v)) return MISSING;
  if (v < 120) return `${oneDecimal.format(v)} s`;
  const minutes = Math.floor(v / 60);
  return `${counts.format(minutes)} min ${counts.format(Math.round(v - minutes * 60))} s`;
}

/** Axis labels, where space is short: 12.3K. */
export function formatCompact(v: number): string {
  return compacts.format(v);
}

/** A time of day in UTC (the pipeline's windows are UTC): 14:05. */
export function formatClock(t: number, withSeconds = false): string {
  const iso = new Date(t).toISOString();
  return withSeconds ? iso.slice(11, 19) : iso.slice(11, 16);
}

/** A date and time in UTC: 2026-12-03 14:05 UTC. */
export function formatDateTime(t: number): string {
  const iso = new Date(t).toISOString();
  return `${iso.slice(0, 10)} ${iso.slice(11, 16)} UTC`;
}

/** How long ago, for freshness labels: 3 s ago, 2 min ago. */
export function formatAge(ms: number): string {
  const s = Math.max(0, Math.round(ms / 1000));
  return s < 120 ? `${s} s ago` : `${Math.round(s / 60)} min ago`;
}
