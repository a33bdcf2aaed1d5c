/**
 * Framed connections between primary and secondary over TCP (spec §7), and
 * the `Network` interface through which the replication logic reaches them,
 * so tests can inject their own (lossy, corrupting, slow) transports.
 */
import net from "node:net";
import { encodeFrame, FrameParser, ProtocolError, type Frame } from "./wire.ts";

/** A bidirectional stream of frames. */
export interface Connection {
  /** Queues a frame (header + payload pieces). Returns false once the socket buffer is full. */
  send(pieces: Uint8Array[]): boolean;
  /** Resolves when queued bytes have drained below the high-water mark. */
  drained(): Promise<void>;
  /** Closes the connection; `onClose` fires once with the reason. */
  close(reason: string): void;
  /** Set by the user: called for each received frame. */
  onFrame: (frame: Frame) => void;
  /** Set by the user: called once when the connection ends, with why. */
  onClose: (reason: string) => void;
  readonly remoteAddress: string;
  readonly closed: boolean;
}

/** How the primary reaches its secondary. */
export interface Network {
  connect(options: ConnectOptions): Promise<Connection>;
}

export interface ConnectOptions {
  host: string;
  port: number;
  sourceHost?: string;
  timeoutMs: number;
}

/** Wraps a connected socket in a framed Connection. Parsing starts immediately. */
export function socketConnection(socket: net.Socket): Connection {
  socket.setNoDelay(true);
  let closed = false;
  const conn: Connection = {
    onFrame: () => {},
    onClose: () => {},
    remoteAddress: `${socket.remoteAddress ?? "?"}:${socket.remotePort ?? "?"}`,
    get closed() {
      return closed;
    },
    send(pieces) {
      if (closed) return false;
      if (pieces.length === 1) return socket.write(pieces[0]!);
      socket.cork();
      let ok = true;
      for (const piece of pieces) ok = socket.write(piece);
      socket.uncork();
      return ok;
    },
    drained() {
      if (closed || !socket.writableNeedDrain) return Promise.resolve();
      return new Promise((resolve) => {
        const done = () => {
          socket.off("drain", done);
          socket.off("close", done);
          resolve();
        };
        socket.on("drain", done);
        socket.on("close", done);
      });
    },
    close(reason) {
      finish(reason);
      socket.destroy();
    },
  };
  const finish = (reason: string) => {
    if (closed) return;
    closed = true;
    conn.onClose(reason);
  };
  const parser = new FrameParser((frame) => conn.onFrame(frame));
  socket.on("data", (chunk: Buffer) => {
    if (closed) return;
    try {
      parser.push(chunk);
    } catch (error) {
      const why = error instanceof ProtocolError ? error.message : `handler failed: ${error}`;
      conn.close(`protocol violation from ${conn.remoteAddress}: ${why}`);
    }
  });
  socket.on("error", (error) => finish(`socket error: ${error.message}`));
  socket.on("end", () => finish("peer closed the connection"));
  socket.on("close", () => finish("connection closed"));
  socket.resume();
  return conn;
}

/** Sends one frame-set on a Connection (convenience for encodeFrame). */
export function sendFrame(conn: Connection, frame: Partial<Frame> & { type: Frame["type"] }) {
  return conn.send(encodeFrame(frame));
}

/** The real network: TCP with TCP_NODELAY, optional source address, connect timeout. */
export const tcpNetwork: Network = {
  connect(options) {
    return new Promise((resolve, reject) => {
      const socket = net.connect({
        host: options.host,
        port: options.port,
        localAddress: options.sourceHost,
        noDelay: true,
      });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`Cannot connect to ${options.host}:${options.port}: timed out`));
      }, options.timeoutMs);
      socket.once("connect", () => {
        clearTimeout(timer);
        socket.removeAllListeners("error");
        resolve(socketConnection(socket));
      });
      socket.once("error", (error) => {
        clearTimeout(timer);
        socket.destroy();
        reject(new Error(`Cannot connect to ${options.host}:${options.port}: ${error.message}`));
      });
    });
  },
};
