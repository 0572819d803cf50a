// The signed-in dashboard: the header with the pages the role may open, the
// connection badge and the account, and the page the path names.
import { useEffect, useState } from 'react';
import { countDashboardView } from './analytics';
import { logout, type Session } from './auth';
import { useChannel, useConnectionStatus } from './live';
import { activeAlerts, seriesLabel, type ActiveAlert } from './alerts';
import { Admin } from './pages/Admin';
import { Alerts } from './pages/Alerts';
import { Ads } from './pages/Ads';
import { Campaign } from './pages/Campaign';
import { Engagement } from './pages/Engagement';
import { Overview } from './pages/Overview';
import { Query } from './pages/Query';
import { Trending } from './pages/Trending';
import { mayOpen, pageOf, PAGES } from './roles';
import { followLink, usePath } from './router';
import { NotAllowed, NotFound, StatusBadge } from './ui';

function PageFor({ path }: { path: string }) {
  if (path === '/') return <Overview />;
  if (path === '/trending') return <Trending />;
  if (path === '/ads') return <Ads />;
  if (path === '/engagement') return <Engagement />;
  if (path === '/alerts') return <Alerts />;
  if (path === '/query') return <Query />;
  if (path === '/admin') return <Admin />;
  if (path.startsWith('/ads/')) return <Campaign id={decodeURIComponent(path.slice('/ads/'.length))} />;
  return <NotFound />;
}

export function App({ session }: { session: Session }) {
  const path = usePath();
  // The shell follows the (light) alerts channel, so the socket, and the
  // badge saying how it is, stay up on pages that follow no channel of
  // their own (Query, Admin) and between pages.
  // Its firing alerts make the banner every page shows.
  const [alerts, setAlerts] = useState<ActiveAlert[]>([]);
  useChannel('alerts', (data) => setAlerts(activeAlerts(data)));
  const firing = alerts.filter((a) => a.state === 'firing');
  const status = useConnectionStatus();
  const page = pageOf(path);
  // Per user and page, not per session object: a token refresh is not a new view.
  useEffect(() => {
    void countDashboardView(session.name);
  }, [session.name, path]);
  useEffect(() => {
    document.title = `tidemark — ${page?.title ?? 'live'}`;
  }, [page]);

  return (
    <div className="page">
      <header>
        <h1>
          tidemark <span className="dim">— live</span>
        </h1>
        <div className="account">
          <StatusBadge status={status} />
          <span className="dim" data-testid="signed-in-as">
            {session.name} ({session.role})
          </span>
          <button type="button" className="link" onClick={logout}>
            Log out
          </button>
        </div>
      </header>
      <nav className="tabs" aria-label="Pages">
        {PAGES.filter((p) => mayOpen(session.role, p)).map((p) => (
          <a key={p.path} href={p.path} onClick={followLink} aria-current={page === p ? 'page' : undefined}>
            {p.title}
          </a>
        ))}
      </nav>
      {firing.length > 0 && path !== '/alerts' && (
        <a className="alert-banner" href="/alerts" onClick={followLink} role="alert" data-testid="alert-banner">
          {firing.length === 1 ? '1 alert firing' : `${firing.length} alerts firing`}:{' '}
          {firing
            .slice(0, 3)
            .map((a) => `${a.rule} (${seriesLabel(a.tags)})`)
            .join(', ')}
          {firing.length > 3 ? ', …' : ''}
        </a>
      )}
      <main>
        {page && !mayOpen(session.role, page) ? <NotAllowed title={page.title} /> : <PageFor path={path} />}
      </main>
    </div>
  );
}
