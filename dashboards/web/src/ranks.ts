// Rank changes of a top list between two windows, as the trending list moves
// from one window to the next.

export type RankChange =
  | { kind: 'new' }
  | { kind: 'up'; by: number }
  | { kind: 'down'; by: number }
  | { kind: 'same' };

export interface Ranked {
  tag: string;
  rank: number;
}

/**
 * Each tag of `current` against its rank in `previous` (the window before).
 * With no previous window known yet there is nothing to compare with, and
 * every tag is `same` rather than `new`.
 */
export function rankChanges(current: Ranked[], previous: Ranked[] | null): Map<string, RankChange> {
  const out = new Map<string, RankChange>();
  const before = new Map((previous ?? []).map((r) => [r.tag, r.rank]));
  for (const { tag, rank } of current) {
    const was = before.get(tag);
    if (previous === null) out.set(tag, { kind: 'same' });
    else if (was === undefined) out.set(tag, { kind: 'new' });
    else if (rank < was) out.set(tag, { kind: 'up', by: was - rank });
    else if (rank > was) out.set(tag, { kind: 'down', by: rank - was });
    else out.set(tag, { kind: 'same' });
  }
  return out;
}
