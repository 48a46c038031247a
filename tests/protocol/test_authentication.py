"""Wegman–Carter authentication: GF(2^64) arithmetic, key pool, tamper detection."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from qkdlab.protocol.authentication import (
    AuthenticationError,
    AuthSession,
    KeyPool,
    KeyPoolExhaustedError,
    PolynomialHash,
    _horner,
    _shoup_tables,
    gf64_mul,
    gf64_mul_vec,
)
from qkdlab.protocol.channel import (
    AuthenticatedChannel,
    ClassicalChannel,
    InProcessChannel,
    Message,
)

MASK = (1 << 64) - 1


def rand64(rng: np.random.Generator, size: int) -> np.ndarray:
    return rng.integers(0, 2**63, size=size, dtype=np.uint64) * np.uint64(2) + rng.integers(
        0, 2, size=size, dtype=np.uint64
    )


def test_gf64_reference_properties() -> None:
    rng = np.random.default_rng(1)
    a, b, c = (int(v) for v in rand64(rng, 3))
    assert gf64_mul(a, 1) == a
    assert gf64_mul(a, 0) == 0
    assert gf64_mul(a, b) == gf64_mul(b, a)
    assert gf64_mul(a, b ^ c) == gf64_mul(a, b) ^ gf64_mul(a, c)
    assert gf64_mul(gf64_mul(a, b), c) == gf64_mul(a, gf64_mul(b, c))
    # x^64 = x^4 + x^3 + x + 1 (the modulus), and the Frobenius map a -> a^(2^64) is identity
    assert gf64_mul(1 << 63, 2) == 0x1B
    v = a
    for _ in range(64):
        v = gf64_mul(v, v)
    assert v == a


def test_vectorised_and_table_multiply_match_reference() -> None:
    rng = np.random.default_rng(2)
    a, b = rand64(rng, 300), rand64(rng, 300)
    prod = gf64_mul_vec(a, b)
    for x, y, p in zip(a, b, prod, strict=True):
        ref = gf64_mul(int(x), int(y))
        assert int(p) == ref
        assert int(_horner(np.array([x], np.uint64), _shoup_tables(int(y)))) == ref


def test_polynomial_hash_is_horner_with_length_word() -> None:
    rng = np.random.default_rng(3)
    key_bits = rng.integers(0, 2, 64, dtype=np.uint8)
    k = int(np.packbits(key_bits).view(">u8")[0])
    data = bytes(rng.integers(0, 256, 21, dtype=np.uint8))
    words = [int.from_bytes((data + b"\x00" * 3)[i : i + 8], "big") for i in range(0, 24, 8)]
    words.append(len(data))
    h = 0
    for w in words:
        h = gf64_mul(h ^ w, k)
    assert PolynomialHash(key_bits).digest(data) == h.to_bytes(8, "big")
    # appending a zero byte changes the length word, hence the hash
    assert PolynomialHash(key_bits).digest(data + b"\x00") != PolynomialHash(key_bits).digest(data)


def test_128_bit_tag_is_two_independent_halves() -> None:
    rng = np.random.default_rng(4)
    key = rng.integers(0, 2, 128, dtype=np.uint8)
    data = b"authenticate me"
    both = PolynomialHash(key).digest(data)
    assert both == PolynomialHash(key[:64]).digest(data) + PolynomialHash(key[64:]).digest(data)
    assert PolynomialHash(key).collision_bound(80) == pytest.approx((11 / 2**64) ** 2)
    with pytest.raises(ValueError, match="64 or 128"):
        PolynomialHash(key[:32])


def test_key_pool_consumption_and_replenish() -> None:
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2, 1000, dtype=np.uint8)
    pool = KeyPool(bits)
    assert np.array_equal(pool.take(100), bits[:100])
    assert (pool.available, pool.consumed) == (900, 100)
    with pytest.raises(KeyPoolExhaustedError, match="need 1000 bits, 900 left"):
        pool.take(1000)
    assert pool.available == 900  # a failed take consumes nothing
    extra = rng.integers(0, 2, 200, dtype=np.uint8)
    pool.replenish(extra)
    out = pool.take(1100)
    assert np.array_equal(out, np.concatenate([bits[100:], extra]))
    assert "available" in repr(pool)
    assert "1" not in repr(pool).split("(")[0]


def test_sessions_draw_identical_pads_whatever_the_interleaving() -> None:
    rng = np.random.default_rng(6)
    bits = rng.integers(0, 2, 20_000, dtype=np.uint8)
    a = AuthSession(KeyPool(bits), round_messages=4)
    b = AuthSession(KeyPool(bits), round_messages=4)
    # a makes tags for direction 0 first, then 1; b in the opposite order
    tags_a = [a.tag(b"m", 0, s) for s in range(10)] + [a.tag(b"m", 1, s) for s in range(3)]
    tags_b1 = [b.tag(b"m", 1, s) for s in range(3)]
    tags_b0 = [b.tag(b"m", 0, s) for s in range(10)]
    assert tags_a == tags_b0 + tags_b1
    # rounds of 4 messages x 2 directions x 64 bits, three rounds drawn, plus the hash key
    assert a.bits_drawn == b.bits_drawn == 64 + 3 * 2 * 4 * 64
    assert a.bits_used == 64 * (1 + 13)


def make_pair(
    pool_bits: int = 50_000, seed: int = 7, tap: Callable[[bytes], list[bytes]] | None = None
) -> tuple[AuthenticatedChannel, AuthenticatedChannel, list[bytes]]:
    """Alice/Bob authenticated ends; frames Alice sends are recorded (and may be rewritten)."""
    bits = np.random.default_rng(seed).integers(0, 2, pool_bits, dtype=np.uint8)
    a_raw, b_raw = InProcessChannel.pair(timeout=2.0)
    sent: list[bytes] = []

    class Tap(ClassicalChannel):
        def send_frame(self, frame: bytes) -> None:
            sent.append(frame)
            for f in tap(frame) if tap else [frame]:
                a_raw.send_frame(f)

        def recv_frame(self, timeout: float | None = None) -> bytes:
            return a_raw.recv_frame(timeout)

    alice = AuthenticatedChannel(Tap(), AuthSession(KeyPool(bits)), local_id="alice",
                                 peer_id="bob")
    bob = AuthenticatedChannel(b_raw, AuthSession(KeyPool(bits)), local_id="bob",
                               peer_id="alice")
    return alice, bob, sent


def parities(i: int) -> Message:
    return Message("cascade/parities", parity=np.arange(i, i + 16, dtype=np.uint8), count=i)


def test_authenticated_round_trip() -> None:
    alice, bob, _ = make_pair()
    for i in range(40):
        alice.send(parities(i))
        got = bob.recv()
        assert got.get_int("count") == i
        assert "_seq" not in got.fields
        bob.send(Message("ack", i=i))
        assert alice.recv().get_int("i") == i
    assert alice.messages_sent == bob.messages_received == 40
    assert alice.session.bits_drawn == bob.session.bits_drawn


def test_flipped_bit_in_payload_is_a_tag_mismatch() -> None:
    def flip(frame: bytes) -> list[bytes]:
        data = bytearray(frame)
        data[-12] ^= 0x01  # inside the array body, before the 8-byte tag
        return [bytes(data)]

    alice, bob, _ = make_pair(tap=flip)
    alice.send(parities(1))
    with pytest.raises(AuthenticationError, match="tag mismatch on message 0"):
        bob.recv()
    with pytest.raises(AuthenticationError, match="unusable after authentication failure"):
        bob.recv()


def test_every_single_bit_flip_is_rejected() -> None:
    alice, _, sent = make_pair()
    alice.send(Message("x", v=3, a=np.arange(4, dtype=np.uint8)))
    frame = sent[0]
    bits = np.random.default_rng(8).integers(0, 2, 50_000, dtype=np.uint8)
    for pos in range(8 * len(frame)):
        data = bytearray(frame)
        data[pos // 8] ^= 0x80 >> (pos % 8)
        a_raw, b_raw = InProcessChannel.pair(timeout=1.0)
        bob = AuthenticatedChannel(b_raw, AuthSession(KeyPool(bits)), local_id="bob",
                                   peer_id="alice")
        a_raw.send_frame(bytes(data))
        with pytest.raises(AuthenticationError):
            bob.recv()


def test_replay_is_detected() -> None:
    alice, bob, sent = make_pair()
    alice.send(parities(1))
    bob.recv()
    alice.inner.send_frame(sent[0])  # the attacker re-injects the recorded frame
    with pytest.raises(AuthenticationError, match="replayed message: sequence number 0"):
        bob.recv()


def test_dropped_message_is_detected() -> None:
    def drop_first(frame: bytes, state: list[int] = [0]) -> list[bytes]:  # noqa: B006
        state[0] += 1
        return [] if state[0] == 1 else [frame]

    alice, bob, _ = make_pair(tap=drop_first)
    alice.send(parities(1))
    alice.send(parities(2))
    with pytest.raises(AuthenticationError, match="lost or reordered: got sequence number 1"):
        bob.recv()


def test_reordered_messages_are_detected() -> None:
    held: list[bytes] = []

    def swap(frame: bytes) -> list[bytes]:
        if not held:
            held.append(frame)
            return []
        return [frame, held.pop()]

    alice, bob, _ = make_pair(tap=swap)
    alice.send(parities(1))
    alice.send(parities(2))
    with pytest.raises(AuthenticationError, match="expected 0"):
        bob.recv()


def test_reflected_message_is_detected() -> None:
    alice, bob, sent = make_pair()
    alice.send(parities(1))
    bob.recv()
    # the attacker sends Alice's own frame back to her
    bob.inner.send_frame(sent[0])
    with pytest.raises(AuthenticationError, match="claims sender 'alice'"):
        alice.recv()


def test_forgery_without_the_key_fails() -> None:
    _alice, bob, _ = make_pair(seed=9)
    eve_bits = np.random.default_rng(10).integers(0, 2, 50_000, dtype=np.uint8)
    eve_raw, _ = InProcessChannel.pair()
    eve = AuthenticatedChannel(eve_raw, AuthSession(KeyPool(eve_bits)), local_id="alice",
                               peer_id="bob")
    eve.send(parities(1))
    forged = eve_raw._outbox.get()
    bob.inner._inbox.put(forged)  # type: ignore[attr-defined]
    with pytest.raises(AuthenticationError, match="tag mismatch"):
        bob.recv()


def test_pools_out_of_step_are_reported() -> None:
    bits = np.random.default_rng(11).integers(0, 2, 10_000, dtype=np.uint8)
    a_raw, b_raw = InProcessChannel.pair()
    pool_b = KeyPool(bits)
    pool_b.take(64)  # Bob's pool is one session ahead
    alice = AuthenticatedChannel(a_raw, AuthSession(KeyPool(bits)), local_id="alice",
                                 peer_id="bob")
    bob = AuthenticatedChannel(b_raw, AuthSession(pool_b), local_id="bob", peer_id="alice")
    alice.send(parities(1))
    with pytest.raises(AuthenticationError, match="key pools out of step"):
        bob.recv()


def test_exhausted_pool_stops_sending() -> None:
    alice, _, _ = make_pair(pool_bits=64 + 2 * 16 * 64)
    for i in range(16):
        alice.send(parities(i))
    with pytest.raises(KeyPoolExhaustedError):
        alice.send(parities(16))
