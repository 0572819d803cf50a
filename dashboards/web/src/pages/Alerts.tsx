import { useCallback, useEffect, useState, type FormEvent } from 'react';
import {
  activeAlerts,
  describeRule,
  seriesLabel,
  type ActiveAlert,
  type AlertHistoryAnswer,
  type AlertRulesAnswer,
} from '../alerts';
import { apiGet, apiSend, messageOf } from '../api';
import { useSession } from '../auth';
import { formatCount, formatDateTime, formatDecimal, MISSING } from '../format';
import { useChannel, useNow } from '../live';
import { can } from '../roles';
import { ErrorLine, Tile } from '../ui';

const HISTORY_REFRESH_MS = 30_000;

function number(v: number | null): string {
  if (v === null) return MISSING;
  return Number.isInteger(v) ? formatCount(v) : formatDecimal(v);
}

/** What is pending or firing now, live from the `alerts` channel. */
function FiringNow() {
  const [alerts, setAlerts] = useState<ActiveAlert[]>([]);
  const [updatedAt, setUpdatedAt] = useState<number | null>(null);
  const now = useNow();
  useChannel('alerts', (data) => {
    setAlerts(activeAlerts(data));
    setUpdatedAt(Date.now());
  });
  return (
    <Tile
      title="Firing now"
      scope="pending and firing alerts, from each rule's newest closed window (event time)"
      updatedAt={updatedAt}
      now={now}
      testId="alerts-active"
    >
      {alerts.length === 0 ? (
        <p className="dim" data-testid="alerts-none">
          Nothing is pending or firing.
        </p>
      ) : (
        <div className="table-scroll">
          <table className="data">
            <thead>
              <tr>
                <th>Rule</th>
                <th>Series</th>
                <th>State</th>
                <th className="num">Value</th>
                <th className="num">Threshold</th>
                <th>Since</th>
              </tr>
            </thead>
            <tbody>
              {alerts.map((a) => (
                <tr key={a.key} data-alert={a.key}>
                  <td>{a.rule}</td>
                  <td>{seriesLabel(a.tags)}</td>
                  <td>
                    <span className={`state state-${a.state}`}>{a.state}</span>
                  </td>
                  <td className="num">{number(a.value)}</td>
                  <td className="num">{number(a.threshold)}</td>
                  <td>{a.since ? formatDateTime(Date.parse(a.since)) : MISSING}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </Tile>
  );
}

const EXAMPLE_RULE = JSON.stringify(
  { kind: 'threshold', measurement: 'traffic', field: 'events', where: { event_type: 'like' }, op: '<', value: 100, for: 3 },
  null,
  2,
);

function Rules() {
  const session = useSession();
  const mayWrite = session !== null && can(session.role, 'alerts:write');
  const [rules, setRules] = useState<AlertRulesAnswer | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [name, setName] = useState('');
  const [body, setBody] = useState(EXAMPLE_RULE);
  const load = useCallback(() => {
    apiGet<AlertRulesAnswer>('/api/v1/alerts/rules')
      .then((r) => (setRules(r), setError(null)))
      .catch((e: unknown) => setError(messageOf(e)));
  }, []);
  useEffect(load, [load]);

  const save = async (event: FormEvent) => {
    event.preventDefault();
    try {
      const rule: unknown = JSON.parse(body);
      await apiSend('PUT', `/api/v1/alerts/rules/${encodeURIComponent(name)}`, rule);
      setError(null);
      load();
    } catch (e) {
      setError(e instanceof SyntaxError ? `The rule is not JSON: ${e.message}` : messageOf(e));
    }
  };
  const remove = async (rule: string) => {
    if (!window.confirm(`Remove the alert rule ${rule}?`)) return;
    try {
      await apiSend('DELETE', `/api/v1/alerts/rules/${encodeURIComponent(rule)}`);
      load();
    } catch (e) {
      setError(messageOf(e));
    }
  };
  const edit = (rule: AlertRulesAnswer['rules'][number]) => {
    const { name: ruleName, ...rest } = rule;
    setName(ruleName);
    setBody(JSON.stringify(rest, null, 2));
  };

  return (
    <section className="card" data-testid="alerts-rules">
      <div className="label">Rules</div>
      <div className="scope">evaluated over every closed window; see docs/alerts.md for the format</div>
      <ErrorLine error={error} />
      <div className="table-scroll">
        <table className="data">
          <thead>
            <tr>
              <th>Name</th>
              <th>Condition</th>
              <th />
            </tr>
          </thead>
          <tbody>
            {rules?.rules.map((r) => (
              <tr key={r.name} data-rule={r.name}>
                <td>{r.name}</td>
                <td className="detail">{describeRule(r)}</td>
                <td className="num">
                  {mayWrite && (
                    <>
                      <button type="button" className="plain" onClick={() => edit(r)}>
                        Edit
                      </button>{' '}
                      <button type="button" className="plain" onClick={() => void remove(r.name)}>
                        Remove
                      </button>
                    </>
                  )}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      {rules?.rules.length === 0 && <p className="dim">No rules yet.</p>}
      {mayWrite && (
        <form className="rule-form" onSubmit={(e) => void save(e)}>
          <label>
            Name <input value={name} onChange={(e) => setName(e.target.value)} required pattern="[A-Za-z0-9_.\-]{1,100}" />
          </label>
          <label>
            Rule (JSON)
            <textarea value={body} onChange={(e) => setBody(e.target.value)} rows={8} spellCheck={false} />
          </label>
          <div>
            <button type="submit">Save rule</button>
          </div>
        </form>
      )}
    </section>
  );
}

function History() {
  const [history, setHistory] = useState<AlertHistoryAnswer | null>(null);
  const [error, setError] = useState<string | null>(null);
  useEffect(() => {
    let cancelled = false;
    const load = () =>
      apiGet<AlertHistoryAnswer>('/api/v1/alerts')
        .then((h) => !cancelled && (setHistory(h), setError(null)))
        .catch((e: unknown) => !cancelled && setError(messageOf(e)));
    void load();
    const timer = window.setInterval(() => void load(), HISTORY_REFRESH_MS);
    return () => {
      cancelled = true;
      window.clearInterval(timer);
    };
  }, []);
  return (
    <section className="card" data-testid="alerts-history">
      <div className="label">History</div>
      <div className="scope">the last 24 hours of windows with an alert pending, firing or resolved, newest first</div>
      <ErrorLine error={error} />
      <div className="table-scroll">
        <table className="data">
          <thead>
            <tr>
              <th>Window</th>
              <th>Rule</th>
              <th>Series</th>
              <th>State</th>
              <th className="num">Value</th>
              <th className="num">Threshold</th>
            </tr>
          </thead>
          <tbody>
            {history?.alerts.map((a) => (
              <tr key={`${a.time}/${a.rule}/${seriesLabel(a.tags)}`}>
                <td>{formatDateTime(Date.parse(a.time))}</td>
                <td>{a.rule}</td>
                <td>{seriesLabel(a.tags)}</td>
                <td>
                  <span className={`state state-${a.state ?? 'unknown'}`}>{a.state ?? MISSING}</span>
                </td>
                <td className="num">{number(a.value)}</td>
                <td className="num">{number(a.threshold)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      </div>
      {history?.alerts.length === 0 && <p className="dim">No alert in the last 24 hours.</p>}
      {history?.truncated && <p className="dim">Only the newest 5,000 are shown.</p>}
    </section>
  );
}

/** `/alerts`: business alerts firing now, the rules, and their history. */
export function Alerts() {
  return (
    <div className="alerts-page">
      <FiringNow />
      <Rules />
      <History />
    </div>
  );
}
