// The signed-in dashboard: the header with the pages the role may open, the
// connection badge and the account, and the page the path names.
import { useEffect } from 'react';
import { countDashboardView } from './analytics';
import { logout, type Session } from './auth';
import { useConnectionStatus } from './live';
import { Ads } from './pages/Ads';
import { Campaign } from './pages/Campaign';
import { Overview } from './pages/Overview';
import { Trending } from './pages/Trending';
import { mayOpen, pageOf, PAGES } from './roles';
import { followLink, usePath } from './router';
import { NotAllowed, NotFound, StatusBadge } from './ui';

function PageFor({ path }: { path: string }) {
  if (path === '/') return <Overview />;
  if (path === '/trending') return <Trending />;
  if (path === '/ads') return <Ads />;
  if (path.startsWith('/ads/')) return <Campaign id={decodeURIComponent(path.slice('/ads/'.length))} />;
  return <NotFound />;
}

export function App({ session }: { session: Session }) {
  const path = usePath();
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
      <main>
        {page && !mayOpen(session.role, page) ? <NotAllowed title={page.title} /> : <PageFor path={path} />}
      </main>
    </div>
  );
}
