/**
 * Figure 3's references: what relays written in Node take for the same blob, timed in the same
 * run as ocicache. A proxy from 127.0.0.1:<port> to the upstream:
 *
 *   node --import tsx bench/relay.ts <port> <upstream-url>                 TCP, socket to socket
 *   node --import tsx bench/relay.ts <port> <upstream-url> --verify <dir>  TCP, and what a
 *                                                                          verifying cache cannot skip
 *   node --import tsx bench/relay.ts <port> <upstream-url> --http          HTTP: node:http server,
 *                                                                          undici client, pipe()
 *
 * The TCP relays take one request per connection. With --verify, every body byte from the
 * upstream is hashed (sha256) and written to a file in <dir> by positional writev batches on the
 * thread pool, at most 4 MiB behind the network, and the last byte waits until the hash is done
 * and every byte is written: what src/storage/fill.ts does. Nothing else: the response head is found
 * with indexOf and passed on as it is; no HTTP parser, no stream but the two sockets, no index, no
 * log.
 */
import { createHash } from 'node:crypto';
import { open, rm } from 'node:fs/promises';
import { createServer as createHttpServer } from 'node:http';
import { connect, createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { request } from 'undici';

const [port, upstreamUrl, flag, dir] = process.argv.slice(2);
const upstream = new URL(upstreamUrl!);
let files = 0;

if (flag === '--http') httpRelay();
else tcpRelay();

/** HTTP on both sides and nothing else: no hash, no file, no bookkeeping. */
function httpRelay(): void {
  createHttpServer((req, res) => {
    request(upstreamUrl + req.url!, { headers: req.headers.accept ? { accept: req.headers.accept } : {} })
      .then((up) => {
        res.writeHead(up.statusCode, { 'content-type': String(up.headers['content-type'] ?? 'application/octet-stream'), 'content-length': String(up.headers['content-length'] ?? 0) });
        return pipeline(up.body, res);
      })
      .catch(() => res.destroy());
  }).listen(Number(port), '127.0.0.1');
}

function tcpRelay(): void {
  createServer((client) => {
    const up = connect(Number(upstream.port), upstream.hostname);
    client.on('error', () => up.destroy());
    up.on('error', () => client.destroy());
    client.pipe(up);
    if (flag === '--verify') verifying(up, client, join(dir!, `body-${files++}`));
    else up.pipe(client);
  }).listen(Number(port), '127.0.0.1');
}

/** As in src/storage/fill.ts: disk writes may lag the network this far before the upstream is paused. */
const WRITE_WINDOW = 4 * 1024 * 1024;

function verifying(up: Socket, client: Socket, path: string): void {
  up.pause();
  const hash = createHash('sha256');
  const queue: Buffer[] = [];
  /** bytes received and not yet written */
  let queued = 0;
  let written = 0;
  let writing: Promise<void> | undefined;
  let head: Buffer | undefined = Buffer.alloc(0);
  let remaining = 0;
  let done = false;
  let clientFull = false;
  // The upstream is paused while the client is not draining or the disk is a window behind.
  const flow = (): void => {
    if (clientFull || queued >= WRITE_WINDOW) up.pause();
    else up.resume();
  };
  const send = (b: Buffer): void => {
    if (client.write(b)) return;
    clientFull = true;
    flow();
    client.once('drain', () => {
      clientFull = false;
      flow();
    });
  };
  const fail = (): void => {
    done = true;
    client.destroy();
    up.destroy();
  };
  up.on('end', () => {
    if (!done) fail();
  });
  open(path, 'w').then((file) => {
    const pump = (): void => {
      if (writing || queue.length === 0) return;
      const batch = queue.splice(0, 64);
      let bytes = 0;
      for (const b of batch) bytes += b.length;
      writing = file.writev(batch, written).then(({ bytesWritten }) => {
        if (bytesWritten !== bytes) return fail();
        written += bytes;
        queued -= bytes;
        writing = undefined;
        flow();
        pump();
      }, fail);
    };
    const close = (): Promise<void> => file.close().then(() => rm(path));
    // As ocicache: the last byte goes once the digest is known and every byte is written; closing
    // and removing the file come after it.
    const finish = async (last: Buffer): Promise<void> => {
      while (writing) await writing;
      hash.digest('hex');
      send(last);
      await close();
    };
    up.on('data', (chunk: Buffer) => {
      if (done) return fail(); // one response per connection
      let body = chunk;
      if (head) {
        head = Buffer.concat([head, chunk]);
        const end = head.indexOf('\r\n\r\n');
        if (end < 0) return;
        const length = /^content-length: *(\d+)/im.exec(head.subarray(0, end).toString('latin1'));
        if (!length) return fail();
        remaining = Number(length[1]);
        send(head.subarray(0, end + 4));
        body = head.subarray(end + 4);
        head = undefined;
        if (remaining === 0) {
          done = true;
          return void close().catch(fail);
        }
      }
      if (body.length === 0) return;
      remaining -= body.length;
      if (remaining < 0) return fail();
      hash.update(body);
      queue.push(body);
      queued += body.length;
      pump();
      flow();
      if (remaining > 0) return send(body);
      done = true;
      send(body.subarray(0, body.length - 1));
      finish(body.subarray(body.length - 1)).catch(fail);
    });
    flow();
  }, fail);
}
