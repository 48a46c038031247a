"""Numba kernels of :mod:`qkdlab.protocol.cascade`: pass layouts, Bob's search engine,
Alice's parity answers.

Shared conventions (all positions are *pass positions*, i.e. indices into a pass's
permuted order of the concatenated frames; frames never mix):

* Bob keeps, per pass, his current key in pass order packed 64 bits to a word (a row
  ``pk``; position p is bit p % 64 of word p // 64): a flip is one XOR, and the parity
  of a position range an XOR of whole words, masked at the ends.  Alice answers from
  prefix parities of her key in pass order.
* Bob's knowledge of Alice's parities is a row ``known`` of n + 1 slots per pass:
  known[p] = 0 if unknown, else 1 + the parity of Alice's positions [f0, p) of the frame
  [f0, f1) holding p - 1.  A block's end is known once its parity is; a binary search
  that asks for the left half [lo, mid) of a known node makes known[mid] known, so a
  node [lo, hi) of a search tree is known iff known[lo] (or lo = f0) and known[hi] are:
  the usual heap of known sub-block parities, stored by boundary.  Slot f0 belongs to the
  previous frame; Alice's parity of [f0, f0) is 0 by definition.
* A *halves* pass (k >= n/2) splits each frame f into the bits whose mask bit is 0 (in
  index order, block 2f) and those whose mask bit is 1 (block 2f + 1).  The mask is kept
  packed (``numpy.packbits`` order) with a ones count every 64 bits, so index <-> position
  maps are O(log n) and Bob fills a frame's ``pk`` slice only once one of its halves
  turns out odd.
"""

from __future__ import annotations

import numba
import numpy as np
import numpy.typing as npt

Bits = npt.NDArray[np.uint8]
IntArray = npt.NDArray[np.int64]
I32Array = npt.NDArray[np.int32]
U64Array = npt.NDArray[np.uint64]
UIntArray = npt.NDArray[np.unsignedinteger]
Index = int | np.int64

IDENTITY, SHUFFLED, HALVES = 0, 1, 2

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
# byte lane t of _EXPAND[m] is 1 iff bit t of m, counted from the MSB, is set: ANDed with
# eight 0/1 key bytes read as a little-endian word it keeps the bits whose mask bit is 1
_EXPAND = np.array(
    [sum(((m >> (7 - t)) & 1) << (8 * t) for t in range(8)) for m in range(256)],
    dtype=np.uint64,
)


# --- layouts -----------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def shuffle_into(out: I32Array, frames: IntArray, seeds: U64Array) -> None:
    """Per-frame Fisher–Yates permutations (splitmix64 stream seeded per frame), offset by
    each frame's start; identical on both sides for the same seeds.  The swap index is
    Lemire's multiply-shift reduction of the top 32 bits (frames < 2^32 bits)."""
    longest = 0
    for f in range(frames.size - 1):
        longest = max(longest, frames[f + 1] - frames[f])
    swap = np.empty(longest, dtype=np.int32)
    for f in range(frames.size - 1):
        f0, f1 = frames[f], frames[f + 1]
        for i in range(f0, f1):
            out[i] = i
        state = seeds[f]
        # the swap indices first (independent of the swaps, so they pipeline), then swap
        for i in range(f1 - f0 - 1, 0, -1):
            state += np.uint64(0x9E3779B97F4A7C15)
            z = state
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
            swap[i] = np.int32(((z >> np.uint64(32)) * np.uint64(i + 1)) >> np.uint64(32))
        seg = out[f0:f1]
        for i in range(f1 - f0 - 1, 0, -1):
            j = swap[i]
            seg[i], seg[j] = seg[j], seg[i]


@numba.njit(cache=True, nogil=True)
def gather_prefix_into(key: Bits, order: I32Array, identity: bool, out: Bits) -> None:
    """Global prefix parities of the key in pass order: out[p] = parity of positions < p."""
    out[0] = 0
    c = np.uint8(0)
    for p in range(key.size):
        c ^= key[p] if identity else key[order[p]]
        out[p + 1] = c


@numba.njit(cache=True, nogil=True)
def ones_directory(mask_words: U64Array) -> IntArray:
    """Ones of the packed mask before every 64-bit boundary: out[c] = ones in words < c."""
    out = np.empty(mask_words.size + 1, dtype=np.int64)
    r = np.int64(0)
    m1 = np.uint64(0x5555555555555555)
    m2 = np.uint64(0x3333333333333333)
    m4 = np.uint64(0x0F0F0F0F0F0F0F0F)
    h01 = np.uint64(0x0101010101010101)
    for c in range(mask_words.size):
        out[c] = r
        x = mask_words[c]
        x -= (x >> np.uint64(1)) & m1
        x = (x & m2) + ((x >> np.uint64(2)) & m2)
        x = (x + (x >> np.uint64(4))) & m4
        r += np.int64((x * h01) >> np.uint64(56))
    out[mask_words.size] = r
    return out


@numba.njit(cache=True)
def _mask_bit(mask: Bits, i: int) -> int:
    return (mask[i >> 3] >> (7 - (i & 7))) & 1


@numba.njit(cache=True)
def _ones_before(mask: Bits, ones: IntArray, i: int) -> int:
    """Mask ones at indices < i."""
    c = i >> 6
    r = ones[c]
    for j in range(8 * c, i >> 3):
        r += _POPCOUNT[mask[j]]
    rem = i & 7
    if rem:
        r += _POPCOUNT[mask[i >> 3] >> (8 - rem)]
    return r


@numba.njit(cache=True)
def _select(mask: Bits, ones: IntArray, f0: int, f1: int, v: int, r: int) -> int:
    """Index of the r-th (0-based) bit with mask value v in [f0, f1)."""
    base = _ones_before(mask, ones, f0)
    lo, hi = f0, f1 - 1
    while lo < hi:  # smallest i with count_v([f0, i + 1)) > r
        mid = (lo + hi) // 2
        c = _ones_before(mask, ones, mid + 1) - base
        if v == 0:
            c = mid + 1 - f0 - c
        if c > r:
            hi = mid
        else:
            lo = mid + 1
    return lo


@numba.njit(cache=True)
def halves_parity(key: Bits, keyw: U64Array, mask: Bits, a: int, e: int, v: int) -> np.int64:
    """Parity of key[i] over i in [a, e) whose mask bit is v (word-wise in the middle)."""
    acc = np.uint64(0)
    i = a
    while i < e and i % 8 != 0:
        if _mask_bit(mask, i) == v:
            acc ^= np.uint64(key[i])
        i += 1
    flip = 0 if v == 1 else 255
    while i + 8 <= e:
        acc ^= keyw[i >> 3] & _EXPAND[mask[i >> 3] ^ flip]
        i += 8
    while i < e:
        if _mask_bit(mask, i) == v:
            acc ^= np.uint64(key[i])
        i += 1
    for sh in (32, 16, 8):
        acc ^= acc >> np.uint64(sh)
    return np.int64(acc & np.uint64(1))


@numba.njit(cache=True)
def halves_ones(mask: Bits, ones: IntArray, frames: IntArray) -> IntArray:
    """Mask ones in each frame."""
    out = np.empty(frames.size - 1, dtype=np.int64)
    for f in range(frames.size - 1):
        out[f] = _ones_before(mask, ones, frames[f + 1]) - _ones_before(mask, ones, frames[f])
    return out


@numba.njit(cache=True)
def halves_block_parities(key: Bits, keyw: U64Array, mask: Bits, frames: IntArray) -> Bits:
    """Parities of the two halves (blocks 2f, 2f + 1) of every frame."""
    nf = frames.size - 1
    out = np.empty(2 * nf, dtype=np.uint8)
    for f in range(nf):
        f0, f1 = frames[f], frames[f + 1]
        ones = np.uint64(0)
        total = np.uint64(0)
        i = f0
        while i < f1 and i % 8 != 0:
            total ^= np.uint64(key[i])
            ones ^= np.uint64(key[i] * _mask_bit(mask, i))
            i += 1
        while i + 8 <= f1:
            w = keyw[i >> 3]
            total ^= w
            ones ^= w & _EXPAND[mask[i >> 3]]
            i += 8
        while i < f1:
            total ^= np.uint64(key[i])
            ones ^= np.uint64(key[i] * _mask_bit(mask, i))
            i += 1
        for sh in (32, 16, 8):
            total ^= total >> np.uint64(sh)
            ones ^= ones >> np.uint64(sh)
        t, o = np.int64(total & np.uint64(1)), np.int64(ones & np.uint64(1))
        out[2 * f] = t ^ o
        out[2 * f + 1] = o
    return out


# --- Bob: his key in pass order, packed -------------------------------------------------

_ONE = np.uint64(1)


@numba.njit(cache=True)
def _fold(x: np.uint64) -> np.int64:
    for sh in (32, 16, 8, 4, 2, 1):
        x ^= x >> np.uint64(sh)
    return np.int64(x & _ONE)


@numba.njit(cache=True)
def _parity(words: U64Array, lo: int, hi: int) -> np.int64:
    """Parity of the packed bits at positions [lo, hi)."""
    if lo >= hi:
        return np.int64(0)
    a, b = lo >> 6, (hi - 1) >> 6
    x = words[a] >> np.uint64(lo & 63)
    if a == b:
        width = hi - lo
        if width < 64:
            x &= (_ONE << np.uint64(width)) - _ONE
        return _fold(x)
    for w in range(a + 1, b):
        x ^= words[w]
    rem = hi - 64 * b
    last = words[b]
    if rem < 64:
        last &= (_ONE << np.uint64(rem)) - _ONE
    return _fold(x ^ last)


@numba.njit(cache=True)
def _bit(words: U64Array, p: int) -> np.int64:
    return np.int64((words[p >> 6] >> np.uint64(p & 63)) & _ONE)


@numba.njit(cache=True)
def _toggle(words: U64Array, p: Index) -> None:
    words[p >> 6] ^= _ONE << np.uint64(p & 63)


@numba.njit(cache=True)
def build_row(
    key: Bits, order: I32Array, identity: bool, words: U64Array, inv: I32Array,
    starts: IntArray,
) -> Bits:
    """Bob's key in the order of a shuffled or identity pass, packed into the zeroed row
    ``words``; for a shuffled pass also ``inv`` (inv[order[p]] = p).  Returns his block
    parities."""
    n = key.size
    for w in range((n + 63) // 64):
        acc = np.uint64(0)
        for t in range(min(64, n - 64 * w)):
            p = 64 * w + t
            if identity:
                bit = key[p]
            else:
                i = order[p]
                bit = key[i]
                inv[i] = p
            acc |= np.uint64(bit) << np.uint64(t)
        words[w] = acc
    par = np.empty(starts.size - 1, dtype=np.uint8)
    for b in range(starts.size - 1):
        par[b] = _parity(words, starts[b], starts[b + 1])
    return par


@numba.njit(cache=True)
def _build_halves_frame(key: Bits, mask: Bits, f0: int, f1: int, z: int,
                        words: U64Array) -> None:
    """Bob's key in the order of one frame of a halves pass (z bits in the mask-0 half),
    into the row ``words`` (zero at the frame's positions)."""
    pz, po = f0, f0 + z
    for i in range(f0, f1):
        if _mask_bit(mask, i) == 0:
            p = pz
            pz += 1
        else:
            p = po
            po += 1
        if key[i]:
            _toggle(words, p)


# --- Bob: search engine ------------------------------------------------------------------


@numba.njit(cache=True)
def _lower(a: IntArray, lo: int, hi: int, x: Index) -> int:
    """First i in [lo, hi) with a[i] >= x (hi if none); a sorted."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(cache=True)
def _sort(a: IntArray, n: int) -> None:
    """Sort the non-negative a[:n] in place: insertion sort when short, else an LSD radix
    sort on 11-bit digits (small to compile, linear time)."""
    if n < 64:
        for i in range(1, n):
            x = a[i]
            j = i - 1
            while j >= 0 and a[j] > x:
                a[j + 1] = a[j]
                j -= 1
            a[j + 1] = x
        return
    top = 0
    for i in range(n):
        top = max(top, a[i])
    src, dst = a[:n], np.empty(n, dtype=np.int64)
    count = np.empty(2049, dtype=np.int64)
    shift = 0
    in_place = True
    while top >> shift:
        for d in range(2049):
            count[d] = 0
        for i in range(n):
            count[((src[i] >> shift) & 2047) + 1] += 1
        for d in range(2048):
            count[d + 1] += count[d]
        for i in range(n):
            d = (src[i] >> shift) & 2047
            dst[count[d]] = src[i]
            count[d] += 1
        src, dst = dst, src
        shift += 11
        in_place = not in_place
    if not in_place:
        for i in range(n):
            a[i] = src[i]


@numba.njit(cache=True)
def _copy_token(dst: IntArray, i: int, src: IntArray, j: int) -> None:
    for c in range(4):
        dst[i, c] = src[j, c]


@numba.njit(cache=True)
def _kv(krow: Bits, p: int, f0: int) -> int:
    """Alice's parity of [f0, p) from a known slot (0 at the frame start)."""
    return 0 if p == f0 else krow[p] - 1


@numba.njit(cache=True)
def _frame_of(frames: IntArray, i: Index) -> int:
    return _lower(frames, 0, frames.size, i + 1) - 1


@numba.njit(cache=True)
def _to_index(
    q: int, p: int, f: int, kinds: IntArray, srow: IntArray, order: I32Array,
    hrow: IntArray, masks: Bits, ones: IntArray, starts: IntArray, soff: IntArray,
    frames: IntArray,
) -> np.int64:
    """Key index at pass position p (in frame f) of pass q."""
    kind = kinds[q]
    if kind == IDENTITY:
        return np.int64(p)
    if kind == SHUFFLED:
        return np.int64(order[srow[q], p])
    f0, f1 = frames[f], frames[f + 1]
    half = starts[soff[q] + 2 * f + 1]
    if p < half:
        return np.int64(_select(masks[hrow[q]], ones[hrow[q]], f0, f1, 0, p - f0))
    return np.int64(_select(masks[hrow[q]], ones[hrow[q]], f0, f1, 1, p - half))


@numba.njit(cache=True)
def _to_position(
    q: int, i: int, f: int, kinds: IntArray, srow: IntArray, inv: I32Array,
    hrow: IntArray, masks: Bits, ones: IntArray, starts: IntArray, soff: IntArray,
    frames: IntArray,
) -> np.int64:
    """Pass position of key index i (in frame f) in pass q."""
    kind = kinds[q]
    if kind == IDENTITY:
        return np.int64(i)
    if kind == SHUFFLED:
        return np.int64(inv[srow[q], i])
    mask, on = masks[hrow[q]], ones[hrow[q]]
    f0 = frames[f]
    before = _ones_before(mask, on, i) - _ones_before(mask, on, f0)
    if _mask_bit(mask, i) == 1:
        return np.int64(starts[soff[q] + 2 * f + 1] + before)
    return np.int64(i - before)


@numba.njit(cache=True)
def _grow_pool(pool: IntArray, need: int) -> IntArray:
    """``pool`` (2, capacity, 4) with room for ``need`` rows, contents kept."""
    if need <= pool.shape[1]:
        return pool
    bigger = np.empty((2, max(need, 2 * pool.shape[1]), 4), dtype=np.int64)
    for h in range(2):
        for t in range(pool.shape[1]):
            _copy_token(bigger[h], t, pool[h], t)
    return bigger


@numba.njit(cache=True)
def new_work(capacity: int) -> tuple[IntArray, IntArray, IntArray]:
    """Work arrays of :func:`advance`: token pools (2, c, 4), queries (c, 4), scratch (9, c)."""
    c = max(capacity, 16)
    return (np.empty((2, c, 4), dtype=np.int64), np.empty((c, 4), dtype=np.int64),
            np.empty((9, c), dtype=np.int64))


@numba.njit(cache=True)
def start_halves(
    q: int, key: Bits, frames: IntArray, root_err: Bits, masks: Bits, hrow: IntArray,
    pk: U64Array, built: Bits, starts: IntArray, soff: IntArray,
) -> IntArray:
    """Build the frames of halves pass q with an odd half; return their tokens."""
    nf = frames.size - 1
    tok = np.empty((2 * nf, 4), dtype=np.int64)
    m = 0
    for f in range(nf):
        if root_err[q, 2 * f] | root_err[q, 2 * f + 1]:
            m = _materialise_halves_frame(
                q, f, key, frames, root_err, masks, hrow, pk, built, starts, soff, tok, m
            )
    return tok[:m]


@numba.njit(cache=True)
def _materialise_halves_frame(
    q: int, f: int, key: Bits, frames: IntArray, root_err: Bits, masks: Bits,
    hrow: IntArray, pk: U64Array, built: Bits, starts: IntArray, soff: IntArray,
    tok: IntArray, m: int,
) -> int:
    f0, f1 = frames[f], frames[f + 1]
    half = starts[soff[q] + 2 * f + 1]
    _build_halves_frame(key, masks[hrow[q]], f0, f1, half - f0, pk[q])
    built[q, f] = 1
    for v in range(2):
        b = 2 * f + v
        if root_err[q, b]:
            tok[m, 0], tok[m, 1] = q, b
            tok[m, 2], tok[m, 3] = starts[soff[q] + b], starts[soff[q] + b + 1]
            m += 1
    return m


@numba.njit(cache=True)
def _block_of(
    q: int, p: int, f: int, kinds: IntArray, ks: IntArray, frames: IntArray,
    starts: IntArray, soff: IntArray, first_block: IntArray,
) -> int:
    """Block of pass q holding position p (in frame f)."""
    if kinds[q] == HALVES:
        return 2 * f + (1 if p >= starts[soff[q] + 2 * f + 1] else 0)
    return first_block[q, f] + (p - frames[f]) // ks[q]


@numba.njit(cache=True)
def advance(
    key: Bits, frames: IntArray, short: int, kinds: IntArray, ks: IntArray,
    rank: IntArray, started: int, starts: IntArray, soff: IntArray, bframe: IntArray,
    first_block: IntArray, known: Bits, pk: U64Array, srow: IntArray, order: I32Array,
    inv: I32Array, hrow: IntArray, masks: Bits, ones: IntArray, root_err: Bits,
    built: Bits, pool: IntArray, cur: int, tcount: IntArray, batch: IntArray,
    aux: IntArray, corrections: IntArray, flags: Bits,
) -> tuple[IntArray, int, IntArray, IntArray, int]:
    """Walk the search tokens through known parities, correct located errors, repeat.

    Tokens are rows (pass, block, lo, hi) of an odd known node, ``pool[cur]`` holding
    them grouped by the pass order ``rank``, ``tcount[q]`` per pass; ``bframe[soff[q] -
    q + b]`` is the frame of block b of pass q.  Scheduling as the serial Cascade
    (smallest blocks first): a token of a pass whose blocks exceed 1/16 of the shortest
    frame waits while its frame has tokens in a pass visited earlier.  A token stops
    where the left child's parity is unknown (a query, asked once per node) or at a
    single bit (an error).  Errors found are flipped and every started pass updated (see
    :func:`_flip`), then the walk repeats; more flips in one call than key bits can only
    come from inconsistent parities and raise RuntimeError (instead of looping for ever).
    Returns (pool, cur, batch, aux, nb): the
    queries (pass, frame, lo, mid) are ``batch[:nb]``, none once no token is left.  The
    work arrays (from :func:`new_work`) are reused from call to call and grown when
    needed; ``flags`` is a zeroed scratch array of one byte per block.
    """
    nf = frames.size - 1
    npass = kinds.size
    busy = np.zeros(max(nf, 1), dtype=np.uint8)
    newcount = np.zeros(npass, dtype=np.int64)
    flipped = 0
    while True:
        total = tcount.sum()
        if total > batch.shape[0]:
            pool = _grow_pool(pool, total)
            batch = np.empty((pool.shape[1], 4), dtype=np.int64)
            aux = np.empty((9, pool.shape[1]), dtype=np.int64)
        tok, out = pool[cur], pool[1 - cur]
        found = aux[0:2]
        parked = aux[8]
        for u in range(npass):
            newcount[u] = 0
        for u in range(busy.size):
            busy[u] = 0
        anybusy = False
        w = nb = nfound = 0
        r = 0
        for j in range(npass):
            q = rank[j]
            c = tcount[q]
            if c == 0:
                continue
            s, e = r, r + c
            r = e
            seg0 = w
            krow, words = known[q], pk[q]
            boff = soff[q] - q
            park = 16 * ks[q] > short and anybusy
            for t in range(s, e):
                parked[t] = 0
                if park and busy[bframe[boff + tok[t, 1]]]:
                    parked[t] = 1
                    _copy_token(out, w, tok, t)
                    w += 1
            for t in range(s, e):
                busy[bframe[boff + tok[t, 1]]] = 1
            anybusy = True
            kept0 = w
            for t in range(s, e):
                if parked[t]:
                    continue
                b, lo, hi = tok[t, 1], tok[t, 2], tok[t, 3]
                f = bframe[boff + b]
                f0 = frames[f]
                alo = _kv(krow, lo, f0)
                while True:
                    if hi - lo == 1:
                        if (_kv(krow, hi, f0) ^ alo ^ _bit(words, lo)) != 1:
                            raise RuntimeError("Cascade invariant broken: leaf without error")
                        found[0, nfound] = q
                        found[1, nfound] = _to_index(
                            q, lo, f, kinds, srow, order, hrow, masks, ones, starts, soff, frames
                        )
                        nfound += 1
                        corrections[q] += 1
                        break
                    mid = lo + (hi - lo) // 2
                    km = krow[mid]
                    if km == 0:
                        out[w, 0], out[w, 1], out[w, 2], out[w, 3] = q, b, lo, hi
                        w += 1
                        break
                    if (km - 1) ^ alo ^ _parity(words, lo, mid):
                        hi = mid
                    else:
                        lo = mid
                        alo = km - 1
            # two tokens may meet at the same node: ask once (mark the unknown mid)
            kw = kept0
            for t in range(kept0, w):
                mid = out[t, 2] + (out[t, 3] - out[t, 2]) // 2
                if krow[mid] == 3:
                    continue
                krow[mid] = 3
                _copy_token(out, kw, out, t)
                kw += 1
            for t in range(kept0, kw):
                lo, hi = out[t, 2], out[t, 3]
                mid = lo + (hi - lo) // 2
                krow[mid] = 0
                batch[nb, 0], batch[nb, 1] = q, bframe[boff + out[t, 1]]
                batch[nb, 2], batch[nb, 3] = lo, mid
                nb += 1
            w = kw
            newcount[q] = w - seg0
        for u in range(npass):
            tcount[u] = newcount[u]
        cur = 1 - cur
        if nfound == 0:
            return pool, cur, batch, aux, nb
        pool, nidx = _flip(
            key, frames, kinds, ks, rank, started, starts, soff, first_block, known, pk, srow,
            inv, hrow, masks, ones, root_err, built, pool, cur, tcount, aux, nfound, flags,
        )
        cur = 1 - cur
        # true errors are corrected once each; more flips than bits means the parities
        # were inconsistent and the walk could go on for ever
        flipped += nidx
        if flipped > key.size:
            raise RuntimeError("Cascade: more corrections than key bits (inconsistent parities)")


@numba.njit(cache=True)
def _flip(
    key: Bits, frames: IntArray, kinds: IntArray, ks: IntArray, rank: IntArray,
    started: int, starts: IntArray, soff: IntArray, first_block: IntArray, known: Bits,
    pk: U64Array, srow: IntArray, inv: I32Array, hrow: IntArray, masks: Bits,
    ones: IntArray, root_err: Bits, built: Bits, pool: IntArray, cur: int,
    tcount: IntArray, aux: IntArray, nfound: int, flags: Bits,
) -> tuple[IntArray, int]:
    """Correct the located bits in every started pass; tokens go from pool[cur] to
    pool[1 - cur].  Returns the pool (grown if need be) and the number of bits flipped.

    ``aux[0:2, :nfound]`` are the (pass, key index) of the bits located.  Tokens holding
    a flipped bit are dropped.  Then, for each flipped bit not located by this pass's own
    search, the path of known nodes holding it is walked from its block's root, and
    every odd node on it whose parent on the path is even (or that is the root) becomes
    a token.  Only nodes holding a flipped bit change parity, so all odd known sub-blocks
    are covered (a kept token may sit below a new one: both find real errors).  A bit
    located by the pass's own search needs no walk: the known nodes holding it are
    exactly that search's path, all odd before the flip and even after.  A frame of a
    halves pass not built yet only tracks its halves' parities, and is built (its odd
    halves becoming tokens) once one turns odd.
    """
    npass = kinds.size
    stride = key.size + 1
    # aux rows: 2 flipped indices, 3 their frames, 4 (pass, index) of the finds, sorted
    # (a pass's own finds are one run), 5 position * 2 + walk flag, 6 blocks, 7 frames
    # to build
    idx = aux[2, :nfound]
    for u in range(nfound):
        idx[u] = aux[1, u]
    _sort(idx, nfound)
    nidx = 0
    for u in range(nfound):
        if u == 0 or idx[u] != idx[u - 1]:
            idx[nidx] = idx[u]
            nidx += 1
    idx = idx[:nidx]
    fr = aux[3, :nidx]
    for u in range(nidx):
        key[idx[u]] ^= 1
        fr[u] = _frame_of(frames, idx[u])
    own_sorted = aux[4, :nfound]
    for u in range(nfound):
        own_sorted[u] = aux[0, u] * stride + aux[1, u]
    _sort(own_sorted, nfound)
    tok = pool[cur]
    w = 0
    r = 0
    newcount = np.zeros(npass, dtype=np.int64)
    for j in range(npass):
        q = rank[j]
        c = tcount[q]
        s, e = r, r + c
        r = e
        if q >= started:
            continue
        seg0 = w
        krow, words = known[q], pk[q]
        halves = kinds[q] == HALVES
        mine0 = _lower(own_sorted, 0, nfound, q * stride)
        mine1 = _lower(own_sorted, mine0, nfound, (q + 1) * stride)
        keys = aux[5]
        cand = aux[7]
        m = 0
        nc = 0
        for u in range(nidx):
            i, f = idx[u], fr[u]
            if halves and not built[q, f]:
                root_err[q, 2 * f + _mask_bit(masks[hrow[q]], i)] ^= 1
                cand[nc] = f
                nc += 1
                continue
            p = _to_position(q, i, f, kinds, srow, inv, hrow, masks, ones, starts, soff, frames)
            _toggle(words, p)
            k = _lower(own_sorted, mine0, mine1, q * stride + i)
            own = k < mine1 and own_sorted[k] == q * stride + i
            keys[m] = 2 * p + (0 if own else 1)
            m += 1
        _sort(keys, m)  # by position; the walk flag is the low bit
        blk = aux[6, :m]
        for u in range(m):
            p = keys[u] >> 1
            blk[u] = _block_of(
                q, p, _frame_of(frames, p), kinds, ks, frames, starts, soff, first_block
            )
            flags[blk[u]] = 1
        pool = _grow_pool(pool, w + c + m + 2 * nc + 16)
        tok, out = pool[cur], pool[1 - cur]
        for t in range(s, e):
            if flags[tok[t, 1]] and (
                _lower(keys, 0, m, 2 * tok[t, 2]) < _lower(keys, 0, m, 2 * tok[t, 3])
            ):
                continue
            _copy_token(out, w, tok, t)
            w += 1
        for u in range(m):
            flags[blk[u]] = 0
        block_first = w
        prev_b = -1
        for u in range(m):
            if not keys[u] & 1:
                continue
            p = keys[u] >> 1
            b = blk[u]
            if b != prev_b:
                block_first = w
                prev_b = b
            lo, hi = starts[soff[q] + b], starts[soff[q] + b + 1]
            f0 = frames[_frame_of(frames, p)]
            alo, ahi = 0 if lo == f0 else krow[lo] - 1, krow[hi] - 1
            parent_odd = False
            while True:
                odd = (ahi ^ alo ^ _parity(words, lo, hi)) == 1
                if odd and not parent_odd:
                    dup = False
                    for v in range(block_first, w):
                        if out[v, 2] == lo and out[v, 3] == hi:
                            dup = True
                            break
                    if not dup:
                        if w == out.shape[0]:
                            pool = _grow_pool(pool, w + 1)
                            tok, out = pool[cur], pool[1 - cur]
                        out[w, 0], out[w, 1], out[w, 2], out[w, 3] = q, b, lo, hi
                        w += 1
                parent_odd = odd
                if hi - lo <= 1:
                    break
                mid = lo + (hi - lo) // 2
                if krow[mid] == 0:
                    break
                if p < mid:
                    hi, ahi = mid, krow[mid] - 1
                else:
                    lo, alo = mid, krow[mid] - 1
        if nc:
            _sort(cand, nc)
            pool = _grow_pool(pool, w + 2 * nc)
            tok, out = pool[cur], pool[1 - cur]
            for u in range(nc):
                f = cand[u]
                if u and f == cand[u - 1]:
                    continue
                if root_err[q, 2 * f] | root_err[q, 2 * f + 1]:
                    w = _materialise_halves_frame(
                        q, f, key, frames, root_err, masks, hrow, pk, built, starts, soff,
                        out, w,
                    )
        newcount[q] = w - seg0
    for u in range(npass):
        tcount[u] = newcount[u]
    return pool, nidx


@numba.njit(cache=True)
def store(
    known: Bits, frames: IntArray, batch: IntArray, answers: Bits, search: IntArray,
    disclosed: IntArray,
) -> None:
    """Record Alice's parity of each query's left half [lo, mid): known[mid] is set."""
    for t in range(batch.shape[0]):
        q, f, lo, mid = batch[t, 0], batch[t, 1], batch[t, 2], batch[t, 3]
        krow = known[q]
        krow[mid] = (_kv(krow, lo, frames[f]) ^ answers[t]) + 1
        search[q] += 1
        disclosed[f] += 1


@numba.njit(cache=True)
def set_roots(known: Bits, q: int, frames: IntArray, starts: IntArray, block_frame: IntArray,
              roots: Bits) -> None:
    """Alice's block parities of pass q into ``known`` (running XOR over each frame)."""
    krow = known[q]
    c = 0
    prev = -1
    for b in range(starts.size - 1):
        f = block_frame[b]
        if f != prev:
            c = 0
            prev = f
        c ^= roots[b]
        e = starts[b + 1]
        if e > frames[f]:
            krow[e] = c + 1


# --- Alice -------------------------------------------------------------------------------


@numba.njit(cache=True)
def answer(
    passes: Bits, lo: UIntArray, hi: UIntArray, kinds: IntArray, starts: IntArray,
    soff: IntArray, frames: IntArray, cum: Bits, crow: IntArray, key: Bits, keyw: U64Array,
    masks: Bits, ones: IntArray, hrow: IntArray, out: Bits,
) -> tuple[int, int]:
    """Alice's parity of each queried position range [lo, hi) of its pass, into ``out``.

    Returns (0, 0), or (1, t) if query t lies outside the key or the passes, or (2, t)
    if query t of a halves pass is not inside one half of a frame.
    """
    n = key.size
    for t in range(passes.size):
        q, a, e = np.int64(passes[t]), np.int64(lo[t]), np.int64(hi[t])
        if q >= kinds.size or a < 0 or e > n or a >= e:
            return 1, t
        if kinds[q] != HALVES:
            out[t] = cum[crow[q], a] ^ cum[crow[q], e]
            continue
        f = _frame_of(frames, a)
        f0, f1 = frames[f], frames[f + 1]
        half = starts[soff[q] + 2 * f + 1]
        v = 1 if a >= half else 0
        h0, h1 = (half, f1) if v else (f0, half)
        if e > h1:
            return 2, t
        mask, on = masks[hrow[q]], ones[hrow[q]]
        # key indices: the (a - h0)-th to before the (e - h0)-th bit with mask value v
        i0 = f0 if a == h0 else _select(mask, on, f0, f1, v, a - h0)
        i1 = f1 if e == h1 else _select(mask, on, f0, f1, v, e - h0)
        out[t] = halves_parity(key, keyw, mask, i0, i1, v)
    return 0, 0
