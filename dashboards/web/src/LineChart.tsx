// A small SVG time-series chart shared by the pages: time along x (UTC), one
// y axis with its unit, a line per series, and a tooltip with the exact
// values at the time under the pointer. Drawn at the container's own width,
// so the labels keep their size on a phone.
import { useEffect, useRef, useState, type PointerEvent } from 'react';
import { formatClock, formatCompact, formatDateTime, MISSING } from './format';

export interface ChartPoint {
  t: number;
  v: number | null;
}

export interface ChartSeries {
  name: string;
  points: ChartPoint[];
}

interface Props {
  series: ChartSeries[];
  /** The y axis's unit, written beside it: "events / min", "seconds". */
  unit: string;
  /** Exact values in the tooltip, formatted as the page's tables write them. */
  format: (v: number | null) => string;
  /** The time range shown; by default the points' own. */
  from?: number;
  to?: number;
  /** Rank axes run downwards: 1 at the top. */
  inverted?: boolean;
  /** The axis's far end when it is fixed (a top 50's ranks), else from the values. */
  yMax?: number;
  height?: number;
  label: string;
  testId?: string;
}

const PAD = { left: 52, right: 14, top: 22, bottom: 26 };
export const SERIES_COLOURS = 8;
/** A line shorter than this many pixels is drawn as dots as well. */
const SHORT_LINE_PX = 12;

function niceMax(v: number): number {
  if (v <= 0) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(v));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * magnitude >= v) return step * magnitude;
  return 10 * magnitude;
}

function useWidth(): [React.RefObject<HTMLDivElement | null>, number] {
  const ref = useRef<HTMLDivElement>(null);
  const [width, setWidth] = useState(600);
  useEffect(() => {
    const el = ref.current;
    if (!el) return;
    const observer = new ResizeObserver(([entry]) => setWidth(Math.max(200, Math.floor(entry.contentRect.width))));
    observer.observe(el);
    return () => observer.disconnect();
  }, []);
  return [ref, width];
}

export function LineChart({ series, unit, format, from, to, inverted = false, yMax, height = 220, label, testId }: Props) {
  const [ref, width] = useWidth();
  const [hoverT, setHoverT] = useState<number | null>(null);
  const times = [...new Set(series.flatMap((s) => s.points.map((p) => p.t)))].sort((a, b) => a - b);
  const start = from ?? times[0] ?? Date.now() - 3_600_000;
  const end = to ?? times[times.length - 1] ?? Date.now();
  const span = Math.max(1, end - start);
  const values = series.flatMap((s) => s.points.map((p) => p.v)).filter((v): v is number => v !== null);
  const top = yMax ?? niceMax(Math.max(0, ...values));
  const low = inverted ? 1 : 0;
  const innerW = width - PAD.left - PAD.right;
  const innerH = height - PAD.top - PAD.bottom;
  const x = (t: number) => PAD.left + ((t - start) / span) * innerW;
  const y = (v: number) =>
    inverted
      ? PAD.top + ((v - low) / Math.max(1, top - low)) * innerH
      : PAD.top + innerH - ((v - low) / (top - low)) * innerH;
  // Fifths of a nice maximum are round numbers (1K steps up to 5K); a rank
  // axis starts at 1, not 0.
  const ticks = inverted
    ? [1, ...[0.2, 0.4, 0.6, 0.8, 1].map((f) => Math.round(f * top))]
    : [0, 0.2, 0.4, 0.6, 0.8, 1].map((f) => f * top);
  const tickCount = width < 500 ? 3 : 5;
  const timeTicks = Array.from({ length: tickCount }, (_, i) => start + (i / (tickCount - 1)) * span);
  const longSpan = span > 20 * 3_600_000;

  const sorted = series.map((s) => [...s.points].sort((a, b) => a.t - b.t));
  const paths = sorted.map((points) => {
    let d = '';
    let pen = false;
    for (const p of points) {
      if (p.v === null) {
        pen = false;
        continue;
      }
      d += `${pen ? 'L' : 'M'}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`;
      pen = true;
    }
    return d;
  });
  // Points a line would not show: one between gaps draws no line, and a
  // series whose line is only a few pixels long (two windows of the last six
  // hours) reads as nothing, or hides in a gridline. Those are marked.
  const dots = sorted.map((points) => {
    const drawn = points.filter((p): p is { t: number; v: number } => p.v !== null);
    if (drawn.length === 0) return [];
    const xs = drawn.map((p) => x(p.t));
    const ys = drawn.map((p) => y(p.v));
    const extent = Math.hypot(Math.max(...xs) - Math.min(...xs), Math.max(...ys) - Math.min(...ys));
    if (extent < SHORT_LINE_PX) return drawn;
    return points.filter(
      (p, i) => p.v !== null && (points[i - 1]?.v ?? null) === null && (points[i + 1]?.v ?? null) === null,
    ) as { t: number; v: number }[];
  });

  const onMove = (event: PointerEvent<SVGSVGElement>) => {
    if (times.length === 0) return;
    const box = event.currentTarget.getBoundingClientRect();
    const t = start + ((event.clientX - box.left - PAD.left) / innerW) * span;
    let nearest = times[0];
    for (const candidate of times) if (Math.abs(candidate - t) < Math.abs(nearest - t)) nearest = candidate;
    setHoverT(nearest);
  };
  const hovered =
    hoverT === null
      ? null
      : series.map((s) => ({ name: s.name, v: s.points.find((p) => p.t === hoverT)?.v ?? null }));
  const tipLeft = hoverT !== null && x(hoverT) > width / 2;

  return (
    <div className="line-chart" ref={ref} data-testid={testId} data-points={values.length}>
      <svg
        width={width}
        height={height}
        role="img"
        aria-label={label}
        onPointerMove={onMove}
        onPointerLeave={() => setHoverT(null)}
      >
        <text className="axis unit" x={4} y={12}>
          {unit}
        </text>
        {ticks.map((v) => (
          <g key={v}>
            <line className="gridline" x1={PAD.left} x2={width - PAD.right} y1={y(v)} y2={y(v)} />
            <text className="axis" x={PAD.left - 6} y={y(v) + 4} textAnchor="end">
              {formatCompact(v)}
            </text>
          </g>
        ))}
        {timeTicks.map((t, i) => (
          <text
            key={t}
            className="axis"
            x={x(t)}
            y={height - 8}
            textAnchor={i === 0 ? 'start' : i === timeTicks.length - 1 ? 'end' : 'middle'}
          >
            {longSpan ? `${new Date(t).toISOString().slice(5, 10)} ${formatClock(t)}` : formatClock(t)}
            {i === timeTicks.length - 1 ? ' UTC' : ''}
          </text>
        ))}
        {paths.map((d, i) => d && <path key={series[i].name} className={`series series-${i % SERIES_COLOURS}`} d={d} />)}
        {dots.map((points, i) =>
          points.map((p) => (
            <circle
              key={`${series[i].name}-dot-${p.t}`}
              className={`dot series-${i % SERIES_COLOURS}`}
              cx={x(p.t)}
              cy={y(p.v)}
              r={3.5}
            />
          )),
        )}
        {hoverT !== null && <line className="cursor" x1={x(hoverT)} x2={x(hoverT)} y1={PAD.top} y2={PAD.top + innerH} />}
        {values.length === 0 && (
          <text className="axis" x={width / 2} y={height / 2} textAnchor="middle">
            no data in this range yet
          </text>
        )}
      </svg>
      {hovered && hoverT !== null && (
        <div
          className="tooltip"
          role="tooltip"
          style={tipLeft ? { right: width - x(hoverT) + 8 } : { left: x(hoverT) + 8 }}
        >
          <div className="dim">{formatDateTime(hoverT)}</div>
          {hovered.map((h, i) => (
            <div key={h.name}>
              <span className={`swatch series-${i % SERIES_COLOURS}`} /> {h.name}: {h.v === null ? MISSING : format(h.v)}
            </div>
          ))}
        </div>
      )}
      {series.length > 1 && (
        <div className="legend">
          {series.map((s, i) => (
            <span key={s.name}>
              <span className={`swatch series-${i % SERIES_COLOURS}`} /> {s.name}
            </span>
          ))}
        </div>
      )}
    </div>
  );
}
