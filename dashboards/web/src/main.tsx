import { StrictMode, useEffect } from 'react';
import { createRoot } from 'react-dom/client';
import { App } from './App';
import { useSession } from './auth';
import { Login } from './Login';
import { navigate } from './router';
import './styles.css';

// The page asked for before logging in, opened once logged in.
let wanted = window.location.pathname === '/login' ? '/' : window.location.pathname + window.location.search;

/** The login page until there is a session, then the dashboard. */
function Root() {
  const session = useSession();
  useEffect(() => {
    const path = window.location.pathname;
    if (!session && path !== '/login') {
      wanted = path + window.location.search;
      navigate('/login', true);
    }
    if (session && path === '/login') navigate(wanted, true);
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
