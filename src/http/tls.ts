/**
 * Serving HTTPS (server.tls): the certificate and key are read when the server starts (a bad pair
 * stops the start, naming the key) and again whenever either file, or the client CA bundle,
 * changes. The files are polled (fs.watchFile: stat every reloadInterval), which also sees a
 * Kubernetes secret's symlink swap and an editor's rename. A new set that fails to load (half
 * written, a key that does not match) keeps the old one in use and is logged; the next change is
 * tried again. Nothing here ever stops a running server.
 *
 * With clientCaFile every client must present a certificate signed by one of its CAs: the
 * handshake fails otherwise, before any HTTP. (access/ may later take the certificate's subject
 * as the client's identity; today it only gets through the door.)
 */
import { readFileSync, unwatchFile, watchFile, type Stats } from 'node:fs';
import { createSecureContext, type SecureContextOptions } from 'node:tls';
import type { Server } from 'node:https';
import type { ServerTls } from '../core/config.js';
import { ConfigError } from '../core/config.js';

export interface TlsLog {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
}

/** The secure-context options from the files; throws naming the file (and key) that failed. */
export function loadTls(tls: ServerTls): SecureContextOptions {
  const read = (file: string, key: string): Buffer => {
    try {
      return readFileSync(file);
    } catch (err) {
      throw new ConfigError(`server.tls.${key}`, `cannot read ${file}: ${(err as Error).message}`);
    }
  };
  const options: SecureContextOptions = { cert: read(tls.certFile, 'certFile'), key: read(tls.keyFile, 'keyFile') };
  if (tls.clientCaFile !== undefined) options.ca = read(tls.clientCaFile, 'clientCaFile');
  try {
    createSecureContext(options);
  } catch (err) {
    const m = (err as Error).message;
    const key = /ca|certificate authorit/i.test(m) && tls.clientCaFile !== undefined ? 'clientCaFile' : /key/i.test(m) ? 'keyFile' : 'certFile';
    throw new ConfigError(`server.tls.${key}`, `cannot use ${tls.certFile} and ${tls.keyFile}${tls.clientCaFile ? ` with ${tls.clientCaFile}` : ''}: ${m}`);
  }
  return options;
}

/** The https.createServer options for server.tls: the pair, and client certificates required with clientCaFile. */
export function httpsOptions(tls: ServerTls): SecureContextOptions & { requestCert: boolean; rejectUnauthorized: boolean } {
  const required = tls.clientCaFile !== undefined;
  return { ...loadTls(tls), requestCert: required, rejectUnauthorized: required };
}

/** Polls the files and swaps the server's secure context when they change; stops when the server closes. */
export function watchTls(server: Server, tls: ServerTls, log: TlsLog): void {
  const files = [tls.certFile, tls.keyFile, ...(tls.clientCaFile !== undefined ? [tls.clientCaFile] : [])];
  const changed = (now: Stats, before: Stats): void => {
    if (now.mtimeMs === before.mtimeMs && now.ino === before.ino && now.size === before.size) return;
    try {
      server.setSecureContext(loadTls(tls));
      log.info({ certFile: tls.certFile }, 'TLS certificate reloaded');
    } catch (err) {
      log.warn({ err: (err as Error).message }, 'TLS certificate not reloaded: the files do not load, the previous certificate stays in use');
    }
  };
  for (const f of files) watchFile(f, { interval: tls.reloadInterval, persistent: false }, changed);
  server.once('close', () => {
    for (const f of files) unwatchFile(f, changed);
  });
}
