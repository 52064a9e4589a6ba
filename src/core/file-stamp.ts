/**
 * A file's version for "has it changed?" checks of files re-read while running (htpasswd, Docker
 * config files): inode, modification time and size, so an edit in place and a rename over it (a
 * Kubernetes secret update, an editor's save) both count. Throws what statSync throws.
 */
import { statSync } from 'node:fs';

export function fileStamp(path: string): string {
  const s = statSync(path);
  return `${s.ino}:${s.mtimeMs}:${s.size}`;
}
