// REST calls with the session's token; every error is the API's
// `{"error", "code"}`, kept whole so pages can show the code.
import { authFetch } from './auth';

export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly code: string | null,
  ) {
    super(message);
  }
}

async function errorOf(response: Response): Promise<ApiError> {
  try {
    const body = (await response.json()) as { error?: string; code?: string };
    return new ApiError(body.error ?? `HTTP ${response.status}`, response.status, body.code ?? null);
  } catch {
    return new ApiError(`HTTP ${response.status}`, response.status, null);
  }
}

export async function apiGet<T>(path: string, params?: Record<string, string | undefined>): Promise<T> {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params ?? {})) if (v !== undefined) query.set(k, v);
  const qs = query.toString();
  const response = await authFetch(qs ? `${path}?${qs}` : path);
  if (!response.ok) throw await errorOf(response);
  return (await response.json()) as T;
}

/** A request with a JSON body; answers without a body (204) resolve to null. */
export async function apiSend<T>(method: string, path: string, body?: unknown): Promise<T | null> {
  const response = await authFetch(path, {
    method,
    headers: body === undefined ? undefined : { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await errorOf(response);
  return response.status === 204 ? null : ((await response.json()) as T);
}

export function messageOf(e: unknown): string {
  if (e instanceof ApiError) return e.code ? `${e.message} (${e.code})` : e.message;
  return e instanceof Error ? e.message : String(e);
}
