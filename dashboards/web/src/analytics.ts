// The dashboard counts its own views with tidemark's JavaScript SDK: a
// `page_view` per dashboard shown, posted to the ingest of the same origin
// with the key the server names (`GET /api/v1/sdk`; none where ingest runs
// elsewhere, as under `tidemark serve`).
import * as tidemark from '../../../sdk/js/src/index';
import { authFetch } from './auth';

let started: Promise<boolean> | undefined;

async function start(): Promise<boolean> {
  const res = await authFetch('/api/v1/sdk');
  const { ingest_key: key } = res.ok ? ((await res.json()) as { ingest_key: string | null }) : { ingest_key: null };
  if (key) tidemark.init({ url: '', key });
  return Boolean(key);
}

/** Counts one view of the dashboard by the signed-in user `name`. */
export async function countDashboardView(name: string): Promise<void> {
  try {
    if (!(await (started ??= start()))) return;
    tidemark.identify(`dashboard:${name}`);
    tidemark.page({ page: window.location.pathname });
  } catch {
    // Counting views must never break the dashboard.
  }
}
