import { useCallback, useEffect, useState, type FormEvent } from 'react';
import { apiGet, apiSend, messageOf } from '../api';
import { useSession } from '../auth';
import { formatCount, formatDateTime } from '../format';
import { ErrorLine } from '../ui';
import type { AuditAnswer, ServingAnswer, ServingHistory, TokenCreated, TokensAnswer, UsersAnswer } from '../wire/types';

const ROLES = ['analyst', 'manager', 'admin'];


/** Loads `path` now and again after every change `reload` is called for. */
function useResource<T>(path: string) {
  const [value, setValue] = useState<T | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [version, setVersion] = useState(0);
  useEffect(() => {
    let cancelled = false;
    apiGet<T>(path)
      .then((v) => !cancelled && (setValue(v), setError(null)))
      .catch((e: unknown) => !cancelled && setError(messageOf(e)));
    return () => {
      cancelled = true;
    };
  }, [path, version]);
  const reload = useCallback(() => setVersion((v) => v + 1), []);
  return { value, error, reload };
}

function Users() {
  const me = useSession();
  const users = useResource<UsersAnswer>('/api/v1/users');
  const [name, setName] = useState('');
  const [role, setRole] = useState('analyst');
  const [password, setPassword] = useState('');
  const [error, setError] = useState<string | null>(null);

  const save = async (event: FormEvent) => {
    event.preventDefault();
    try {
      await apiSend('PUT', `/api/v1/users/${encodeURIComponent(name)}`, { role, password });
      setError(null);
      setName('');
      setPassword('');
      users.reload();
    } catch (e) {
      setError(messageOf(e));
    }
  };
  const remove = async (user: string) => {
    if (!window.confirm(`Remove ${user}? Their tokens stop working at once.`)) return;
    try {
      await apiSend('DELETE', `/api/v1/users/${encodeURIComponent(user)}`);
      users.reload();
    } catch (e) {
      setError(messageOf(e));
    }
  };

  return (
    <section className="card" data-testid="admin-users">
      <div className="label">Users and roles</div>
      <div className="scope">from the users file, read again whenever it changes</div>
      <div className="table-scroll">
        <table className="data">
          <thead>
            <tr>
              <th>Name</th>
              <th>Role</th>
              <th />
            </tr>
          </thead>
          <tbody>
            {users.value?.users.map((u) => (
              <tr key={u.name} data-user={u.name}>
                <td>{u.name}</td>
                <td>{u.role}</td>
                <td className="num">
                  {u.name !== me?.name && (
                    <button type="button" className="plain" onClick={() => void remove(u.name)}>
                      Remove
                    </button>
                  )}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      <form className="inline-form" onSubmit={(e) => void save(e)} aria-label="Add or change a user">
        <input aria-label="User name" placeholder="name" value={name} onChange={(e) => setName(e.target.value)} required />
        <select aria-label="User role" value={role} onChange={(e) => setRole(e.target.value)}>
          {ROLES.map((r) => (
            <option key={r}>{r}</option>
          ))}
        </select>
        <input
          aria-label="User password"
          type="password"
          placeholder="password (8 or more)"
          minLength={8}
          autoComplete="new-password"
          value={password}
          onChange={(e) => setPassword(e.target.value)}
          required
        />
        <button type="submit" className="primary">
          Add or change
        </button>
      </form>
      <ErrorLine error={error ?? users.error} />
    </section>
  );
}

function Tokens() {
  const tokens = useResource<TokensAnswer>('/api/v1/tokens');
  const [name, setName] = useState('');
  const [role, setRole] = useState('analyst');
  const [created, setCreated] = useState<{ token: string; id: string } | null>(null);
  const [error, setError] = useState<string | null>(null);

  const create = async (event: FormEvent) => {
    event.preventDefault();
    try {
      const answer = await apiSend<TokenCreated>('POST', '/api/v1/tokens', { role, name });
      setCreated(answer);
      setError(null);
      setName('');
      tokens.reload();
    } catch (e) {
      setError(messageOf(e));
    }
  };
  const revoke = async (id: string) => {
    if (!window.confirm(`Revoke token ${id}? Whatever uses it stops working at once.`)) return;
    try {
      await apiSend('DELETE', `/api/v1/tokens/${encodeURIComponent(id)}`);
      tokens.reload();
    } catch (e) {
      setError(messageOf(e));
    }
  };

  return (
    <section className="card" data-testid="admin-tokens">
      <div className="label">Service tokens</div>
      <div className="scope">for Grafana, Prometheus and scripts; kept only as hashes, shown once</div>
      {created && (
        <div className="once" role="status" data-testid="new-token">
          <div>
            Token <code>{created.id}</code> created. Copy it now: it is not shown again.
          </div>
          <code className="secret" data-testid="new-token-value">
            {created.token}
          </code>
          <div className="toolbar">
            <button type="button" className="plain" onClick={() => void navigator.clipboard?.writeText(created.token)}>
              Copy
            </button>
            <button type="button" className="plain" onClick={() => setCreated(null)}>
              Done
            </button>
          </div>
        </div>
      )}
      <div className="table-scroll">
        <table className="data">
          <thead>
            <tr>
              <th>Id</th>
              <th>Name</th>
              <th>Role</th>
              <th>Created</th>
              <th />
            </tr>
          </thead>
          <tbody>
            {tokens.value?.tokens.length === 0 && (
              <tr>
                <td colSpan={5} className="dim">
                  no service tokens
                </td>
              </tr>
            )}
            {tokens.value?.tokens.map((t) => (
              <tr key={t.id} data-token={t.id}>
                <td>
                  <code>{t.id}</code>
                </td>
                <td>{t.name ?? ''}</td>
                <td>{t.role}</td>
                <td>{Number.isNaN(Date.parse(t.created)) ? t.created : formatDateTime(Date.parse(t.created))}</td>
                <td className="num">
                  <button type="button" className="plain" onClick={() => void revoke(t.id)}>
                    Revoke
                  </button>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      <form className="inline-form" onSubmit={(e) => void create(e)} aria-label="Create a service token">
        <input aria-label="Token name" placeholder="name, e.g. grafana" value={name} onChange={(e) => setName(e.target.value)} required />
        <select aria-label="Token role" value={role} onChange={(e) => setRole(e.target.value)}>
          {ROLES.map((r) => (
            <option key={r}>{r}</option>
          ))}
        </select>
        <button type="submit" className="primary">
          Create token
        </button>
      </form>
      <ErrorLine error={error ?? tokens.error} />
    </section>
  );
}

/** A datetime-local input's value for `t` in UTC (the inputs are labelled UTC). */
function localValue(t: number): string {
  return new Date(t).toISOString().slice(0, 16);
}

function Audit() {
  const [from, setFrom] = useState(() => localValue(Date.now() - 86_400_000));
  const [to, setTo] = useState(() => localValue(Date.now() + 60_000));
  const [action, setAction] = useState('');
  const [actor, setActor] = useState('');
  const path = `/api/v1/audit?${new URLSearchParams({ from: `${from}:00Z`, to: `${to}:00Z` })}`;
  const audit = useResource<AuditAnswer>(path);
  const entries = audit.value?.entries ?? [];
  const actions = [...new Set(entries.map((e) => e.action))].sort();
  const shown = entries
    .filter((e) => (action === '' || e.action === action) && (actor === '' || e.actor.includes(actor)))
    .reverse();

  return (
    <section className="card" data-testid="admin-audit">
      <div className="label">Audit log</div>
      <div className="scope">newest first; times in UTC</div>
      <div className="inline-form">
        <label className="hint">
          From (UTC){' '}
          <input type="datetime-local" aria-label="Audit from" value={from} onChange={(e) => setFrom(e.target.value)} />
        </label>
        <label className="hint">
          To (UTC) <input type="datetime-local" aria-label="Audit to" value={to} onChange={(e) => setTo(e.target.value)} />
        </label>
        <select aria-label="Audit action" value={action} onChange={(e) => setAction(e.target.value)}>
          <option value="">every action</option>
          {actions.map((a) => (
            <option key={a}>{a}</option>
          ))}
        </select>
        <input aria-label="Audit actor" placeholder="actor contains" value={actor} onChange={(e) => setActor(e.target.value)} />
      </div>
      <div className="toolbar audit-count">
        <span className="hint">
          {formatCount(shown.length)} of {formatCount(entries.length)} entries
          {audit.value?.truncated ? ' (the range holds more: only the newest 10,000 are read)' : ''}
        </span>
        <button type="button" className="plain" onClick={audit.reload}>
          Refresh
        </button>
      </div>
      <div className="table-scroll result-scroll">
        <table className="data audit" data-testid="audit-table">
          <thead>
            <tr>
              <th>Time</th>
              <th>Actor</th>
              <th>Action</th>
              <th>Client</th>
              <th>Detail</th>
            </tr>
          </thead>
          <tbody>
            {shown.map((e, i) => (
              <tr key={`${e.time}-${i}`} data-action={e.action}>
                <td>{e.time.replace('T', ' ').slice(0, 19)}</td>
                <td>{e.actor}</td>
                <td className="action">{e.action}</td>
                <td className="client">{e.client ?? ''}</td>
                <td className="detail">
                  <code>{JSON.stringify(e.detail)}</code>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      <ErrorLine error={audit.error} />
    </section>
  );
}

function ServingState() {
  const serving = useResource<ServingAnswer>('/api/v1/serving');
  const s = serving.value;
  const promoted = s !== null && s.database !== s.live_database;
  return (
    <section className="card" data-testid="admin-serving">
      <div className="label">Served database</div>
      <div className="scope">what `tidemark promote` and `--rollback` switch</div>
      {s && (
        <table className="data">
          <tbody>
            <tr>
              <td>Served</td>
              <td data-testid="served-database">
                <code>{s.database}</code> {promoted ? '(promoted)' : '(the live database)'}
              </td>
            </tr>
            <tr>
              <td>Live</td>
              <td>
                <code>{s.live_database}</code>
              </td>
            </tr>
            <tr>
              <td>Store</td>
              <td>{s.store}</td>
            </tr>
          </tbody>
        </table>
      )}
      <ErrorLine error={serving.error} />
      <ServingHistoryTable />
    </section>
  );
}

const ACTION_LABEL: Record<ServingHistory['history'][number]['action'], string> = {
  promote: 'promote',
  rollback: 'rollback',
};

function ServingHistoryTable() {
  const history = useResource<ServingHistory>('/api/v1/serving/history');
  const changes = history.value?.history ?? [];
  return (
    <>
      <div className="label sub-label">Promotes and rollbacks</div>
      <div className="scope">newest first; times in UTC</div>
      {history.value && changes.length === 0 && (
        <div className="hint" data-testid="serving-history-empty">
          No database has been promoted: the live one has been served throughout.
        </div>
      )}
      {changes.length > 0 && (
        <div className="table-scroll">
          <table className="data" data-testid="serving-history">
            <thead>
              <tr>
                <th>Time</th>
                <th>Action</th>
                <th>Database</th>
                <th>Before</th>
                <th>By</th>
              </tr>
            </thead>
            <tbody>
              {changes.map((c, i) => (
                <tr key={`${c.time}-${i}`} data-action={c.action}>
                  <td>{formatDateTime(Date.parse(c.time))}</td>
                  <td>{ACTION_LABEL[c.action]}</td>
                  <td>
                    <code>{c.database}</code>
                  </td>
                  <td>
                    <code>{c.previous}</code>
                  </td>
                  <td>{c.by}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
      <ErrorLine error={history.error} />
    </>
  );
}

/** Users and roles, service tokens, the audit log and the served database. */
export function Admin() {
  return (
    <div className="stack">
      <div className="grid-2">
        <Users />
        <ServingState />
      </div>
      <Tokens />
      <Audit />
    </div>
  );
}
