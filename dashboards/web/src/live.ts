import { useEffect, useRef, useState } from 'react';
import { currentSession } from './auth';
import {
  mergePatch,
  overviewWindows,
  windowKeys,
  type Json,
  type ServerMessage,
  type WireWindow,
} from './data';

export type Status =
  | { kind: 'connecting' }
  | { kind: 'live' }
  | { kind: 'retrying'; inSeconds: number };

const MIN_BACKOFF_MS = 1000;
const MAX_BACKOFF_MS = 30_000;

function wsUrl(): string {
  const proto = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${proto}//${window.location.host}/ws`;
}

const SUBSCRIBE = JSON.stringify({ op: 'subscribe', channel: 'overview' });

/**
 * Keeps a WebSocket subscribed to the overview channel, reconnecting with
 * exponential backoff (and jitter, so many dashboards do not reconnect in step).
 * The channel's data is kept here: a snapshot replaces it, an update is merged
 * in; a gap in `seq` subscribes again for a new snapshot. `onWindows` gets the
 * windows a message changed, each whole, so it merges snapshots and updates
 * the same way.
 */
export function useOverview(onWindows: (windows: WireWindow[]) => void): Status {
  const [status, setStatus] = useState<Status>({ kind: 'connecting' });
  const handler = useRef(onWindows);
  handler.current = onWindows;

  useEffect(() => {
    let socket: WebSocket | null = null;
    let timer: number | undefined;
    let countdown: number | undefined;
    let backoff = MIN_BACKOFF_MS;
    let stopped = false;

    const connect = () => {
      setStatus({ kind: 'connecting' });
      // Browsers cannot set an Authorization header on a WebSocket: the
      // token travels as a subprotocol beside `tidemark`.
      const token = currentSession()?.accessToken;
      const ws = new WebSocket(wsUrl(), token ? ['tidemark', `bearer.${token}`] : ['tidemark']);
      socket = ws;
      // The overview channel's data and the `seq` it is at; none until a snapshot.
      let channel: { seq: number; data: Json } | null = null;
      ws.onopen = () => {
        backoff = MIN_BACKOFF_MS;
        setStatus({ kind: 'live' });
        ws.send(SUBSCRIBE);
      };
      ws.onmessage = (event) => {
        let msg: ServerMessage;
        try {
          msg = JSON.parse(String(event.data)) as ServerMessage;
        } catch {
          return;
        }
        if (msg.type === 'snapshot' && msg.channel === 'overview') {
          channel = { seq: msg.seq, data: msg.data };
          handler.current(overviewWindows(channel.data));
        } else if (msg.type === 'update' && msg.channel === 'overview') {
          if (channel === null || msg.seq !== channel.seq + 1) {
            // Missed a change: start over from a new snapshot.
            channel = null;
            ws.send(SUBSCRIBE);
            return;
          }
          channel = { seq: msg.seq, data: mergePatch(channel.data, msg.data) };
          // A window that aged out (null in the update) is left to the page's own trimming.
          handler.current(overviewWindows(channel.data, windowKeys(msg.data)));
        } else if (msg.type === 'error') {
          console.warn('tidemark:', msg.code, msg.message);
        }
      };
      ws.onclose = () => {
        if (stopped) return;
        const delay = Math.min(MAX_BACKOFF_MS, backoff) * (0.8 + Math.random() * 0.4);
        backoff = Math.min(MAX_BACKOFF_MS, backoff * 2);
        const due = Date.now() + delay;
        const tick = () =>
          setStatus({ kind: 'retrying', inSeconds: Math.max(0, Math.ceil((due - Date.now()) / 1000)) });
        tick();
        countdown = window.setInterval(tick, 1000);
        timer = window.setTimeout(() => {
          window.clearInterval(countdown);
          connect();
        }, delay);
      };
    };

    connect();
    return () => {
      stopped = true;
      window.clearTimeout(timer);
      window.clearInterval(countdown);
      socket?.close();
    };
  }, []);

  return status;
}
