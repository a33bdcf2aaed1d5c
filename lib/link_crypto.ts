/**
 * Encryption of the replication link (`encryption aes-256-gcm`; spec §12). After the authkey
 * exchange (auth.ts) both sides derive two keys, one per direction, from the authkey and the
 * exchange's two fresh nonces:
 *
 *   key(direction) = HKDF-SHA256(ikm = authkey, salt = primaryNonce ‖ secondaryNonce ‖ helloDigest,
 *                                info = "hast-link-1 <direction> <resource>", 32 bytes)
 *
 * and from then on every byte in each direction travels in sealed records:
 *
 *   offset size field
 *        0    4 plaintextBytes  big-endian, 1 … RECORD_MAX_BYTES; also the record's AAD
 *        4    n ciphertext      AES-256-GCM of the plaintext
 *      4+n   16 tag
 *
 * The nonce of a record is its number in its direction (96 bits, big-endian, from 0), so a
 * record that is dropped, repeated or moved fails to open, as does any changed bit. A record
 * is opened whole and its tag checked before a byte of it reaches the frame parser: nothing
 * unauthenticated is ever acted on. Fresh nonces on every connection give fresh keys, so a
 * recorded connection cannot be replayed into another.
 */
import { createCipheriv, createDecipheriv, hkdfSync } from "node:crypto";
import { ProtocolError, WIRE_MAGIC } from "./wire.ts";

/** Largest plaintext of one record: a 1 MiB payload with its header fits, as do coalesced small frames. */
export const RECORD_MAX_BYTES = 2 * 1024 * 1024;
const LENGTH_BYTES = 4;
const TAG_BYTES = 16;
const NONCE_BYTES = 12;
const ALGORITHM = "aes-256-gcm";

/** The two keys of one side of a connection. */
export interface LinkKeys {
  send: Buffer;
  receive: Buffer;
}

/** Derives the keys of `role`'s side; the other side derives the same two, swapped. */
export function deriveLinkKeys(
  authkey: Buffer, resource: string, primaryNonce: Buffer, secondaryNonce: Buffer, role: "primary" | "secondary",
  helloDigest: Buffer,
): LinkKeys {
  const salt = Buffer.concat([primaryNonce, secondaryNonce, helloDigest]);
  const key = (direction: string) =>
    Buffer.from(hkdfSync("sha256", authkey, salt, `hast-link-1 ${direction} ${resource}`, 32));
  const toSecondary = key("primary-to-secondary");
  const toPrimary = key("secondary-to-primary");
  return role === "primary" ? { send: toSecondary, receive: toPrimary } : { send: toPrimary, receive: toSecondary };
}

function nonceOf(counter: bigint): Buffer {
  const nonce = Buffer.alloc(NONCE_BYTES);
  nonce.writeBigUInt64BE(counter, NONCE_BYTES - 8);
  return nonce;
}

/** Seals one direction's records, numbering them from 0. */
export class Sealer {
  private counter = 0n;

  constructor(private readonly key: Buffer) {}

  /** The record of `plaintext` as [length, ciphertext, tag]: write them in this order. */
  seal(plaintext: Uint8Array): Buffer[] {
    if (plaintext.byteLength === 0 || plaintext.byteLength > RECORD_MAX_BYTES) {
      throw new RangeError(`Cannot seal ${plaintext.byteLength} bytes: a record holds 1 to ${RECORD_MAX_BYTES}`);
    }
    const length = Buffer.alloc(LENGTH_BYTES);
    length.writeUInt32BE(plaintext.byteLength);
    const cipher = createCipheriv(ALGORITHM, this.key, nonceOf(this.counter++));
    cipher.setAAD(length);
    const body = cipher.update(plaintext);
    cipher.final();
    return [length, body, cipher.getAuthTag()];
  }
}

/**
 * Opens one direction's records from a byte stream in chunks of any size, and hands each
 * record's plaintext to `onPlaintext` once its tag is checked.
 */
export class Opener {
  private counter = 0n;
  private readonly lengthBuf = Buffer.alloc(LENGTH_BYTES);
  private lengthFill = 0;
  /** Ciphertext and tag of the record being received, allocated once its length is known. */
  private record: Buffer | null = null;
  private recordFill = 0;

  constructor(private readonly key: Buffer, private readonly onPlaintext: (plaintext: Uint8Array) => void) {}

  /** @throws ProtocolError on a record that is too large or does not open */
  push(chunk: Uint8Array): void {
    let at = 0;
    while (at < chunk.byteLength) {
      if (this.record === null) {
        const take = Math.min(LENGTH_BYTES - this.lengthFill, chunk.byteLength - at);
        this.lengthBuf.set(chunk.subarray(at, at + take), this.lengthFill);
        this.lengthFill += take;
        at += take;
        if (this.lengthFill < LENGTH_BYTES) return;
        const bytes = this.lengthBuf.readUInt32BE(0);
        if (bytes === 0 || bytes > RECORD_MAX_BYTES) {
          const unsealed = bytes === WIRE_MAGIC ? ": the peer sends unsealed frames (a hast without encryption?)" : "";
          throw new ProtocolError(
            `Cannot decrypt: record of ${bytes} bytes (1 to ${RECORD_MAX_BYTES} allowed)${unsealed}`);
        }
        this.record = Buffer.allocUnsafe(bytes + TAG_BYTES);
        this.recordFill = 0;
        continue;
      }
      const take = Math.min(this.record.byteLength - this.recordFill, chunk.byteLength - at);
      this.record.set(chunk.subarray(at, at + take), this.recordFill);
      this.recordFill += take;
      at += take;
      if (this.recordFill === this.record.byteLength) this.open();
    }
  }

  /** True when no part of a record is held (a connection may end here cleanly). */
  get idle(): boolean {
    return this.record === null && this.lengthFill === 0;
  }

  private open(): void {
    const record = this.record!;
    this.record = null;
    this.lengthFill = 0;
    const bodyBytes = record.byteLength - TAG_BYTES;
    const decipher = createDecipheriv(ALGORITHM, this.key, nonceOf(this.counter++));
    decipher.setAAD(this.lengthBuf);
    decipher.setAuthTag(record.subarray(bodyBytes));
    let plaintext: Buffer;
    try {
      plaintext = decipher.update(record.subarray(0, bodyBytes));
      decipher.final();
    } catch {
      throw new ProtocolError(`Cannot decrypt record ${this.counter - 1n}: it was changed on the way ` +
        "or sealed with another key");
    }
    this.onPlaintext(plaintext);
  }
}
