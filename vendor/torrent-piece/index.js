/*! torrent-piece. MIT License. WebTorrent LLC <https://webtorrent.io/opensource> */
// cowherd: vendored with the changes listed in CHANGES.md (64 KiB blocks; blocks copied into one buffer per piece;
// piece buffers recycled).

// cowherd: 64 KiB instead of 16 KiB. webtorrent serves requests of up to 128 KiB, and every peer of a cowherd
// swarm is a cowherd agent: a quarter of the messages, request scans and callbacks per byte.
const BLOCK_LENGTH = 1 << 16

// cowherd: piece buffers the chunk store is done with, by length, for the next pieces. A buffer that lives as long
// as a piece takes to arrive outlives V8's young generation, and as garbage only a full GC frees it; recycled, it
// is never garbage. Only buffers made here are taken back, each at most once until it is handed out again.
const MAX_POOLED_BYTES = 64 * 1024 * 1024
const pool = new Map()
const owned = new WeakSet()
const pooled = new WeakSet()
let pooledBytes = 0

function acquire (length) {
  const free = pool.get(length)
  if (free && free.length > 0) {
    const buffer = free.pop()
    pooled.delete(buffer)
    pooledBytes -= length
    return buffer
  }
  const buffer = new Uint8Array(length)
  owned.add(buffer)
  return buffer
}

export default class Piece {
  constructor (length) {
    this.length = length
    this.missing = length
    this.sources = null

    this._chunks = Math.ceil(length / BLOCK_LENGTH)
    this._remainder = (length % BLOCK_LENGTH) || BLOCK_LENGTH
    this._buffered = 0
    this._buffer = null // cowherd: the piece's bytes, allocated with its first block
    this._have = null // cowherd: which blocks are in _buffer
    this._cancellations = null
    this._reservations = 0
    this._flushed = false
  }

  chunkLength (i) {
    return i === this._chunks - 1 ? this._remainder : BLOCK_LENGTH
  }

  chunkLengthRemaining (i) {
    return this.length - (i * BLOCK_LENGTH)
  }

  chunkOffset (i) {
    return i * BLOCK_LENGTH
  }

  reserve () {
    if (!this.init()) return -1
    if (this._cancellations.length) return this._cancellations.pop()
    if (this._reservations < this._chunks) return this._reservations++
    return -1
  }

  reserveRemaining () {
    if (!this.init()) return -1
    if (this._cancellations.length || this._reservations < this._chunks) {
      let min = this._reservations
      while (this._cancellations.length) {
        min = Math.min(min, this._cancellations.pop())
      }
      this._reservations = this._chunks
      return min
    }
    return -1
  }

  cancel (i) {
    if (!this.init()) return
    this._cancellations.push(i)
  }

  cancelRemaining (i) {
    if (!this.init()) return
    this._reservations = i
  }

  get (i) {
    if (!this.init() || !this._have[i]) return null
    return this._buffer.subarray(i * BLOCK_LENGTH, i * BLOCK_LENGTH + this.chunkLength(i))
  }

  // cowherd: each block is copied into the piece's buffer as it arrives, so the message buffers it came in die
  // young (upstream kept every block until the piece was complete and then concatenated them: the socket's read
  // buffers lived as long as the piece and were promoted to V8's old space, and only a full GC freed them).
  set (i, data, source) {
    if (!this.init()) return false
    const len = data.length
    const blocks = Math.ceil(len / BLOCK_LENGTH)
    for (let j = 0; j < blocks; j++) {
      if (!this._have[i + j]) {
        const offset = j * BLOCK_LENGTH
        const splitData = data.subarray(offset, offset + BLOCK_LENGTH)
        if (!this._buffer) this._buffer = acquire(this.length)
        this._buffer.set(splitData, (i + j) * BLOCK_LENGTH)
        this._have[i + j] = 1
        this._buffered++
        this.missing -= splitData.length
        if (!this.sources.includes(source)) {
          this.sources.push(source)
        }
      }
    }
    return this._buffered === this._chunks
  }

  flush () {
    if (!this._buffer || this._chunks !== this._buffered) return null
    const buffer = this._buffer
    this._buffer = null
    this._have = null
    this._cancellations = null
    this.sources = null
    this._flushed = true
    return buffer
  }

  init () {
    if (this._flushed) return false
    if (this._have) return true
    this._have = new Uint8Array(this._chunks)
    this._cancellations = []
    this.sources = []
    return true
  }
}

Piece.BLOCK_LENGTH = BLOCK_LENGTH

// cowherd: gives a flushed piece's buffer back once nothing reads it any more (the chunk store, after its write and
// everything else that used the bytes). Returns whether it was taken back.
Piece.release = function release (buffer) {
  if (!owned.has(buffer) || pooled.has(buffer) || pooledBytes + buffer.length > MAX_POOLED_BYTES) return false
  let free = pool.get(buffer.length)
  if (!free) pool.set(buffer.length, (free = []))
  free.push(buffer)
  pooled.add(buffer)
  pooledBytes += buffer.length
  return true
}
