"""From sifted bits to a secure key: Alice's and Bob's post-processing, message by message.

Each party runs its own function over a :class:`~qkdlab.protocol.channel.ClassicalChannel`
(in threads of one process, or in two processes over ZeroMQ); every message goes
through an :class:`~qkdlab.protocol.channel.AuthenticatedChannel`, so tampering, replay,
reordering or loss abort the block.  Steps:

1. basis reconciliation — Bob announces the pulses he kept and their bases, Alice
   confirms the match and tells him each pulse's intensity class;
2. parameter estimation — Bob discloses his test-basis (X) bits, Alice counts the
   errors per intensity; both hold the statistics of Lim et al. (2014);
3. abort if the test-basis QBER is above the threshold;
4. error correction of the key basis (Z) with Cascade, Alice answering Bob's parities;
5. verification by a universal hash (ε_cor);
6. the finite-key length ℓ (Lim et al. 2014) with λ_EC the bits actually disclosed;
7. privacy amplification to ℓ bits by Toeplitz hashing with Alice's seed.

Key consumption of the authentication is counted and paid back from the new key: the
first ``auth_key_used_bits`` of it refill the pool, the rest is the net key.  Keys are
never logged or printed.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from qkdlab.protocol.authentication import AuthSession, KeyPool
from qkdlab.protocol.bits import Bits, binary_entropy
from qkdlab.protocol.cascade import CascadeAlice, CascadeBob, CascadeParameters
from qkdlab.protocol.channel import (
    AuthenticatedChannel,
    ClassicalChannel,
    InProcessChannel,
    Message,
    ProtocolError,
)
from qkdlab.protocol.finite_key import DecoyStatistics, FiniteKeyResult, secure_key_length
from qkdlab.protocol.privacy_amplification import amplify_alice, amplify_bob
from qkdlab.protocol.verification import VerificationError, verify_alice, verify_bob

KEY_BASIS, TEST_BASIS = 0, 1  # Z makes the key, X estimates the phase error


@dataclass(frozen=True)
class PostProcessingParameters:
    """Security and protocol parameters shared by Alice and Bob.

    Attributes:
        intensities: (μ1, μ2, μ3) mean photon numbers (signal, decoy, weakest).
        probabilities: probabilities of the three classes.
        eps_sec, eps_cor: secrecy and correctness parameters.
        abort_qber: a test-basis QBER above this aborts (no key).
        frame_bits: Cascade frame length (bits).
        tag_bits: verification hash length (64 or 128).
        timeout_s: a peer silent this long aborts the block.
    """

    intensities: tuple[float, float, float]
    probabilities: tuple[float, float, float]
    eps_sec: float = 1e-9
    eps_cor: float = 1e-15
    abort_qber: float = 0.11
    frame_bits: int = 100_000
    tag_bits: int = 64
    timeout_s: float = 60.0


@dataclass(frozen=True)
class SiftedRecord:
    """One party's sifted bits: the pulse, basis and bit of each (intensity: Alice only)."""

    pulse: npt.NDArray[np.int64]
    basis: npt.NDArray[np.int8]
    bits: Bits
    intensity: npt.NDArray[np.int8] | None = None

    def __repr__(self) -> str:  # never show key material
        return f"SiftedRecord(n={self.bits.size})"


@dataclass
class KeyOutcome:
    """What one party ends a block with.  ``key`` is the net key (not in the repr)."""

    aborted: bool
    reason: str | None
    key: Bits | None = field(default=None, repr=False)
    sifted_key_bits: int = 0
    qber_test: float = math.nan
    qber_key: float = math.nan
    ec_disclosed_bits: int = 0
    ec_efficiency: float = math.nan
    verified: bool = False
    pa_input_bits: int = 0
    pa_output_bits: int = 0
    auth_key_used_bits: int = 0
    finite: FiniteKeyResult | None = field(default=None, repr=False)
    pool_refill: Bits | None = field(default=None, repr=False)
    released_key_bits: int = 0
    """Length of a key already stored and dropped from memory (:meth:`released`)."""

    @property
    def secure_key_bits(self) -> int:
        """Net key: the privacy-amplified key less the authentication key paid back."""
        return self.released_key_bits if self.key is None else int(self.key.size)

    def released(self) -> KeyOutcome:
        """This outcome without its key material (key and pool refill), for once both are
        stored: a long run keeps every block's figures, and no key in memory."""
        return replace(self, key=None, pool_refill=None,
                       released_key_bits=self.secure_key_bits)

    def summary(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {"aborted": self.aborted, "abort_reason": self.reason,
                "secure_key_bits": self.secure_key_bits,
                "sifted_key_bits": self.sifted_key_bits, "qber_test": num(self.qber_test),
                "qber_key": num(self.qber_key), "ec_disclosed_bits": self.ec_disclosed_bits,
                "ec_efficiency": num(self.ec_efficiency), "verified": self.verified,
                "pa_input_bits": self.pa_input_bits, "pa_output_bits": self.pa_output_bits,
                "auth_key_used_bits": self.auth_key_used_bits}


def _counts(intensity: npt.NDArray[np.int8], mask: npt.NDArray[np.bool_]) -> tuple[
        float, float, float]:
    c = np.bincount(intensity[mask].astype(np.int64), minlength=3)[:3]
    return (float(c[0]), float(c[1]), float(c[2]))


def _frames(bits: Bits, frame_bits: int) -> list[Bits]:
    n = bits.size
    if n == 0:
        return []
    count = max(1, math.ceil(n / frame_bits))
    return [np.ascontiguousarray(part) for part in np.array_split(bits, count)]


def _lambda_ec(disclosed: int, params: PostProcessingParameters) -> float:
    # verification reveals tag_bits; only the excess over log2(2/eps_cor) adds leakage
    return disclosed + max(0.0, params.tag_bits - math.log2(2 / params.eps_cor))


def alice(channel: ClassicalChannel, record: SiftedRecord, params: PostProcessingParameters,
          rng: np.random.Generator) -> KeyOutcome:
    """Alice's side of one block."""
    timeout = params.timeout_s
    if record.intensity is None:
        raise ValueError("Alice's record must carry the intensity class of each pulse")
    # 1. basis reconciliation
    msg = channel.recv(timeout).expect("sift/bob")
    pulses = msg.get_array("pulse", np.int64)
    bases = msg.get_array("basis", np.int8)
    if not (np.array_equal(pulses, record.pulse) and np.array_equal(bases, record.basis)):
        channel.send(Message("sift/alice", ok=0))
        return KeyOutcome(True, "basis reconciliation failed: Bob's kept pulses differ")
    channel.send(Message("sift/alice", ok=1, intensity=record.intensity))
    # 2. parameter estimation on the test basis
    test = record.basis == TEST_BASIS
    key = record.basis == KEY_BASIS
    msg = channel.recv(timeout).expect("pe/bob")
    bob_test = np.unpackbits(msg.get_array("bits", np.uint8), count=int(test.sum()))
    wrong = bob_test != record.bits[test]
    n_key, n_test = _counts(record.intensity, key), _counts(record.intensity, test)
    m_test = _counts(record.intensity[test], wrong)
    channel.send(Message("pe/stats", n_key=np.array(n_key), n_test=np.array(n_test),
                         m_test=np.array(m_test)))
    return _finish_alice(channel, record.bits[key], n_key, n_test, m_test, params, rng)


def _finish_alice(channel: ClassicalChannel, key_bits: Bits, n_key: tuple[float, ...],
                  n_test: tuple[float, ...], m_test: tuple[float, ...],
                  params: PostProcessingParameters, rng: np.random.Generator) -> KeyOutcome:
    timeout = params.timeout_s
    qber_test = sum(m_test) / sum(n_test) if sum(n_test) else math.nan
    out = KeyOutcome(False, None, sifted_key_bits=int(key_bits.size), qber_test=qber_test)
    if not qber_test <= params.abort_qber:
        out.aborted, out.reason = True, (
            f"test-basis QBER {qber_test:.2%} above the abort threshold {params.abort_qber:.1%}")
        return out
    # 4. error correction: answer Bob's parity queries until he is done
    cascade = CascadeAlice(_frames(key_bits, params.frame_bits), rng)
    out.ec_disclosed_bits = cascade.serve(channel, timeout)
    out.ec_efficiency = _efficiency(out.ec_disclosed_bits, key_bits.size, qber_test)
    # 5. verification
    try:
        out.verified = verify_alice(channel, key_bits, rng, tag_bits=params.tag_bits,
                                    timeout=timeout).match
    except VerificationError as err:
        out.aborted, out.reason = True, str(err)
        return out
    return _amplify(channel, key_bits, n_key, n_test, m_test, params, out, rng=rng)


def bob(channel: ClassicalChannel, record: SiftedRecord, params: PostProcessingParameters,
        qber_hint: float = 0.02) -> KeyOutcome:
    """Bob's side of one block."""
    timeout = params.timeout_s
    channel.send(Message("sift/bob", pulse=record.pulse, basis=record.basis))
    reply = channel.recv(timeout).expect("sift/alice")
    if not reply.get_int("ok"):
        return KeyOutcome(True, "basis reconciliation failed: Bob's kept pulses differ")
    intensity = reply.get_array("intensity", np.int8)
    test = record.basis == TEST_BASIS
    key = record.basis == KEY_BASIS
    channel.send(Message("pe/bob", bits=np.packbits(record.bits[test])))
    stats = channel.recv(timeout).expect("pe/stats")
    n_key = tuple(float(x) for x in stats.get_array("n_key", np.float64))
    n_test = tuple(float(x) for x in stats.get_array("n_test", np.float64))
    m_test = tuple(float(x) for x in stats.get_array("m_test", np.float64))
    if n_key != _counts(intensity, key):
        raise ProtocolError("Alice's key-basis counts disagree with the sifting")
    key_bits = record.bits[key]
    qber_test = sum(m_test) / sum(n_test) if sum(n_test) else math.nan
    out = KeyOutcome(False, None, sifted_key_bits=int(key_bits.size), qber_test=qber_test)
    if not qber_test <= params.abort_qber:
        out.aborted, out.reason = True, (
            f"test-basis QBER {qber_test:.2%} above the abort threshold {params.abort_qber:.1%}")
        return out
    frames = _frames(key_bits, params.frame_bits)
    estimate = qber_test if qber_test > 0 else qber_hint
    cascade_params = CascadeParameters.for_qber(max(estimate, 1e-3), max(f.size for f in frames))
    results = CascadeBob(frames, estimate, cascade_params).run(channel, timeout)
    corrected = np.concatenate([r.key for r in results])
    out.ec_disclosed_bits = sum(r.disclosed_bits for r in results)
    out.qber_key = sum(r.corrected_bits for r in results) / max(1, key_bits.size)
    out.ec_efficiency = _efficiency(out.ec_disclosed_bits, key_bits.size, out.qber_key)
    try:
        out.verified = verify_bob(channel, corrected, timeout=timeout).match
    except VerificationError as err:
        out.aborted, out.reason = True, str(err)
        return out
    return _amplify(channel, corrected, n_key, n_test, m_test, params, out, rng=None)


def _efficiency(disclosed: int, n: int, qber: float) -> float:
    h = binary_entropy(min(max(qber, 0.0), 0.5)) if math.isfinite(qber) else 0.0
    return disclosed / (n * h) if n and h > 0 else math.nan


def _amplify(channel: ClassicalChannel, key_bits: Bits, n_key: tuple[float, ...],
             n_test: tuple[float, ...], m_test: tuple[float, ...],
             params: PostProcessingParameters, out: KeyOutcome,
             rng: np.random.Generator | None) -> KeyOutcome:
    """Finite-key length, privacy amplification, and the authentication key paid back."""
    stats = DecoyStatistics(n_x=(n_key[0], n_key[1], n_key[2]),
                            n_z=(n_test[0], n_test[1], n_test[2]),
                            m_z=(m_test[0], m_test[1], m_test[2]))
    finite = secure_key_length(stats, params.intensities, params.probabilities,
                               _lambda_ec(out.ec_disclosed_bits, params), params.eps_sec,
                               params.eps_cor)
    out.finite = finite
    out.pa_input_bits = int(key_bits.size)
    if rng is not None:  # Alice decides the length and draws the seed
        length = max(finite.length, 0)
        if length > key_bits.size:  # a bound gone wrong: never more key than input
            out.aborted = True
            out.reason = (f"no secure key: the finite-key length {length} exceeds the "
                          f"{key_bits.size} corrected key bits (inconsistent bounds)")
            length = 0  # Bob is told: no key from this block
        final = amplify_alice(channel, key_bits, length, rng, timeout=params.timeout_s)
    else:
        final = amplify_bob(channel, key_bits, timeout=params.timeout_s)
    out.pa_output_bits = int(final.size)
    if final.size == 0:
        out.aborted = True
        out.reason = out.reason or (
            f"no secure key: {finite.reason or 'finite-key length is zero'}")
        return out
    used = _session_bits(channel)
    out.auth_key_used_bits = used
    if used >= final.size:
        out.aborted = True
        out.reason = (f"the block's {final.size} key bits do not repay the {used} bits of "
                      "authentication key it used")
        return out
    out.pool_refill, out.key = final[:used], final[used:]
    return out


def _session_bits(channel: ClassicalChannel) -> int:
    session = getattr(channel, "session", None)
    return int(session.bits_drawn) if isinstance(session, AuthSession) else 0


def authenticated_pair(pool_bits: Bits, timeout_s: float = 60.0) -> tuple[
        AuthenticatedChannel, AuthenticatedChannel]:
    """Alice's and Bob's ends of an in-process channel, authenticated from one shared
    pre-shared key (each party holds its own copy of the pool)."""
    a_raw, b_raw = InProcessChannel.pair(timeout_s)
    a_session = AuthSession(KeyPool(pool_bits.copy()))
    b_session = AuthSession(KeyPool(pool_bits.copy()))
    return (AuthenticatedChannel(a_raw, a_session, local_id="alice", peer_id="bob"),
            AuthenticatedChannel(b_raw, b_session, local_id="bob", peer_id="alice"))


def postprocess_in_process(alice_record: SiftedRecord, bob_record: SiftedRecord,
                           params: PostProcessingParameters, pool_bits: Bits, seed: int,
                           channels: tuple[ClassicalChannel, ClassicalChannel] | None = None,
                           ) -> tuple[KeyOutcome, KeyOutcome]:
    """Run Alice and Bob in two threads over an authenticated in-process channel.

    An exception on either side (authentication failure, protocol error, timeout)
    aborts the block for both: the other side's channel closes and its outcome carries
    the reason.
    """
    a_end, b_end = channels or authenticated_pair(pool_bits, params.timeout_s)
    outcomes: dict[str, KeyOutcome] = {}

    def run(side: str) -> None:
        try:
            if side == "alice":
                outcomes[side] = alice(a_end, alice_record, params,
                                       np.random.default_rng([seed, 1]))
            else:
                outcomes[side] = bob(b_end, bob_record, params)
        except Exception as err:  # abort the block, never a key
            outcomes[side] = KeyOutcome(True, f"{type(err).__name__}: {err}")
            for end in (a_end, b_end):
                end.close()

    threads = [threading.Thread(target=run, args=(side,), name=f"postprocess-{side}")
               for side in ("alice", "bob")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(params.timeout_s * 4)
    a, b = outcomes.get("alice"), outcomes.get("bob")
    if a is None or b is None:
        return (a or KeyOutcome(True, "Alice did not finish")), \
            (b or KeyOutcome(True, "Bob did not finish"))
    if a.aborted != b.aborted:  # one side failed late: neither keeps a key
        reason = a.reason or b.reason
        a = KeyOutcome(True, reason, sifted_key_bits=a.sifted_key_bits)
        b = KeyOutcome(True, reason, sifted_key_bits=b.sifted_key_bits)
    return a, b
