// Types of @pgpush/client (src/index.js), written by hand: the module itself is plain JavaScript.

/** One row of the user's inbox, as the stream delivers it. */
export interface Message {
  /** The row's `event` column: any name but pgpush's own (see isControl). */
  type: string;
  /** The row's seq, as a string: seqs are integers that may exceed 2^53 (Number would round them). */
  id: string;
  /** The row's `data`, parsed from JSON (the raw text, should it not be JSON). */
  data: unknown;
}

export type State =
  | "connecting"
  | "live"
  | "reconnecting"
  | "paused"
  | "down"
  | "expired"
  | "unauthorized"
  | "closed";

export interface Status {
  state: State;
  /** Whether this tab holds the shared stream (the others get its rows over a BroadcastChannel). */
  leader: boolean;
  /** The newest row id seen, sent back as `lastEventId` on reconnect; null before the first row. */
  lastEventId: string | null;
  /** When the next attempt is due (epoch ms): states "paused" and "down". */
  reconnectAt?: number;
  /** Why the stream is down: state "down". */
  reason?: string;
  /** 401 or 403: state "unauthorized". */
  httpStatus?: number;
}

export interface ResetInfo {
  /** "too_many_unread", "cursor_ahead", or "reset" when the server gave none. */
  reason: string;
}

export interface ConnectOptions {
  /** The stream's URL; relative to the page, absolute outside one (Node). Default "/events". */
  url?: string;
  /** A fresh ticket (POST /events/ticket) for every new connection, sent as `?ticket=`. */
  getTicket?: () => string | Promise<string>;
  /** A JWT, or a function returning one for every new connection: sent as `Authorization: Bearer`. */
  token?: string | (() => string | Promise<string>);
  /** Send cookies to a stream on another origin (CORS). Default false. */
  withCredentials?: boolean;
  /** Every row, of any type, exactly once and in order. */
  onMessage?: (message: Message) => void;
  /** The server's `reset`: reload the inbox over REST (GET /me/messages?unread=true). */
  onReset?: (info: ResetInfo) => void;
  /** Every change of the stream's state. */
  onStatus?: (status: Status) => void;
  /** Share one stream between the tabs of this origin (Web Locks + BroadcastChannel). Default true. */
  shared?: boolean;
  /**
   * The Web Lock tabs queue on; tabs with the same name share a stream (the holder's). Default
   * "pgpush-stream". Name it per user if different users can be signed in in different tabs of one origin.
   */
  lockName?: string;
  /** The BroadcastChannel the holding tab relays on. Default "pgpush-stream". */
  channelName?: string;
}

export interface Connection {
  /** Reopen the stream now, e.g. after a pause, an expired token or a new sign-in. */
  reconnect(): void;
  /** Stop for good; a tab holding the shared stream passes it to another tab. */
  close(): void;
  readonly lastEventId: string | null;
  readonly leader: boolean;
  readonly status: Status;
}

/** Open (or join) the browser's shared pgpush stream. Throws TypeError on an unknown option. */
export function connect(options?: ConnectOptions): Connection;

/** pgpush's own event names (`pause`, `reset`, `token_expired`, any name starting with `pgpush`). */
export function isControl(type: string): boolean;

/** One event of a text/event-stream body; `id` is null when the event had no `id:` field. */
export interface Frame {
  event: string;
  data: string;
  id: string | null;
}

/** Parse a text/event-stream body, calling `onFrame` per event and `onRetry` per `retry:` field. */
export function readEvents(
  body: ReadableStream<Uint8Array>,
  onFrame: (frame: Frame) => void,
  onRetry?: (ms: number) => void,
): Promise<void>;
