// The one live-data layer every page uses: a single WebSocket for the whole
// dashboard, shared by all subscriptions, and `useLive` for a page's data
// (a REST snapshot first, then the channel's snapshot and updates).
import { useEffect, useRef, useState, useSyncExternalStore } from 'react';
import { currentSession, onSessionChange } from './auth';
import { applyMessage } from './channel';
import { overviewWindows, windowKeys, type Json, type ServerMessage, type WireWindow } from './data';

export type Status =
  | { kind: 'connecting' }
  | { kind: 'live' }
  | { kind: 'retrying'; inSeconds: number }
  | { kind: 'offline' };

/** Called with the channel's whole data, and the update's patch (null for a snapshot). */
export type ChannelListener = (data: Json, patch: Json | null) => void;

interface Channel {
  seq: number | null;
  data: Json | null;
  listeners: Set<ChannelListener>;
}

const MIN_BACKOFF_MS = 1000;
const MAX_BACKOFF_MS = 30_000;
/** The socket stays open this long after the last subscription ends, so moving between pages does not reconnect. */
const LINGER_MS = 5_000;

function wsUrl(): string {
  const proto = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${proto}//${window.location.host}/ws`;
}

/**
 * Keeps one WebSocket open while any channel is subscribed, reconnecting with
 * exponential backoff (and jitter, so many dashboards do not reconnect in
 * step) and subscribing every channel again on each new socket. Each channel's
 * data is kept here: a snapshot replaces it, an update is merged in, and a
 * gap in `seq` subscribes again for a new snapshot.
 */
class LiveConnection {
  private socket: WebSocket | null = null;
  private channels = new Map<string, Channel>();
  private status: Status = { kind: 'connecting' };
  private statusListeners = new Set<() => void>();
  private backoff = MIN_BACKOFF_MS;
  private retryTimer: number | undefined;
  private countdown: number | undefined;
  private lingerTimer: number | undefined;

  constructor() {
    // A socket is authenticated as whoever opened it: signing out closes it
    // at once, so the next user never inherits it.
    onSessionChange(() => {
      if (currentSession() === null && this.socket) this.close();
    });
  }

  getStatus = (): Status => this.status;

  onStatus = (listener: () => void): (() => void) => {
    this.statusListeners.add(listener);
    return () => this.statusListeners.delete(listener);
  };

  subscribe(name: string, listener: ChannelListener): () => void {
    window.clearTimeout(this.lingerTimer);
    let channel = this.channels.get(name);
    if (!channel) {
      channel = { seq: null, data: null, listeners: new Set() };
      this.channels.set(name, channel);
      this.send({ op: 'subscribe', channel: name });
    }
    channel.listeners.add(listener);
    if (channel.data !== null) listener(channel.data, null);
    if (!this.socket && this.retryTimer === undefined) this.connect();
    const subscribed = channel;
    return () => {
      subscribed.listeners.delete(listener);
      if (subscribed.listeners.size > 0) return;
      this.channels.delete(name);
      this.send({ op: 'unsubscribe', channel: name });
      if (this.channels.size === 0) this.lingerTimer = window.setTimeout(() => this.close(), LINGER_MS);
    };
  }

  private setStatus(status: Status) {
    this.status = status;
    this.statusListeners.forEach((l) => l());
  }

  private send(message: object) {
    if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(message));
  }

  private close() {
    window.clearTimeout(this.retryTimer);
    window.clearInterval(this.countdown);
    this.retryTimer = undefined;
    const socket = this.socket;
    this.socket = null;
    socket?.close();
    this.setStatus({ kind: 'connecting' });
  }

  private connect() {
    this.retryTimer = undefined;
    this.setStatus({ kind: 'connecting' });
    // Browsers cannot set an Authorization header on a WebSocket: the
    // token travels as a subprotocol beside `tidemark`.
    const token = currentSession()?.accessToken;
    const ws = new WebSocket(wsUrl(), token ? ['tidemark', `bearer.${token}`] : ['tidemark']);
    this.socket = ws;
    ws.onopen = () => {
      this.backoff = MIN_BACKOFF_MS;
      this.setStatus({ kind: 'live' });
      for (const [name, channel] of this.channels) {
        channel.seq = null;
        this.send({ op: 'subscribe', channel: name });
      }
    };
    ws.onmessage = (event) => {
      let msg: ServerMessage;
      try {
        msg = JSON.parse(String(event.data)) as ServerMessage;
      } catch {
        return;
      }
      if (msg.type === 'error') {
        console.warn('tidemark:', msg.code, msg.message);
        return;
      }
      if (msg.type !== 'snapshot' && msg.type !== 'update') return;
      const channel = this.channels.get(msg.channel);
      if (!channel) return;
      const step = applyMessage(channel, msg);
      channel.seq = step.state.seq;
      channel.data = step.state.data;
      if (step.kind === 'resubscribe') this.send({ op: 'subscribe', channel: msg.channel });
      if (step.kind !== 'deliver' || channel.data === null) return;
      const { data } = channel;
      channel.listeners.forEach((l) => l(data, step.patch));
    };
    ws.onclose = () => {
      if (this.socket !== ws) return;
      this.socket = null;
      const delay = Math.min(MAX_BACKOFF_MS, this.backoff) * (0.8 + Math.random() * 0.4);
      this.backoff = Math.min(MAX_BACKOFF_MS, this.backoff * 2);
      const due = Date.now() + delay;
      const tick = () =>
        this.setStatus(
          navigator.onLine === false
            ? { kind: 'offline' }
            : { kind: 'retrying', inSeconds: Math.max(0, Math.ceil((due - Date.now()) / 1000)) },
        );
      tick();
      window.clearInterval(this.countdown);
      this.countdown = window.setInterval(tick, 1000);
      this.retryTimer = window.setTimeout(() => {
        window.clearInterval(this.countdown);
        this.connect();
      }, delay);
    };
  }
}

const connection = new LiveConnection();

/** The shared socket's state, for the connection badge. */
export function useConnectionStatus(): Status {
  return useSyncExternalStore(connection.onStatus, connection.getStatus);
}

/** Follows a channel while mounted; `listener` gets every snapshot and update. */
export function useChannel(name: string | null, listener: ChannelListener): void {
  const handler = useRef(listener);
  handler.current = listener;
  useEffect(() => {
    if (name === null) return;
    return connection.subscribe(name, (data, patch) => handler.current(data, patch));
  }, [name]);
}

/**
 * The overview channel's windows: `onWindows` gets the windows a message
 * changed, each whole, so it merges snapshots and updates the same way.
 */
export function useOverview(onWindows: (windows: WireWindow[]) => void): Status {
  // A window that aged out (null in the update) is left to the page's own trimming.
  useChannel('overview', (data, patch) => onWindows(overviewWindows(data, patch === null ? undefined : windowKeys(patch))));
  return useConnectionStatus();
}

export interface LiveValue<T> {
  value: T | null;
  /** When the value last changed (ms), from either source. */
  updatedAt: number | null;
  /** Where the value came from: the REST snapshot until the channel answers. */
  source: 'rest' | 'live' | null;
  error: string | null;
}

/**
 * A page's live value: `loadRest` answers first (the channel may take a
 * moment, and REST holds what the channel does not), then every snapshot and
 * update of `channel` is folded in by `fromChannel`, which gets the value so
 * far (so a page may keep what came before, as trending keeps the previous
 * window). Messages are folded as they arrive, not as React renders, so none
 * is skipped. Another `channel` starts over.
 */
export function useLive<T>(
  channel: string,
  loadRest: (() => Promise<T>) | null,
  fromChannel: (data: Json, patch: Json | null, previous: T | null) => T | null,
): LiveValue<T> {
  const [state, setState] = useState<LiveValue<T>>({ value: null, updatedAt: null, source: null, error: null });
  const latest = useRef<{ channel: string; value: T | null; live: boolean }>({ channel, value: null, live: false });
  const read = useRef(fromChannel);
  read.current = fromChannel;
  const load = useRef(loadRest);
  load.current = loadRest;

  useEffect(() => {
    latest.current = { channel, value: null, live: false };
    setState({ value: null, updatedAt: null, source: null, error: null });
    let cancelled = false;
    load
      .current?.()
      .then((value) => {
        if (cancelled || latest.current.live) return;
        latest.current.value = value;
        setState({ value, updatedAt: Date.now(), source: 'rest', error: null });
      })
      .catch((e: unknown) => {
        if (!cancelled) setState((s) => ({ ...s, error: e instanceof Error ? e.message : String(e) }));
      });
    return () => {
      cancelled = true;
    };
  }, [channel]);

  useChannel(channel, (data, patch) => {
    if (latest.current.channel !== channel) latest.current = { channel, value: null, live: false };
    const value = read.current(data, patch, latest.current.value);
    if (value === null) return;
    latest.current.value = value;
    latest.current.live = true;
    setState({ value, updatedAt: Date.now(), source: 'live', error: null });
  });
  return state;
}

/** The time, re-rendering every `intervalMs`, for ages and staleness. */
export function useNow(intervalMs = 1000): number {
  const [now, setNow] = useState(() => Date.now());
  useEffect(() => {
    const id = window.setInterval(() => setNow(Date.now()), intervalMs);
    return () => window.clearInterval(id);
  }, [intervalMs]);
  return now;
}

/** A tile is stale when its data has not changed for longer than this. */
export const STALE_AFTER_MS = 5_000;
