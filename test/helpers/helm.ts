/**
 * The Helm chart rendered offline: helm built from its Go module (scripts/build-helm.sh),
 * `helm lint --strict` and `helm template`, every rendered document validated against the
 * Kubernetes API schemas (kubernetes-models).
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { resolve } from 'node:path';
import type { TestContext } from 'node:test';
import { parseAllDocuments } from 'yaml';
import { exec } from './tools.js';

export const HELM = resolve('.tools/helm');
export const CHART = resolve('helm/ocicache');

export type Doc = { apiVersion: string; kind: string; metadata: { name: string }; spec?: any; data?: Record<string, string> };

export function helmBinary(t: TestContext): string | undefined {
  if (existsSync(HELM)) return HELM;
  if (process.env.CI) throw new Error('.tools/helm missing: run scripts/build-helm.sh (required under CI)');
  t.skip('.tools/helm missing: run scripts/build-helm.sh');
  return undefined;
}

/** helm with its caches outside $HOME. */
export function helm(args: string[]): ReturnType<typeof exec> {
  return exec(HELM, args, { ...process.env, HELM_CACHE_HOME: '/tmp/helm-cache', HELM_CONFIG_HOME: '/tmp/helm-config', HELM_DATA_HOME: '/tmp/helm-data' });
}

/** The kubernetes-models class for a document: core/v1 under v1/, groups under group/version/. */
async function validate(doc: Doc): Promise<void> {
  const path = doc.apiVersion.startsWith('monitoring.coreos.com/')
    ? `@kubernetes-models/prometheus-operator/${doc.apiVersion}/${doc.kind}`
    : `kubernetes-models/${doc.apiVersion}/${doc.kind}`;
  const mod = (await import(path)) as Record<string, new (d: unknown) => { validate(): void }>;
  const Model = mod[doc.kind] ?? mod.default;
  assert.ok(Model, `no model for ${doc.apiVersion} ${doc.kind}`);
  new Model(doc).validate();
}

/** Lints and renders the chart with `args`, checks every document against its Kubernetes schema, and returns them with the rendered config file. */
export async function render(args: string[]): Promise<{ docs: Doc[]; configText: string }> {
  const lint = await helm(['lint', '--strict', CHART, ...args]);
  assert.equal(lint.code, 0, lint.stdout + lint.stderr);
  const out = await helm(['template', 'cache', CHART, '--namespace', 'registry', ...args]);
  assert.equal(out.code, 0, out.stderr);
  const docs = parseAllDocuments(out.stdout).map((d) => d.toJSON() as Doc).filter(Boolean);
  for (const doc of docs) await validate(doc);
  return { docs, configText: docs.find((d) => d.kind === 'ConfigMap' && d.metadata.name === 'cache-ocicache')!.data!['config.yaml']! };
}

