// What each role may open, mirroring the permissions of docs/api.md: each
// role holds everything the one before it holds.

export type Permission = 'metrics:read' | 'query:run' | 'alerts:write' | 'users:manage' | 'audit:read' | 'operations:read';

const GRANTS: Record<string, Permission[]> = {
  analyst: ['metrics:read', 'query:run'],
  manager: ['metrics:read', 'query:run', 'alerts:write'],
  admin: ['metrics:read', 'query:run', 'alerts:write', 'users:manage', 'audit:read', 'operations:read'],
};

export function can(role: string, permission: Permission): boolean {
  return GRANTS[role]?.includes(permission) ?? false;
}

export interface PageEntry {
  path: string;
  title: string;
  /** Every permission the page's calls need. */
  needs: Permission[];
}

export const PAGES: PageEntry[] = [
  { path: '/', title: 'Overview', needs: ['metrics:read'] },
  { path: '/trending', title: 'Trending', needs: ['metrics:read'] },
  { path: '/ads', title: 'Ads', needs: ['metrics:read'] },
  { path: '/engagement', title: 'Engagement', needs: ['metrics:read'] },
  { path: '/alerts', title: 'Alerts', needs: ['metrics:read'] },
  { path: '/query', title: 'Query', needs: ['query:run'] },
  { path: '/admin', title: 'Admin', needs: ['users:manage', 'audit:read', 'operations:read'] },
];

/** The page a path belongs to (`/ads/c7` is the Ads page's). */
export function pageOf(path: string): PageEntry | null {
  if (path === '/' || path === '') return PAGES[0];
  return PAGES.find((p) => p.path !== '/' && (path === p.path || path.startsWith(`${p.path}/`))) ?? null;
}

export function mayOpen(role: string, page: PageEntry): boolean {
  return page.needs.every((p) => can(role, p));
}
