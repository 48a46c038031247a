"""Wegman–Carter authentication of classical messages with a pre-shared key pool.

A tag is ``h_k(m) XOR r`` (Wegman & Carter, J. Comput. Syst. Sci. 22, 265 (1981)):

* ``h_k`` is the polynomial hash over GF(2^64), modulus x^64 + x^4 + x^3 + x + 1:
  the message is cut into 64-bit words m_1..m_L (big-endian, zero-padded) followed by its
  length in bytes m_{L+1}, and h_k(m) = Σ_i m_i k^(L+2-i), evaluated by Horner's rule.
  Two different messages of at most L words collide for at most L+1 of the 2^64 keys,
  so the family is ε-almost-XOR-universal with ε = (L+1)/2^64 (den Boer 1993; Bierbrauer
  et al., CRYPTO '93).  A 128-bit tag concatenates two hashes with independent keys,
  ε = ((L+1)/2^64)^2.
* ``r`` is a fresh one-time pad of ``tag_bits`` key bits per message, so the hash key may
  be reused for every message of a session while each forgery attempt still succeeds with
  probability at most ε (Wegman–Carter; Portmann, IEEE TIT 60, 4383 (2014) for the
  composable statement).

Key consumption: ``tag_bits`` for the hash key once per session plus ``tag_bits`` of pad
per message; pad slots are drawn from the pool in rounds (see :class:`AuthSession`) so both
ends consume the pool identically without coordination.  :attr:`AuthSession.bits_drawn` is
what the key rate must subtract.
"""

from __future__ import annotations

import numba
import numpy as np
import numpy.typing as npt

from qkdlab.protocol.bits import Bits, as_bits

GF64_REDUCTION = 0x1B
"""Low part of the GF(2^64) modulus x^64 + x^4 + x^3 + x + 1."""

_MASK64 = (1 << 64) - 1


class AuthenticationError(Exception):
    """A message failed authentication (tampered, forged, replayed, reordered or lost)."""


class KeyPoolExhaustedError(AuthenticationError):
    """The pre-shared key pool holds fewer bits than an authentication step needs."""


def gf64_mul(a: int, b: int) -> int:
    """Reference product of two GF(2^64) elements (bitwise; slow, for tests and set-up)."""
    result = 0
    for i in range(64):
        if (b >> i) & 1:
            result ^= a << i
    for i in range(126, 63, -1):  # reduce x^i = x^(i-64) * (x^4 + x^3 + x + 1)
        if (result >> i) & 1:
            result ^= (1 << i) | (GF64_REDUCTION << (i - 64))
    return result & _MASK64


def gf64_mul_vec(
    a: npt.NDArray[np.uint64], b: npt.NDArray[np.uint64]
) -> npt.NDArray[np.uint64]:
    """Element-wise GF(2^64) product of two uint64 arrays (vectorised carry-less multiply).

    The 128-bit carry-less product is built from 64 masked shifts, then reduced twice
    with x^64 ≡ x^4 + x^3 + x + 1.
    """
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    lo = np.zeros(np.broadcast(a, b).shape, dtype=np.uint64)
    hi = np.zeros_like(lo)
    one = np.uint64(1)
    for i in range(64):
        mask = np.uint64(0) - ((b >> np.uint64(i)) & one)  # all ones where bit i of b is set
        lo ^= (a << np.uint64(i)) & mask
        if i:
            hi ^= (a >> np.uint64(64 - i)) & mask
    return _reduce128(hi, lo)


def _reduce128(
    hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64]
) -> npt.NDArray[np.uint64]:
    """hi·x^64 + lo modulo x^64 + x^4 + x^3 + x + 1."""
    s1, s3, s4 = np.uint64(1), np.uint64(3), np.uint64(4)
    over = (hi >> np.uint64(63)) ^ (hi >> np.uint64(61)) ^ (hi >> np.uint64(60))
    hi = hi ^ over
    return lo ^ hi ^ (hi << s1) ^ (hi << s3) ^ (hi << s4)


def _shoup_tables(key: int) -> npt.NDArray[np.uint64]:
    """Tables T[j, b] = (b · x^(8j)) · key for the 8 bytes j of a multiplicand (Shoup 1996)."""
    powers = np.empty(64, dtype=np.uint64)  # key · x^i
    v = key
    for i in range(64):
        powers[i] = v
        v = ((v << 1) & _MASK64) ^ (GF64_REDUCTION if v >> 63 else 0)
    tables = np.zeros((8, 256), dtype=np.uint64)
    for j in range(8):
        for t in range(8):
            size = 1 << t
            tables[j, size : 2 * size] = tables[j, :size] ^ powers[8 * j + t]
    return tables


@numba.njit(cache=True, nogil=True)
def _horner(words: npt.NDArray[np.uint64], tables: npt.NDArray[np.uint64]) -> np.uint64:
    """h = Σ m_i k^(L+1-i) by Horner's rule, multiplying by k through the byte tables."""
    h = np.uint64(0)
    byte = np.uint64(0xFF)
    for w in words:
        a = h ^ w
        r = np.uint64(0)
        for j in range(8):
            r ^= tables[j, (a >> np.uint64(8 * j)) & byte]
        h = r
    return h


class PolynomialHash:
    """Polynomial universal hash over GF(2^64) with a fixed key (one ``tag_bits``/64 parts).

    ``digest(data)`` returns the ``tag_bits``-bit hash of ``data`` as bytes (big-endian).
    The key is never exposed by ``repr``.
    """

    def __init__(self, key_bits: Bits) -> None:
        key_bits = as_bits(key_bits)
        if key_bits.size not in (64, 128):
            raise ValueError(f"hash key must be 64 or 128 bits, got {key_bits.size}")
        words = np.packbits(key_bits).view(">u8")
        self.tag_bits = int(key_bits.size)
        self._tables = [_shoup_tables(int(w)) for w in words]

    def __repr__(self) -> str:
        return f"PolynomialHash(tag_bits={self.tag_bits})"

    def digest(self, data: bytes) -> bytes:
        """Hash of ``data``: Horner over its 64-bit words followed by its byte length."""
        n = len(data)
        full = n // 8
        words = np.empty(-(-n // 8) + 1, dtype=np.uint64)
        words[:full] = np.frombuffer(data, dtype=">u8", count=full)  # no copy of the data
        if n % 8:
            words[full] = int.from_bytes(bytes(data[8 * full :]).ljust(8, b"\x00"), "big")
        words[-1] = n
        if len(self._tables) == 1:
            return int(_horner(words, self._tables[0])).to_bytes(8, "big")
        return b"".join(int(_horner(words, t)).to_bytes(8, "big") for t in self._tables)

    def collision_bound(self, n_bytes: int) -> float:
        """ε = ((L+1)/2^64)^(tag_bits/64) for messages of at most ``n_bytes`` bytes."""
        words = (n_bytes + 7) // 8 + 1
        return float((words / 2.0**64) ** (self.tag_bits // 64))


class KeyPool:
    """Pre-shared secret bits, consumed front to back; Alice and Bob hold identical copies.

    ``take`` removes bits for good (a one-time pad is never reused); ``replenish`` appends
    fresh key (e.g. from the key store) at the end.  ``consumed`` counts every bit ever
    taken, the absolute position of the next bit in the pool's stream.
    """

    def __init__(self, bits: Bits | None = None) -> None:
        self._bits: Bits = as_bits(bits).copy() if bits is not None else np.zeros(0, np.uint8)
        self._pos = 0
        self._consumed = 0

    def __repr__(self) -> str:
        return f"KeyPool(available={self.available}, consumed={self.consumed})"

    @property
    def available(self) -> int:
        """Bits left in the pool."""
        return int(self._bits.size - self._pos)

    @property
    def consumed(self) -> int:
        """Bits taken since the pool was created (absolute stream position)."""
        return self._consumed

    def take(self, n: int) -> Bits:
        """Remove and return the next ``n`` bits.

        Raises:
            KeyPoolExhaustedError: fewer than ``n`` bits are left (nothing is taken then).
        """
        if n < 0:
            raise ValueError(f"cannot take {n} bits")
        if n > self.available:
            raise KeyPoolExhaustedError(
                f"authentication key pool exhausted: need {n} bits, {self.available} left"
            )
        out = self._bits[self._pos : self._pos + n].copy()
        self._pos += n
        self._consumed += n
        if self._pos > (1 << 16) and self._pos * 2 > self._bits.size:
            self._bits = self._bits[self._pos :].copy()  # compact, dropping used bits
            self._pos = 0
        return out

    def replenish(self, bits: Bits) -> None:
        """Append fresh shared key bits at the end of the pool."""
        self._bits = np.concatenate([self._bits[self._pos :], as_bits(bits)])
        self._pos = 0


class AuthSession:
    """One authenticated conversation between two parties over one key pool.

    At creation both ends take the hash key (``tag_bits`` bits) from their identical pools.
    The one-time pad of message ``seq`` sent in direction ``d`` (0 or 1) lives in *round*
    ``r = seq // round_messages``; a round is ``2 · round_messages · tag_bits`` consecutive
    pool bits holding direction 0's slots then direction 1's.  Each end draws rounds in
    increasing order when it first needs one, so both ends take the same bits in the same
    order whatever the interleaving of messages; pad slots of a round left unused by the
    quieter direction are burnt (counted in :attr:`bits_drawn`).
    """

    def __init__(self, pool: KeyPool, *, tag_bits: int = 64, round_messages: int = 16) -> None:
        if tag_bits not in (64, 128):
            raise ValueError(f"tag_bits must be 64 or 128, got {tag_bits}")
        if round_messages < 1:
            raise ValueError("round_messages must be >= 1")
        self.tag_bits = tag_bits
        self.round_messages = round_messages
        self._pool = pool
        self.key_offset = pool.consumed
        """Absolute pool position of this session's hash key (authenticated in every
        message, so ends whose pools are out of step fail loudly)."""
        self._hash = PolynomialHash(pool.take(tag_bits))
        self._rounds: dict[int, npt.NDArray[np.uint8]] = {}
        self._next_round = 0
        self.bits_drawn = tag_bits
        """Pool bits consumed by this session (hash key + every drawn round)."""
        self.tags_made = 0
        self.tags_checked = 0

    def __repr__(self) -> str:
        return (
            f"AuthSession(tag_bits={self.tag_bits}, key_offset={self.key_offset}, "
            f"bits_drawn={self.bits_drawn})"
        )

    @property
    def bits_used(self) -> int:
        """Key bits actually used: hash key plus one pad per tag made or checked."""
        return self.tag_bits * (1 + self.tags_made + self.tags_checked)

    def _pad(self, direction: int, seq: int) -> bytes:
        if direction not in (0, 1) or seq < 0:
            raise ValueError("bad pad slot")
        r, slot = divmod(seq, self.round_messages)
        while self._next_round <= r:
            n = 2 * self.round_messages * self.tag_bits
            self._rounds[self._next_round] = np.packbits(self._pool.take(n))
            self.bits_drawn += n
            self._next_round += 1
        if r not in self._rounds:
            raise AuthenticationError(f"one-time pad of message {seq} already discarded")
        nbytes = self.tag_bits // 8
        start = (direction * self.round_messages + slot) * nbytes
        return self._rounds[r][start : start + nbytes].tobytes()

    def forget_before(self, seq_0: int, seq_1: int) -> None:
        """Drop pad rounds no longer needed once both directions reached these sequence numbers."""
        keep_from = min(seq_0, seq_1) // self.round_messages
        for r in [r for r in self._rounds if r < keep_from]:
            del self._rounds[r]

    def tag(self, data: bytes, direction: int, seq: int) -> bytes:
        """Wegman–Carter tag of ``data`` sent as message ``seq`` in ``direction``."""
        pad = self._pad(direction, seq)
        self.tags_made += 1
        return _xor(self._hash.digest(data), pad)

    def check(self, data: bytes, tag: bytes, direction: int, seq: int) -> bool:
        """True iff ``tag`` is the tag of ``data`` as message ``seq`` in ``direction``."""
        pad = self._pad(direction, seq)
        self.tags_checked += 1
        return _constant_time_equal(_xor(self._hash.digest(data), pad), tag)

    def forgery_bound(self, n_bytes: int) -> float:
        """Probability that one forged message of ≤ ``n_bytes`` bytes is accepted."""
        return self._hash.collision_bound(n_bytes)


def _xor(a: bytes, b: bytes) -> bytes:
    """Byte-wise XOR of two equal-length byte strings."""
    if len(a) != len(b):
        raise ValueError("XOR of byte strings of different lengths")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _constant_time_equal(a: bytes, b: bytes) -> bool:
    import hmac

    return hmac.compare_digest(a, b)
