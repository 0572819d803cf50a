/** One queued event: its id, the tab that owns it, its size and its NDJSON line. */
export interface Rec {
  id: string;
  /** The owning tab; only the owner sends it, until that tab is gone. */
  o: string;
  /** Bytes of the line, its newline included. */
  n: number;
  e: string;
}

/** The queue in storage, oldest (smallest UUIDv7) first. */
export interface Store {
  all(): Promise<Rec[]>;
  put(recs: Rec[]): Promise<void>;
  del(ids: string[]): Promise<void>;
}

const LS_KEY = 'tidemark_queue';

const lsRead = (): Rec[] => JSON.parse(localStorage.getItem(LS_KEY) || '[]');

/** localStorage: where IndexedDB is missing or refuses to open (some private modes). */
const local: Store = {
  all: async () => lsRead(),
  async put(recs) {
    const ids = new Set(recs.map((r) => r.id));
    const all = lsRead().filter((r) => !ids.has(r.id)).concat(recs);
    localStorage.setItem(LS_KEY, JSON.stringify(all.sort((a, b) => (a.id < b.id ? -1 : 1))));
  },
  async del(ids) {
    const gone = new Set(ids);
    localStorage.setItem(LS_KEY, JSON.stringify(lsRead().filter((r) => !gone.has(r.id))));
  },
};

function indexed(db: IDBDatabase): Store {
  const run = <T>(mode: IDBTransactionMode, body: (s: IDBObjectStore) => IDBRequest<T> | void) =>
    new Promise<T>((ok, fail) => {
      const tx = db.transaction('q', mode);
      const req = body(tx.objectStore('q'));
      // Resolving on completion, not on the request, means the write is durable.
      tx.oncomplete = () => ok(req ? req.result : (undefined as T));
      tx.onerror = tx.onabort = () => fail(tx.error);
    });
  return {
    all: () => run('readonly', (s) => s.getAll() as IDBRequest<Rec[]>),
    put: (recs) => run('readwrite', (s) => void recs.forEach((r) => s.put(r))),
    del: (ids) => run('readwrite', (s) => void ids.forEach((id) => s.delete(id))),
  };
}

/** IndexedDB when it opens, localStorage otherwise. */
export function openStore(): Promise<Store> {
  return new Promise((ok) => {
    try {
      const req = indexedDB.open('tidemark', 1);
      req.onupgradeneeded = () => req.result.createObjectStore('q', { keyPath: 'id' });
      req.onsuccess = () => ok(indexed(req.result));
      req.onerror = () => ok(local);
    } catch {
      ok(local);
    }
  });
}
