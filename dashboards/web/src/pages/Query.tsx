import { useEffect, useRef, useState, type KeyboardEvent } from 'react';
import { ApiError, apiGet, apiSend, messageOf } from '../api';
import { formatCount, formatRate } from '../format';
import type { QueryAnswer, QueryTable, QueryTablesAnswer } from '../wire/types';

type Table = QueryTable;

type Outcome =
  | { kind: 'rows'; answer: QueryAnswer }
  | { kind: 'error'; message: string; code: string | null; status: number | null }
  | { kind: 'timeout'; seconds: number };

const ROW_LIMIT = 1000;

function defaultSql(): string {
  const from = new Date(Date.now() - 3_600_000).toISOString().slice(0, 16) + ':00Z';
  return `SELECT event_type, sum(events) AS events\nFROM traffic\nWHERE time >= '${from}'\nGROUP BY event_type\nORDER BY events DESC`;
}

function cell(v: string | number | null): string {
  if (v === null) return 'NULL';
  if (typeof v === 'number') return Number.isInteger(v) ? formatCount(v) : String(v);
  return v;
}

/** Ad-hoc SQL over the stored measurements (`POST /api/v1/query`). */
export function Query() {
  const [tables, setTables] = useState<Table[]>([]);
  const [tablesError, setTablesError] = useState<string | null>(null);
  const [sql, setSql] = useState(defaultSql);
  const [timeoutSeconds, setTimeoutSeconds] = useState(10);
  const [running, setRunning] = useState(false);
  const [outcome, setOutcome] = useState<Outcome | null>(null);
  const editor = useRef<HTMLTextAreaElement>(null);

  useEffect(() => {
    apiGet<QueryTablesAnswer>('/api/v1/query/tables')
      .then((t) => setTables(t.tables))
      .catch((e: unknown) => setTablesError(messageOf(e)));
  }, []);

  const run = async () => {
    setRunning(true);
    try {
      const answer = await apiSend<QueryAnswer>('POST', '/api/v1/query', {
        sql,
        limit: ROW_LIMIT,
        timeout_ms: timeoutSeconds * 1000,
      });
      if (answer) setOutcome({ kind: 'rows', answer });
    } catch (e) {
      if (e instanceof ApiError && (e.code === 'query_timeout' || e.status === 408)) {
        setOutcome({ kind: 'timeout', seconds: timeoutSeconds });
      } else if (e instanceof ApiError) {
        setOutcome({ kind: 'error', message: e.message, code: e.code, status: e.status });
      } else {
        setOutcome({ kind: 'error', message: messageOf(e), code: null, status: null });
      }
    } finally {
      setRunning(false);
    }
  };

  /** Puts a table or column name where the cursor is. */
  const insert = (text: string) => {
    const el = editor.current;
    if (!el) return setSql((s) => s + text);
    const { selectionStart: a, selectionEnd: b } = el;
    setSql((s) => s.slice(0, a) + text + s.slice(b));
    requestAnimationFrame(() => {
      el.focus();
      el.setSelectionRange(a + text.length, a + text.length);
    });
  };

  const onKey = (event: KeyboardEvent<HTMLTextAreaElement>) => {
    if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      if (!running) void run();
    }
  };

  return (
    <div className="query-layout">
      <aside className="card schema" data-testid="query-tables">
        <div className="label">Tables</div>
        <div className="scope">click a name to insert it; every table needs a time filter</div>
        {tablesError && <div className="hint error">{tablesError}</div>}
        {tables.map((t) => (
          <details key={t.name} open={t.name === 'traffic'}>
            <summary>
              <button type="button" className="link" onClick={() => insert(t.name)}>
                <code>{t.name}</code>
              </button>
            </summary>
            <ul>
              {t.columns.map((c) => (
                <li key={c}>
                  <button type="button" className="link" onClick={() => insert(c)}>
                    <code>{c}</code>
                  </button>{' '}
                  <span className="dim">
                    {c === 'time' ? 'epoch ms' : c === 'tier' ? 'rt | hourly | daily' : t.tags.includes(c) ? 'tag' : 'field'}
                  </span>
                </li>
              ))}
            </ul>
          </details>
        ))}
      </aside>
      <div className="stack">
        <section className="card">
          <label className="label" htmlFor="sql">
            SQL (SQLite dialect, read-only)
          </label>
          <textarea
            id="sql"
            ref={editor}
            className="sql"
            spellCheck={false}
            rows={8}
            value={sql}
            onChange={(e) => setSql(e.target.value)}
            onKeyDown={onKey}
          />
          <div className="toolbar">
            <button type="button" className="primary" onClick={() => void run()} disabled={running}>
              {running ? 'Running…' : 'Run'}
            </button>
            <span className="hint">Ctrl+Enter runs it</span>
            <label className="hint">
              Timeout{' '}
              <select
                aria-label="Timeout"
                value={timeoutSeconds}
                onChange={(e) => setTimeoutSeconds(Number(e.target.value))}
              >
                {[1, 2, 5, 10].map((s) => (
                  <option key={s} value={s}>
                    {s} s
                  </option>
                ))}
              </select>
            </label>
            <span className="hint">at most {formatCount(ROW_LIMIT)} rows</span>
          </div>
        </section>
        <section className="card" data-testid="query-result" data-outcome={outcome?.kind ?? 'none'}>
          {outcome === null && <div className="hint">Results appear here.</div>}
          {outcome?.kind === 'timeout' && (
            <div className="hint error" role="alert" data-testid="query-timeout">
              Timed out: the query ran longer than {outcome.seconds} s and was stopped (query_timeout). Narrow the
              time range or read a coarser tier.
            </div>
          )}
          {outcome?.kind === 'error' && (
            <div className="hint error" role="alert" data-testid="query-error" data-code={outcome.code ?? ''}>
              <strong>{outcome.code ?? `HTTP ${outcome.status ?? '?'}`}</strong>: {outcome.message}
            </div>
          )}
          {outcome?.kind === 'rows' && (
            <>
              <div className="hint" data-testid="query-summary">
                {formatCount(outcome.answer.row_count)} rows
                {outcome.answer.truncated && (
                  <strong className="warn" data-testid="query-truncated">
                    {' '}
                    (truncated: more rows than the limit of {formatCount(ROW_LIMIT)})
                  </strong>
                )}
                , {formatCount(outcome.answer.points_read)} points read in {formatRate(outcome.answer.elapsed_ms)} ms
              </div>
              <div className="table-scroll result-scroll">
                <table className="data" data-testid="query-rows">
                  <thead>
                    <tr>
                      {outcome.answer.columns.map((c, j) => (
                        <th key={c} className={typeof outcome.answer.rows[0]?.[j] === 'number' ? 'num' : undefined}>
                          {c}
                        </th>
                      ))}
                    </tr>
                  </thead>
                  <tbody>
                    {outcome.answer.rows.map((row, i) => (
                      <tr key={i}>
                        {row.map((v, j) => (
                          <td key={j} className={typeof v === 'number' ? 'num' : undefined}>
                            {cell(v)}
                          </td>
                        ))}
                      </tr>
                    ))}
                  </tbody>
                </table>
              </div>
            </>
          )}
        </section>
      </div>
    </div>
  );
}
