// Pieces every page shares: the connection badge, tiles that say what "now"
// means and when their data went stale, and the "not allowed" page.
import type { ReactNode } from 'react';
import { formatAge } from './format';
import { STALE_AFTER_MS, type Status } from './live';

export function StatusBadge({ status }: { status: Status }) {
  const label =
    status.kind === 'live'
      ? 'live'
      : status.kind === 'connecting'
        ? 'connecting…'
        : status.kind === 'offline'
          ? 'offline'
          : `reconnecting in ${status.inSeconds}s`;
  return (
    <span className={`status status-${status.kind}`} data-testid="ws-status" data-status={status.kind}>
      <span className="dot" aria-hidden="true" />
      {label}
    </span>
  );
}

/** "updated 2 s ago", or a stale warning once nothing has changed for more than 5 s. */
export function Freshness({ updatedAt, now }: { updatedAt: number | null; now: number }) {
  if (updatedAt === null) return <span className="freshness dim">waiting for data</span>;
  const age = now - updatedAt;
  const stale = age > STALE_AFTER_MS;
  return (
    <span className={`freshness ${stale ? 'stale' : 'dim'}`} data-stale={stale}>
      {stale ? `stale: no update for ${formatAge(age).replace(' ago', '')}` : `updated ${formatAge(age)}`}
    </span>
  );
}

interface TileProps {
  title: string;
  /** What "now" means for this tile: "current minute, event time". */
  scope: string;
  updatedAt: number | null;
  now: number;
  children: ReactNode;
  className?: string;
  testId?: string;
  actions?: ReactNode;
}

export function Tile({ title, scope, updatedAt, now, children, className, testId, actions }: TileProps) {
  const stale = updatedAt !== null && now - updatedAt > STALE_AFTER_MS;
  return (
    <section
      className={`card tile ${stale ? 'is-stale' : ''} ${className ?? ''}`}
      data-testid={testId}
      data-updated-at={updatedAt ?? undefined}
    >
      <div className="tile-head">
        <div>
          <div className="label">{title}</div>
          <div className="scope">{scope}</div>
        </div>
        {actions}
      </div>
      {children}
      <div className="tile-foot">
        <Freshness updatedAt={updatedAt} now={now} />
      </div>
    </section>
  );
}

export function NotAllowed({ title }: { title: string }) {
  return (
    <section className="card not-allowed" data-testid="not-allowed" role="alert">
      <h2>Not allowed</h2>
      <p>Your role may not open the {title} page. Ask an admin if you need it.</p>
    </section>
  );
}

export function NotFound() {
  return (
    <section className="card not-allowed" data-testid="not-found">
      <h2>No such page</h2>
      <p>
        <a href="/">Back to the overview</a>
      </p>
    </section>
  );
}

export function ErrorLine({ error }: { error: string | null }) {
  return error ? (
    <div className="hint error" role="status">
      {error}
    </div>
  ) : null;
}
