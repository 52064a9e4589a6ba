/**
 * The layering of src/ (docs/architecture.md), enforced: which folder may import which, no import
 * cycles between files, fastify only in src/http/, and no source file above MAX_LINES lines.
 * Imports are read with TypeScript's own pre-processor, so `import type`, `export … from`,
 * multi-line imports and dynamic `import()` all count, and commented-out imports do not.
 */
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative, resolve, sep } from 'node:path';
import test from 'node:test';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const SRC = join(ROOT, 'src');
const MAX_LINES = 400;

/**
 * What each part of src/ may import (relative imports only). A folder is named by itself; a file
 * directly under src/ by its file name. '*' means anything. A folder or top-level file missing
 * here fails the test: add it with its place in the layering (docs/architecture.md).
 */
const MAY_IMPORT: Record<string, readonly string[] | '*'> = {
  core: ['core'],
  telemetry: ['core', 'telemetry'],
  storage: ['core', 'storage'],
  upstream: ['core', 'telemetry', 'upstream'],
  cache: ['core', 'telemetry', 'storage', 'upstream', 'cache'],
  // access control: between http/ and cache/, which never knows who asked (docs/architecture.md).
  access: ['core', 'telemetry', 'access'],
  // fleet configuration for existing balancers (HAProxy): derived from the config alone.
  fleet: ['core', 'fleet'],
  // version.ts: the package version, a leaf with no imports of ours; the status page shows it.
  http: ['core', 'telemetry', 'storage', 'upstream', 'cache', 'access', 'http', 'version.ts'],
  'cli.ts': '*',
  // worker.ts: the entry of a group's worker processes (http/cluster.ts).
  'worker.ts': ['core', 'http'],
  'version.ts': [],
};

/** Only these parts may import fastify (or any @fastify/ package). */
const FASTIFY_ALLOWED = new Set(['http']);

interface Import {
  /** the importing file, relative to the repository root */
  from: string;
  line: number;
  /** the source line, for the failure message */
  text: string;
  specifier: string;
  /** for relative imports: the file imported, relative to the repository root */
  target?: string;
}

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  for (const entry of readdirSync(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) out.push(...sourceFiles(path));
    else if (entry.isFile() && entry.name.endsWith('.ts') && !entry.name.endsWith('.d.ts')) out.push(path);
  }
  return out.sort();
}

/** The part of src/ a file belongs to: its first folder, or its own name when directly under src/. */
function partOf(file: string): string {
  const parts = relative(SRC, file).split(sep);
  return parts[0]!;
}

/** `./x.js` is the NodeNext spelling of `./x.ts`. */
function resolveRelative(from: string, specifier: string): string {
  const base = resolve(dirname(from), specifier);
  for (const candidate of [base.replace(/\.js$/, '.ts'), base, `${base}.ts`, join(base, 'index.ts')]) {
    if (existsSync(candidate) && candidate.endsWith('.ts')) return candidate;
  }
  return base;
}

const files = sourceFiles(SRC);
const texts = new Map(files.map((f) => [f, readFileSync(f, 'utf8')]));

const imports: Import[] = files.flatMap((file) => {
  const text = texts.get(file)!;
  const lines = text.split('\n');
  return ts.preProcessFile(text, true, true).importedFiles.map(({ fileName, pos }) => {
    let line = text.slice(0, pos).split('\n').length;
    // A multi-line import (`} from '…'` on a later line) is shown from its first line.
    if (/^\s*}/.test(lines[line - 1]!)) {
      for (let up = line - 1; up >= 1 && line - up < 30; up--) {
        if (/^\s*(import|export)\b/.test(lines[up - 1]!)) {
          line = up;
          break;
        }
      }
    }
    const first = lines[line - 1]!.trim();
    const shown = first.includes(fileName) ? first : `${first} … '${fileName}'`;
    const imp: Import = { from: relative(ROOT, file), line, text: shown, specifier: fileName };
    if (fileName.startsWith('.')) imp.target = relative(ROOT, resolveRelative(file, fileName));
    return imp;
  });
});

function show(imp: Import): string {
  return `${imp.from}:${imp.line}: ${imp.text}`;
}

test('architecture: every part of src/ has a place in the layering table', () => {
  const unknown = [...new Set(files.map(partOf))].filter((p) => !(p in MAY_IMPORT));
  assert.deepEqual(unknown, [], `parts of src/ missing from MAY_IMPORT in test/architecture.test.ts: ${unknown.join(', ')}`);
});

test('architecture: relative imports resolve to source files under src/', () => {
  const bad = imports.filter((i) => i.target !== undefined && (!texts.has(join(ROOT, i.target)) || !join(ROOT, i.target).startsWith(SRC + sep)));
  assert.deepEqual(bad.map(show), [], 'imports that do not name a file under src/');
});

test('architecture: each part imports only the parts below it', async (t) => {
  for (const [part, allowed] of Object.entries(MAY_IMPORT)) {
    await t.test(`${part} imports ${allowed === '*' ? 'anything' : allowed.length === 0 ? 'nothing of ours' : `only ${allowed.join(', ')}`}`, () => {
      if (allowed === '*') return;
      const offending = imports
        .filter((i) => i.target !== undefined && partOf(join(ROOT, i.from)) === part)
        .filter((i) => !allowed.includes(partOf(join(ROOT, i.target!))))
        .map((i) => `${show(i)}  (${part} → ${partOf(join(ROOT, i.target!))})`);
      assert.deepEqual(offending, [], `${part} may import only: ${allowed.join(', ') || 'nothing of ours'}`);
    });
  }
});

test('architecture: only src/http/ imports fastify', () => {
  const offending = imports
    .filter((i) => i.specifier === 'fastify' || i.specifier.startsWith('fastify/') || i.specifier.startsWith('@fastify/'))
    .filter((i) => !FASTIFY_ALLOWED.has(partOf(join(ROOT, i.from))))
    .map(show);
  assert.deepEqual(offending, [], 'nothing below http/ knows the web framework');
});

test('architecture: a worker process loads neither fastify nor the AWS SDK (its memory is the point of its own entry)', () => {
  const loaded = new Set<string>();
  const packages = new Set<string>();
  const visit = (file: string): void => {
    if (loaded.has(file)) return;
    loaded.add(file);
    // Type imports and module augmentations (`declare module 'fastify'`) load nothing at run time.
    for (const i of imports.filter((x) => x.from === file && !/^(import type|export type|declare module)\b/.test(x.text))) {
      if (i.target !== undefined) visit(i.target);
      else packages.add(i.specifier);
    }
  };
  visit(join('src', 'worker.ts'));
  assert.ok(loaded.has(join('src', 'http', 'worker.ts')) && packages.has('better-sqlite3'), 'the walk reached the worker and its index');
  assert.deepEqual([...packages].filter((p) => p === 'fastify' || p.startsWith('@fastify/') || p.startsWith('@aws-sdk/')), []);
  assert.ok(!loaded.has(join('src', 'http', 'app.ts')) && !loaded.has(join('src', 'cache', 'services.ts')), 'not the whole cache');
});

test('architecture: no import cycles between files', () => {
  const edges = new Map<string, Import[]>();
  for (const i of imports) if (i.target !== undefined) edges.set(i.from, [...(edges.get(i.from) ?? []), i]);
  // Depth-first search; a back edge to a file on the current path closes a cycle.
  const state = new Map<string, 'active' | 'done'>();
  const path: Import[] = [];
  const cycles: string[] = [];
  const visit = (file: string): void => {
    state.set(file, 'active');
    for (const imp of edges.get(file) ?? []) {
      const next = imp.target!;
      if (state.get(next) === 'active') {
        const start = path.findIndex((p) => p.from === next);
        cycles.push([...path.slice(start < 0 ? path.length : start), imp].map(show).join('\n    → '));
      } else if (!state.has(next)) {
        path.push(imp);
        visit(next);
        path.pop();
      }
    }
    state.set(file, 'done');
  };
  for (const file of files) if (!state.has(relative(ROOT, file))) visit(relative(ROOT, file));
  assert.deepEqual(cycles, [], 'import cycles (each line imports the next file)');
});

test(`architecture: no source file is longer than ${MAX_LINES} lines`, () => {
  const long = files
    .map((f) => ({ file: relative(ROOT, f), lines: texts.get(f)!.replace(/\n$/, '').split('\n').length }))
    .filter((f) => f.lines > MAX_LINES)
    .map((f) => `${f.file}: ${f.lines} lines`);
  assert.deepEqual(long, [], `split files above ${MAX_LINES} lines by what they decide`);
});

test('architecture: the checks see the imports they are meant to', () => {
  // Guards the extraction itself: a parser that found nothing would pass every test above.
  const routes = imports.filter((i) => i.from === join('src', 'http', 'routes.ts'));
  assert.ok(routes.some((i) => i.specifier === 'fastify' && i.text.startsWith('import type')), 'import type of fastify in routes.ts');
  assert.ok(routes.some((i) => i.target === join('src', 'cache', 'blobs.ts')), 'routes.ts → cache/blobs.ts');
  assert.ok(imports.filter((i) => i.target !== undefined).length > 50, 'relative imports found');
});
