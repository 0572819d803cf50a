import { StrictMode, useEffect } from 'react';
import { createRoot } from 'react-dom/client';
import { App } from './App';
import { useSession } from './auth';
import { Login } from './Login';
import './styles.css';

/** The login page until there is a session, then the dashboard. */
function Root() {
  const session = useSession();
  useEffect(() => {
    const path = window.location.pathname;
    if (!session && path !== '/login') window.history.replaceState(null, '', '/login');
    if (session && path === '/login') window.history.replaceState(null, '', '/');
  }, [session]);
  return session ? <App session={session} /> : <Login />;
}

const root = document.getElementById('root');
if (root) {
  createRoot(root).render(
    <StrictMode>
      <Root />
    </StrictMode>,
  );
}
