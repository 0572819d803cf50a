import { defineConfig } from 'vite';

// The dev server forwards the API and the WebSocket to a running tidemark
// (TIDEMARK_URL, default http://127.0.0.1:8080); the built app is served by it.
const target = process.env.TIDEMARK_URL ?? 'http://127.0.0.1:8080';

export default defineConfig({
  esbuild: { jsx: 'automatic' },
  server: {
    proxy: {
      '/api': target,
      '/ws': { target, ws: true },
    },
  },
  build: { outDir: 'dist', emptyOutDir: true },
});
