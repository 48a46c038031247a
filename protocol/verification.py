"""Error verification: do Alice's and Bob's corrected keys agree?

Alice draws a fresh hash key k (``tag_bits`` = 64 or 128 bits) after reconciliation has
fixed both keys, sends k and h_k(x_A) over the authenticated channel; Bob compares with
h_k(x_B) and answers.  h is the GF(2^64) polynomial hash of
:mod:`qkdlab.protocol.authentication` over the packed key (length appended), so for
x_A ≠ x_B

    P[h_k(x_A) = h_k(x_B)] ≤ ε_cor = ((L + 1) / 2^64)^(tag_bits/64),  L = ⌈n / 64⌉

(the key is fixed before k is drawn; polynomial-hash collision bound, den Boer 1993).
E.g. n = 10^6, 64-bit: ε_cor ≤ 2^-50; 128-bit: ≤ 2^-100.  The exchange reveals
``tag_bits`` bits about x_A: the finite-key term log2(2/ε_cor) of Lim et al. (2014)
accounts for it when tag_bits ≤ log2(2/ε_cor); pass any excess in λ_EC
(:attr:`VerificationResult.leaked_bits`).  On mismatch both sides must abort the frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qkdlab.protocol.authentication import PolynomialHash
from qkdlab.protocol.bits import Bits, as_bits
from qkdlab.protocol.channel import ClassicalChannel, Message, ProtocolError


class VerificationError(Exception):
    """The corrected keys differ: the frame must be discarded."""


@dataclass(frozen=True)
class VerificationResult:
    """Outcome of one verification (no key material)."""

    match: bool
    n: int
    tag_bits: int
    epsilon_cor: float

    @property
    def leaked_bits(self) -> int:
        """Bits of information the hash value disclosed about Alice's key."""
        return self.tag_bits


def correctness_bound(n: int, tag_bits: int = 64) -> float:
    """ε_cor = ((⌈n/64⌉ + 1) / 2^64)^(tag_bits/64) for an n-bit key."""
    words = math.ceil(n / 64) + 1
    return float((words / 2.0**64) ** (tag_bits // 64))


def _digest(key: Bits, hash_key: Bits) -> bytes:
    return PolynomialHash(hash_key).digest(np.packbits(key).tobytes())


def verify_alice(
    channel: ClassicalChannel,
    key: Bits,
    rng: np.random.Generator,
    *,
    tag_bits: int = 64,
    timeout: float | None = None,
    raise_on_mismatch: bool = True,
) -> VerificationResult:
    """Alice's side: send a fresh hash key and her key's hash; receive Bob's verdict."""
    key = as_bits(key)
    if tag_bits not in (64, 128):
        raise ValueError("tag_bits must be 64 or 128")
    hash_key = rng.integers(0, 2, size=tag_bits, dtype=np.uint8)
    digest = np.frombuffer(_digest(key, hash_key), dtype=np.uint8)
    reply = channel.request(
        Message("verify/hash", n=int(key.size), hash_key=np.packbits(hash_key), digest=digest),
        timeout,
    ).expect("verify/result")
    result = VerificationResult(
        bool(reply.get_int("match")), int(key.size), tag_bits,
        correctness_bound(key.size, tag_bits),
    )
    if raise_on_mismatch and not result.match:
        raise VerificationError("Bob's corrected key differs from Alice's: frame discarded")
    return result


def verify_bob(
    channel: ClassicalChannel,
    key: Bits,
    *,
    timeout: float | None = None,
    raise_on_mismatch: bool = True,
) -> VerificationResult:
    """Bob's side: receive Alice's hash key and hash, compare, send the verdict."""
    key = as_bits(key)
    msg = channel.recv(timeout).expect("verify/hash")
    n = msg.get_int("n")
    packed = msg.get_array("hash_key", np.uint8)
    if packed.size not in (8, 16):
        raise ProtocolError("verification hash key must be 64 or 128 bits")
    tag_bits = 8 * packed.size
    digest = msg.get_array("digest", np.uint8).tobytes()
    match = n == key.size and digest == _digest(key, np.unpackbits(packed))
    channel.send(Message("verify/result", match=int(match)))
    result = VerificationResult(
        match, int(key.size), tag_bits, correctness_bound(key.size, tag_bits)
    )
    if raise_on_mismatch and not match:
        raise VerificationError("Bob's corrected key differs from Alice's: frame discarded")
    return result
