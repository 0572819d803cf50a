// What one channel message does to the channel's data as the client keeps
// it (docs/api.md, WebSocket protocol), apart from the socket so it can be
// tested alone.
import { mergePatch, type Json } from './data';

export interface ChannelState {
  /** The `seq` the data is at; null until a snapshot arrives. */
  seq: number | null;
  data: Json | null;
}

export type ChannelStep =
  /** The data changed: hand it (and the update's patch, null for a snapshot) to the listeners. */
  | { kind: 'deliver'; state: ChannelState; patch: Json | null }
  /** A change was missed: subscribe again for a new snapshot, and wait for it. */
  | { kind: 'resubscribe'; state: ChannelState }
  /** An update while waiting for a snapshot: nothing to do. */
  | { kind: 'ignore'; state: ChannelState };

export function applyMessage(
  state: ChannelState,
  message: { type: 'snapshot' | 'update'; seq: number; data: Json },
): ChannelStep {
  if (message.type === 'snapshot') {
    return { kind: 'deliver', state: { seq: message.seq, data: message.data }, patch: null };
  }
  if (state.seq === null || state.data === null) return { kind: 'ignore', state };
  if (message.seq !== state.seq + 1) return { kind: 'resubscribe', state: { seq: null, data: state.data } };
  return { kind: 'deliver', state: { seq: message.seq, data: mergePatch(state.data, message.data) }, patch: message.data };
}
