/**
 * `ocicache verify`: re-hashes every blob file and manifest row, reconciles the index with the
 * files, and removes what is wrong. After it, every file under blobs/ hashes to its name, every
 * blob row has its file, every manifest row hashes to its digest, and no tag points at nothing.
 * Runs on a stopped cache: openCache's lock refuses it while a server has the directory open.
 */
import { rm, stat } from 'node:fs/promises';
import { digestOf, isDigest, splitDigest } from '../core/digest.js';
import { digestOfFile } from '../storage/blob-store.js';
import type { Services } from './services.js';

export interface VerifyReport {
  blobsChecked: number;
  manifestsChecked: number;
  /** files whose content does not hash to their name: deleted, with the manifests that use them */
  corruptBlobs: string[];
  /** blob rows without a file: dropped, with the manifests that use them */
  missingBlobs: string[];
  /** verified files without a row (a crash between rename and insert): adopted into the index */
  adoptedBlobs: string[];
  /** files under blobs/ whose names are not digests, or that sit in the wrong directory: deleted */
  strayFiles: string[];
  /** manifest rows whose bytes do not hash to their digest: dropped with their tags */
  corruptManifests: string[];
  /** manifests and tags dropped because a blob they point to was corrupt or missing */
  droppedManifests: number;
  droppedTags: number;
  /** index rows pointing at nothing (tags, repos, refs, access times): deleted */
  danglingRows: number;
}

export function problems(r: VerifyReport): number {
  return r.corruptBlobs.length + r.missingBlobs.length + r.adoptedBlobs.length + r.strayFiles.length + r.corruptManifests.length + r.danglingRows;
}

export async function verify(s: Pick<Services, 'db' | 'store'>): Promise<VerifyReport> {
  const { db, store } = s;
  const r: VerifyReport = {
    blobsChecked: 0, manifestsChecked: 0, corruptBlobs: [], missingBlobs: [], adoptedBlobs: [], strayFiles: [], corruptManifests: [], droppedManifests: 0, droppedTags: 0, danglingRows: 0,
  };
  const drop = (digest: string): void => {
    const d = db.dropBlob(digest);
    r.droppedManifests += d.manifests.length;
    r.droppedTags += d.tags;
  };
  const good = new Set<string>();
  for await (const file of store.files()) {
    if (!isDigest(file.digest) || !file.canonical) {
      r.strayFiles.push(file.path);
      await rm(file.path, { force: true, recursive: true });
      continue;
    }
    r.blobsChecked++;
    const actual = await digestOfFile(file.path, splitDigest(file.digest).algorithm);
    if (actual !== file.digest) {
      r.corruptBlobs.push(file.digest);
      drop(file.digest);
      await rm(file.path, { force: true });
      continue;
    }
    good.add(file.digest);
    if (!db.hasBlob(file.digest)) {
      const st = await stat(file.path);
      db.adoptBlob(file.digest, st.size, Math.round(st.mtimeMs));
      r.adoptedBlobs.push(file.digest);
    }
  }
  for (const row of db.allBlobs()) {
    if (good.has(row.digest)) continue;
    r.missingBlobs.push(row.digest);
    drop(row.digest);
  }
  const corrupt: string[] = [];
  for (const m of db.manifests()) {
    r.manifestsChecked++;
    if (!isDigest(m.digest) || digestOf(m.body, splitDigest(m.digest).algorithm) !== m.digest) corrupt.push(m.digest);
  }
  for (const digest of corrupt) {
    const d = db.dropManifest(digest);
    r.corruptManifests.push(digest);
    r.droppedManifests += d.manifests.length - 1;
    r.droppedTags += d.tags;
  }
  r.danglingRows = db.pruneDangling();
  return r;
}
