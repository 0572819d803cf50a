import type { MinuteWindow } from '../data';
import { HOUR_MS, MINUTE_MS } from '../data';

const W = 900;
const H = 260;
const PAD = { left: 56, right: 56, top: 16, bottom: 28 };

function niceMax(v: number): number {
  if (v <= 0) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(v));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (step * magnitude >= v) return step * magnitude;
  }
  return 10 * magnitude;
}

function compact(v: number): string {
  return Intl.NumberFormat('en', { notation: 'compact', maximumFractionDigits: 1 }).format(v);
}

function clock(t: number): string {
  return new Date(t).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

/** Events per minute (area, left axis) and active users (line, right axis) over the last hour. */
export function HistoryChart({ windows, now }: { windows: MinuteWindow[]; now: number }) {
  const end = now - (now % MINUTE_MS);
  const start = end - HOUR_MS + MINUTE_MS;
  const shown = windows.filter((w) => w.start >= start && w.start <= end);
  const maxEvents = niceMax(Math.max(0, ...shown.map((w) => w.total)));
  const maxUsers = niceMax(Math.max(0, ...shown.map((w) => w.activeUsers)));
  const innerW = W - PAD.left - PAD.right;
  const innerH = H - PAD.top - PAD.bottom;
  const x = (t: number) => PAD.left + ((t - start) / (end - start)) * innerW;
  const yEvents = (v: number) => PAD.top + innerH - (v / maxEvents) * innerH;
  const yUsers = (v: number) => PAD.top + innerH - (v / maxUsers) * innerH;

  const line = (y: (w: MinuteWindow) => number) =>
    shown.map((w, i) => `${i === 0 ? 'M' : 'L'}${x(w.start).toFixed(1)},${y(w).toFixed(1)}`).join('');
  const eventsLine = line((w) => yEvents(w.total));
  const area =
    shown.length > 0
      ? `${eventsLine}L${x(shown[shown.length - 1].start).toFixed(1)},${PAD.top + innerH}` +
        `L${x(shown[0].start).toFixed(1)},${PAD.top + innerH}Z`
      : '';
  const usersLine = line((w) => yUsers(w.activeUsers));
  const newest = shown.length > 0 ? shown[shown.length - 1] : null;
  const ticks = [0, 0.25, 0.5, 0.75, 1];
  const timeTicks = [0, 15, 30, 45, 59].map((m) => start + m * MINUTE_MS);

  return (
    <svg
      className="chart"
      viewBox={`0 0 ${W} ${H}`}
      role="img"
      aria-label="Events per minute and active users over the last hour"
    >
      {ticks.map((f) => (
        <g key={f}>
          <line className="grid" x1={PAD.left} x2={W - PAD.right} y1={yEvents(f * maxEvents)} y2={yEvents(f * maxEvents)} />
          <text className="axis" x={PAD.left - 8} y={yEvents(f * maxEvents) + 4} textAnchor="end">
            {compact(f * maxEvents)}
          </text>
          <text className="axis users" x={W - PAD.right + 8} y={yUsers(f * maxUsers) + 4}>
            {compact(f * maxUsers)}
          </text>
        </g>
      ))}
      {timeTicks.map((t) => (
        <text key={t} className="axis" x={x(t)} y={H - 8} textAnchor="middle">
          {clock(t)}
        </text>
      ))}
      {area && <path className="events-area" d={area} />}
      {eventsLine && <path className="events-line" d={eventsLine} />}
      {usersLine && <path className="users-line" d={usersLine} />}
      {/* The newest minute is marked, so a single (open) minute shows too. */}
      {newest && (
        <g>
          <circle className="events-dot" cx={x(newest.start)} cy={yEvents(newest.total)} r={3.5} />
          <circle className="users-dot" cx={x(newest.start)} cy={yUsers(newest.activeUsers)} r={3} />
        </g>
      )}
      {shown.length === 0 && (
        <text className="axis" x={W / 2} y={H / 2} textAnchor="middle">
          no data in the last hour
        </text>
      )}
    </svg>
  );
}
