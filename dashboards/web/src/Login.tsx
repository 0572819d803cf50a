import { useState, type FormEvent } from 'react';
import { login } from './auth';

/** Name and password against `POST /api/v1/auth/login`. */
export function Login() {
  const [name, setName] = useState('');
  const [password, setPassword] = useState('');
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);

  const submit = async (event: FormEvent) => {
    event.preventDefault();
    setBusy(true);
    setError(null);
    try {
      await login(name, password);
    } catch (e) {
      setError(e instanceof Error ? e.message : String(e));
    } finally {
      setBusy(false);
    }
  };

  return (
    <div className="page login-page">
      <form className="card login" onSubmit={(e) => void submit(e)} aria-label="Log in">
        <h1>tidemark</h1>
        <label>
          Name
          <input autoComplete="username" value={name} onChange={(e) => setName(e.target.value)} required autoFocus />
        </label>
        <label>
          Password
          <input
            type="password"
            autoComplete="current-password"
            value={password}
            onChange={(e) => setPassword(e.target.value)}
            required
          />
        </label>
        <button type="submit" disabled={busy}>
          {busy ? 'Logging in…' : 'Log in'}
        </button>
        {error && (
          <div className="hint error" role="alert">
            {error}
          </div>
        )}
      </form>
    </div>
  );
}
