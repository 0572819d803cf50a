// The signed-in session: tokens kept in memory only (never in storage, so a
// script injected into another page cannot read them), refreshed a minute
// before they expire. A 401 from any call ends the session.
import { useSyncExternalStore } from 'react';
import type { TokenAnswer } from './wire/types';

export interface Session {
  name: string;
  role: string;
  accessToken: string;
  refreshToken: string;
}


const REFRESH_EARLY_MS = 60_000;

let session: Session | null = null;
let refreshTimer: number | undefined;
const listeners = new Set<() => void>();

function publish(next: Session | null) {
  session = next;
  listeners.forEach((l) => l());
}

function schedule(answer: TokenAnswer) {
  window.clearTimeout(refreshTimer);
  const delay = Math.max(5_000, answer.expires_in * 1000 - REFRESH_EARLY_MS);
  refreshTimer = window.setTimeout(() => void refresh(), delay);
}

function accept(answer: TokenAnswer) {
  publish({
    name: answer.name,
    role: answer.role,
    accessToken: answer.access_token,
    refreshToken: answer.refresh_token,
  });
  schedule(answer);
}

async function errorOf(response: Response): Promise<string> {
  try {
    const body = (await response.json()) as { error?: string };
    if (body.error) return body.error;
  } catch {
    // Not JSON: the status says enough.
  }
  return `HTTP ${response.status}`;
}

/** Signs in; rejects with the server's message. */
export async function login(name: string, password: string): Promise<void> {
  const response = await fetch('/api/v1/auth/login', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ name, password }),
  });
  if (!response.ok) throw new Error(await errorOf(response));
  accept((await response.json()) as TokenAnswer);
}

async function refresh(): Promise<void> {
  const current = session;
  if (!current) return;
  try {
    const response = await fetch('/api/v1/auth/refresh', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ refresh_token: current.refreshToken }),
    });
    if (response.status === 401) return logout();
    if (!response.ok) throw new Error(await errorOf(response));
    accept((await response.json()) as TokenAnswer);
  } catch {
    // The server is away for a moment: try again shortly, while the access
    // token may still be good.
    refreshTimer = window.setTimeout(() => void refresh(), 10_000);
  }
}

export function logout(): void {
  window.clearTimeout(refreshTimer);
  publish(null);
}

export function currentSession(): Session | null {
  return session;
}

/** `fetch` with the session's token; a 401 ends the session. */
export async function authFetch(input: string, init: RequestInit = {}): Promise<Response> {
  const headers = new Headers(init.headers);
  if (session) headers.set('authorization', `Bearer ${session.accessToken}`);
  const response = await fetch(input, { ...init, headers });
  if (response.status === 401) logout();
  return response;
}

/** Calls `listener` on every sign-in, refresh and sign-out. */
export function onSessionChange(listener: () => void): () => void {
  return subscribe(listener);
}

function subscribe(listener: () => void): () => void {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

/** The session, re-rendering on sign-in, refresh and sign-out. */
export function useSession(): Session | null {
  return useSyncExternalStore(subscribe, currentSession);
}
