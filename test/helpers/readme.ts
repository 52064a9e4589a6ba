/** Code blocks of the README marked `<!-- snippet: NAME -->`, so tests run what users copy. */
import { readFileSync } from 'node:fs';

export function readmeSnippet(name: string): string {
  const readme = readFileSync(new URL('../../README.md', import.meta.url), 'utf8');
  const m = new RegExp(`<!-- snippet: ${name.replace(/[.]/g, '\\.')} -->\\n\`\`\`\\w*\\n([\\s\\S]*?)\`\`\``).exec(readme);
  if (!m) throw new Error(`README.md has no snippet ${name}`);
  return m[1]!;
}

/** A README snippet pointed at the cache under test, with the real registries at a dead address. */
export function localSnippet(name: string, cacheHost: string): string {
  return pointAtCache(readmeSnippet(name), cacheHost);
}

/** Client configuration written for `cache.example.internal:5000` pointed at the cache under test instead. */
export function pointAtCache(text: string, cacheHost: string): string {
  return text
    .replaceAll('cache.example.internal:5000', cacheHost)
    .replace(/https:\/\/registry-1\.docker\.io/g, 'http://127.0.0.1:1')
    .replace(/location = "(registry-1\.docker\.io|ghcr\.io)"/g, 'location = "127.0.0.1:1"\ninsecure = true');
}
