/**
 * Serving HTTPS (server.tls): the certificate and key are read when the server starts (a bad pair
 * stops the start, naming the key) and again whenever either file, or the client CA bundle,
 * changes. The files are polled (fs.watchFile: stat every reloadInterval), which also sees a
 * Kubernetes secret's symlink swap and an editor's rename. A new set that fails to load (half
 * written, a key that does not match) keeps the old one in use and is logged; the next change is
 * tried again. Nothing here ever stops a running server.
 *
 * With clientCaFile, clientCertificates `required` (the default) has every client present a
 * certificate signed by one of its CAs: the handshake fails otherwise, before any HTTP. `optional`
 * asks for one and lets clients without in, to authenticate otherwise. With
 * access.clientCertificates a verified certificate's subject CN is the client's user
 * (certificateUser; the decision is access/'s).
 */
import { readFileSync, unwatchFile, watchFile, type Stats } from 'node:fs';
import type { Socket } from 'node:net';
import { createSecureContext, TLSSocket, type SecureContextOptions } from 'node:tls';
import type { CertificateUser } from '../access/access.js';
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

/** The https.createServer options for server.tls: the pair, and client certificates asked for (and perhaps required) with clientCaFile. */
export function httpsOptions(tls: ServerTls): SecureContextOptions & { requestCert: boolean; rejectUnauthorized: boolean } {
  const asked = tls.clientCaFile !== undefined;
  return { ...loadTls(tls), requestCert: asked, rejectUnauthorized: asked && tls.clientCertificates === 'required' };
}

const certificateUsers = new WeakMap<TLSSocket, CertificateUser>();

/**
 * The user the connection's client certificate names: its subject's one CN when the certificate
 * was verified against clientCaFile, null when one was presented but not verified (or has no single
 * CN), undefined when there is none (or the connection is not TLS). Read once per connection.
 */
export function certificateUser(socket: Socket): CertificateUser {
  if (!(socket instanceof TLSSocket)) return undefined;
  if (certificateUsers.has(socket)) return certificateUsers.get(socket);
  const peer = socket.getPeerCertificate();
  let user: CertificateUser;
  if (!peer || Object.keys(peer).length === 0) user = undefined;
  // authorizationError too: Node sets `authorized` after a good handshake and never unsets it.
  else if (!socket.authorized || socket.authorizationError) user = null;
  else user = typeof peer.subject?.CN === 'string' && peer.subject.CN !== '' ? peer.subject.CN : null;
  certificateUsers.set(socket, user);
  return user;
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
