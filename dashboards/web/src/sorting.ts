// Sorting table rows by a column, for the tables the user may sort.

export type Direction = 'asc' | 'desc';

export interface SortState<K extends string> {
  key: K;
  direction: Direction;
}

/**
 * Rows sorted by `key`. Unknown values (a ratio whose divisor is 0) go last
 * whichever the direction, since they are not small or large; ties keep
 * their order by `tieKey` so rows do not jump between updates.
 */
export function sortRows<R, K extends string>(
  rows: R[],
  sort: SortState<K>,
  value: (row: R, key: K) => number | string | null | undefined,
  tieKey: (row: R) => string,
): R[] {
  const sign = sort.direction === 'asc' ? 1 : -1;
  return [...rows].sort((a, b) => {
    const x = value(a, sort.key);
    const y = value(b, sort.key);
    const xMissing = x === null || x === undefined || (typeof x === 'number' && Number.isNaN(x));
    const yMissing = y === null || y === undefined || (typeof y === 'number' && Number.isNaN(y));
    if (xMissing || yMissing) {
      if (xMissing && !yMissing) return 1;
      if (yMissing && !xMissing) return -1;
    } else if (x !== y) {
      const cmp = typeof x === 'number' && typeof y === 'number' ? x - y : String(x).localeCompare(String(y));
      return sign * cmp;
    }
    return tieKey(a).localeCompare(tieKey(b), 'en', { numeric: true });
  });
}

/** The next sort after clicking `key`: the same column flips, another starts descending. */
export function toggleSort<K extends string>(sort: SortState<K>, key: K): SortState<K> {
  if (sort.key === key) return { key, direction: sort.direction === 'asc' ? 'desc' : 'asc' };
  return { key, direction: 'desc' };
}
