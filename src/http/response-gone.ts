/**
 * Knowing when a response is over: finished, or cut short by the client. A pipelined response
 * queued behind another on a keep-alive connection gets no 'close' of its own when the client
 * hangs up (and no write callbacks either), so the connection's 'close' counts too.
 */
import type { ServerResponse } from 'node:http';

/** Calls `fn` once, when `res` or its connection closes, whichever is first. Returns a function that stops watching. */
export function onResponseGone(res: ServerResponse, fn: () => void): () => void {
  const socket = res.req.socket;
  const unwatch = (): void => {
    res.off('close', gone);
    socket.off('close', gone);
  };
  const gone = (): void => {
    unwatch();
    fn();
  };
  res.once('close', gone);
  socket.once('close', gone);
  return unwatch;
}
