"""Compiled passes of :mod:`qkdlab.protocol.ntt`: 16-lane GF(p) kernels as LLVM vector IR.

Everything that runs per element lives here, in one file, because numba's on-disk cache
only notices edits to the file of the cached function itself.

Data are rows of 16 uint32 lanes (one AVX-512 register; LLVM splits it on narrower
machines) in flat arrays.  The butterflies are numba ``@intrinsic`` functions that load
rows, compute and store: written by hand, the high half of a 32 × 32-bit product is two
even/odd ``pmuludq`` and a merge, where the loop vectoriser makes ten instructions of it.
All values stay fully reduced in [0, p), p = 15·2^27 + 1 < 2^31, so a sum of two values
and a Shoup product of any 32-bit input fit in 32 bits.

Butterfly kernels (``a``: flat uint32 array, offsets in elements, ``q``: row distance):

- ``dif4_k(a, o, q, c1, c1q, c2, c2q, c3, c3q, i, iq)``: radix-4 decimation in frequency
  on rows o, o+q, o+2q, o+3q, twiddles ω^j, ω^2j, ω^3j (Shoup pairs), i = ω_4;
  ``dif4_last_k(a, o, v, vq, vo, i, iq)``: the last stage (q = 1, twiddles 1) times
  per-lane factors v[vo …] (none if ``v`` is empty);
- ``dit4_k``/``dit4_first_k``: their inverses (inverse roots, result times 4);
- ``dif2_k``/``dit2_k``, ``dif3_k``/``dit3_k``: radix-2 and radix-3 stages;
- ``scale_k(a, o, c, cq)``: one row times a constant; ``mont_k(x, y, o)``: a row of
  x·y·2^(−32) mod p (Montgomery); ``transpose16(src, so, dst, do)``: a 16 × 16 block.

Passes (cached numba functions, driven by :class:`qkdlab.protocol.ntt.BitConvolution`):
``to_blocks``, ``columns_forward``, ``rows``, ``columns_inverse``, ``from_blocks``.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import numpy.typing as npt
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

U32 = npt.NDArray[np.uint32]
Bits = npt.NDArray[np.uint8]
_u64 = np.uint64

P = 2013265921
LANES = 16
_P_NEG_INV = (-pow(P, -1, 1 << 32)) % (1 << 32)

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_V16 = ir.VectorType(_I32, LANES)
_V8Q = ir.VectorType(_I64, LANES // 2)


class _Ops:
    """Helpers emitting 16 × uint32 vector IR mod p into one builder."""

    def __init__(self, context: Any, builder: ir.IRBuilder) -> None:
        self.ctx = context
        self.b = builder
        self.p = self.splat_const(P)
        self.lo_mask = ir.Constant(_V8Q, [0xFFFFFFFF] * (LANES // 2))
        self.hi_mask = ir.Constant(_V8Q, [0xFFFFFFFF00000000] * (LANES // 2))
        self.shift = ir.Constant(_V8Q, [32] * (LANES // 2))

    # -- memory and constants
    def data(self, ty: Any, value: Any) -> Any:
        return self.ctx.make_array(ty)(self.ctx, self.b, value).data

    def offset(self, ty: Any, value: Any) -> Any:
        return self.ctx.cast(self.b, value, ty, types.int64)

    def scalar(self, ty: Any, value: Any) -> Any:
        return self.ctx.cast(self.b, value, ty, types.uint32)

    def ptr(self, data: Any, off: Any, rows: int = 0) -> Any:
        if rows:
            off = self.b.add(off, ir.Constant(_I64, rows * LANES))
        return self.b.bitcast(self.b.gep(data, [off]), _V16.as_pointer())

    def load(self, data: Any, off: Any, rows: int = 0) -> Any:
        return self.b.load(self.ptr(data, off, rows), align=4)

    def store(self, value: Any, data: Any, off: Any, rows: int = 0) -> None:
        self.b.store(value, self.ptr(data, off, rows), align=4)

    def splat(self, scalar: Any) -> Any:
        vec = self.b.insert_element(ir.Constant(_V16, ir.Undefined), scalar,
                                    ir.Constant(_I32, 0))
        return self.b.shuffle_vector(vec, ir.Constant(_V16, ir.Undefined),
                                     ir.Constant(_V16, [0] * LANES))

    @staticmethod
    def splat_const(value: int) -> Any:
        return ir.Constant(_V16, [value] * LANES)

    # -- arithmetic mod p
    def red(self, x: Any) -> Any:
        """[0, 2p) → [0, p): min(x, x − p) unsigned."""
        t = self.b.sub(x, self.p)
        return self.b.select(self.b.icmp_unsigned("<", t, x), t, x)

    def add(self, x: Any, y: Any) -> Any:
        return self.red(self.b.add(x, y))

    def sub(self, x: Any, y: Any) -> Any:
        """x − y + p in [0, 2p), not reduced."""
        return self.b.add(self.b.sub(x, y), self.p)

    def mulhi(self, x: Any, y: Any) -> Any:
        """⌊x·y / 2^32⌋ per lane: even lanes and odd lanes each by one pmuludq."""
        b = self.b
        xq, yq = b.bitcast(x, _V8Q), b.bitcast(y, _V8Q)
        even = b.mul(b.and_(xq, self.lo_mask), b.and_(yq, self.lo_mask))
        odd = b.mul(b.lshr(xq, self.shift), b.lshr(yq, self.shift))
        hi = b.or_(b.lshr(even, self.shift), b.and_(odd, self.hi_mask))
        return b.bitcast(hi, _V16)

    def mul(self, x: Any, w: Any, wq: Any) -> Any:
        """x·w mod p in [0, p) for any 32-bit x (Shoup: wq = ⌊w·2^32/p⌋)."""
        q = self.mulhi(x, wq)
        return self.red(self.b.sub(self.b.mul(x, w), self.b.mul(q, self.p)))

    def mont(self, x: Any, y: Any) -> Any:
        """x·y·2^(−32) mod p (Montgomery) for x, y < p."""
        m = self.b.mul(self.b.mul(x, y), self.splat_const(_P_NEG_INV))
        # x·y + m·p ≡ 0 mod 2^32, so its high half is hi(x·y) + hi(m·p) + [carry]
        # with carry = [lo(x·y) ≠ 0]; the sum is < 2p.
        lo = self.b.mul(x, y)
        carry = self.b.zext(self.b.icmp_unsigned("!=", lo, self.splat_const(0)), _V16)
        hi = self.b.add(self.b.add(self.mulhi(x, y), self.mulhi(m, self.p)), carry)
        return self.red(hi)


def _typed(body: Any, *args: Any) -> Any:
    """Signature and code generator of a kernel whose IR is ``body(ops, arg_types, args)``."""
    sig = types.void(*args)

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, llargs: Any) -> Any:
        body(_Ops(context, builder), signature.args, llargs)
        return context.get_dummy_value()

    return sig, codegen


def _twiddles(o: _Ops, ty: Any, args: Any, first: int, count: int) -> list[Any]:
    return [o.splat(o.scalar(ty[first + k], args[first + k])) for k in range(count)]


def _dif4_core(o: _Ops, a0: Any, a1: Any, a2: Any, a3: Any, i: Any,
               iq: Any) -> tuple[Any, Any, Any, Any]:
    """s0 ± s1 and t0 ± t1 (t1 = i·(a1 − a3)); the differences are in [0, 2p)."""
    s0, s1 = o.add(a0, a2), o.add(a1, a3)
    t0 = o.red(o.sub(a0, a2))
    t1 = o.mul(o.sub(a1, a3), i, iq)
    return o.add(s0, s1), o.sub(s0, s1), o.b.add(t0, t1), o.sub(t0, t1)


def _ir_dif4(o: _Ops, ty: Any, args: Any) -> None:
    data, off, q = o.data(ty[0], args[0]), o.offset(ty[1], args[1]), o.offset(ty[2], args[2])
    c1, c1q, c2, c2q, c3, c3q, i, iq = _twiddles(o, ty, args, 3, 8)
    offs = [off, o.b.add(off, q)]
    offs += [o.b.add(offs[1], q), o.b.add(o.b.add(offs[1], q), q)]
    a0, a1, a2, a3 = (o.load(data, k) for k in offs)
    y0, y1, y2, y3 = _dif4_core(o, a0, a1, a2, a3, i, iq)
    o.store(y0, data, offs[0])
    o.store(o.mul(y1, c2, c2q), data, offs[1])
    o.store(o.mul(y2, c1, c1q), data, offs[2])
    o.store(o.mul(y3, c3, c3q), data, offs[3])


def _ir_dif4_last(o: _Ops, ty: Any, args: Any) -> None:
    """Rows o … o+3; times v[vo + 16·row + lane] unless ``v`` is empty (size 0)."""
    data, off = o.data(ty[0], args[0]), o.offset(ty[1], args[1])
    i, iq = _twiddles(o, ty, args, 5, 2)
    a0, a1, a2, a3 = (o.load(data, off, k) for k in range(4))
    ys = _dif4_core(o, a0, a1, a2, a3, i, iq)
    _store_scaled(o, ty, args, data, off, ys)


def _store_scaled(o: _Ops, ty: Any, args: Any, data: Any, off: Any, ys: Any) -> None:
    v_arr = o.ctx.make_array(ty[2])(o.ctx, o.b, args[2])
    v, vq, vo = v_arr.data, o.data(ty[3], args[3]), o.offset(ty[4], args[4])
    size = o.b.extract_value(v_arr.shape, 0)
    with o.b.if_else(o.b.icmp_signed(">", size, ir.Constant(_I64, 0))) as (scaled, plain):
        with scaled:
            for k, y in enumerate(ys):
                o.store(o.mul(y, o.load(v, vo, k), o.load(vq, vo, k)), data, off, k)
        with plain:
            for k, y in enumerate(ys):
                o.store(o.red(y), data, off, k)


def _dit4_core(o: _Ops, y0: Any, e1: Any, e: Any, f: Any, i: Any,
               iq: Any) -> tuple[Any, Any, Any, Any]:
    s0, s1 = o.add(y0, e1), o.red(o.sub(y0, e1))
    t0 = o.add(e, f)
    g = o.mul(o.sub(e, f), i, iq)
    return o.add(s0, t0), o.add(s1, g), o.red(o.sub(s0, t0)), o.red(o.sub(s1, g))


def _ir_dit4(o: _Ops, ty: Any, args: Any) -> None:
    data, off, q = o.data(ty[0], args[0]), o.offset(ty[1], args[1]), o.offset(ty[2], args[2])
    c1, c1q, c2, c2q, c3, c3q, i, iq = _twiddles(o, ty, args, 3, 8)
    offs = [off, o.b.add(off, q)]
    offs += [o.b.add(offs[1], q), o.b.add(o.b.add(offs[1], q), q)]
    y0 = o.load(data, offs[0])
    e1 = o.mul(o.load(data, offs[1]), c2, c2q)
    e = o.mul(o.load(data, offs[2]), c1, c1q)
    f = o.mul(o.load(data, offs[3]), c3, c3q)
    for y, k in zip(_dit4_core(o, y0, e1, e, f, i, iq), offs, strict=True):
        o.store(y, data, k)


def _ir_dit4_first(o: _Ops, ty: Any, args: Any) -> None:
    """Rows o … o+3, first multiplied by v[vo + 16·row + lane] unless ``v`` is empty."""
    data, off = o.data(ty[0], args[0]), o.offset(ty[1], args[1])
    i, iq = _twiddles(o, ty, args, 5, 2)
    v_arr = o.ctx.make_array(ty[2])(o.ctx, o.b, args[2])
    v, vq, vo = v_arr.data, o.data(ty[3], args[3]), o.offset(ty[4], args[4])
    size = o.b.extract_value(v_arr.shape, 0)
    with o.b.if_else(o.b.icmp_signed(">", size, ir.Constant(_I64, 0))) as (scaled, plain):
        with scaled:
            y0, y1, y2, y3 = (o.mul(o.load(data, off, k), o.load(v, vo, k), o.load(vq, vo, k))
                              for k in range(4))
            for k, y in enumerate(_dit4_core(o, y0, y1, y2, y3, i, iq)):
                o.store(y, data, off, k)
        with plain:
            y0, y1, y2, y3 = (o.load(data, off, k) for k in range(4))
            for k, y in enumerate(_dit4_core(o, y0, y1, y2, y3, i, iq)):
                o.store(y, data, off, k)


def _ir_dif2(o: _Ops, ty: Any, args: Any) -> None:
    data, off, h = o.data(ty[0], args[0]), o.offset(ty[1], args[1]), o.offset(ty[2], args[2])
    c, cq = _twiddles(o, ty, args, 3, 2)
    o1 = o.b.add(off, h)
    x, y = o.load(data, off), o.load(data, o1)
    o.store(o.add(x, y), data, off)
    o.store(o.mul(o.sub(x, y), c, cq), data, o1)


def _ir_dit2(o: _Ops, ty: Any, args: Any) -> None:
    data, off, h = o.data(ty[0], args[0]), o.offset(ty[1], args[1]), o.offset(ty[2], args[2])
    c, cq = _twiddles(o, ty, args, 3, 2)
    o1 = o.b.add(off, h)
    x, t = o.load(data, off), o.mul(o.load(data, o1), c, cq)
    o.store(o.add(x, t), data, off)
    o.store(o.red(o.sub(x, t)), data, o1)


def _ir_dif3(o: _Ops, ty: Any, args: Any) -> None:
    """Rows o, o+m, o+2m; twiddles ω_N1^j, ω_N1^2j and the cube root c (Shoup pairs)."""
    data, off, m = o.data(ty[0], args[0]), o.offset(ty[1], args[1]), o.offset(ty[2], args[2])
    t1, t1q, t2, t2q, c, cq = _twiddles(o, ty, args, 3, 6)
    o1 = o.b.add(off, m)
    o2 = o.b.add(o1, m)
    a0, a1, a2 = o.load(data, off), o.load(data, o1), o.load(data, o2)
    t = o.mul(o.sub(a1, a2), c, cq)
    o.store(o.add(o.add(a0, a1), a2), data, off)
    o.store(o.mul(o.b.add(o.red(o.sub(a0, a2)), t), t1, t1q), data, o1)
    o.store(o.mul(o.sub(o.red(o.sub(a0, a1)), t), t2, t2q), data, o2)


def _ir_dit3(o: _Ops, ty: Any, args: Any) -> None:
    data, off, m = o.data(ty[0], args[0]), o.offset(ty[1], args[1]), o.offset(ty[2], args[2])
    t1, t1q, t2, t2q, c, cq = _twiddles(o, ty, args, 3, 6)
    o1 = o.b.add(off, m)
    o2 = o.b.add(o1, m)
    y0 = o.load(data, off)
    y1 = o.mul(o.load(data, o1), t1, t1q)
    y2 = o.mul(o.load(data, o2), t2, t2q)
    t = o.mul(o.sub(y1, y2), c, cq)
    o.store(o.add(o.add(y0, y1), y2), data, off)
    o.store(o.add(o.red(o.sub(y0, y2)), t), data, o1)
    o.store(o.red(o.sub(o.red(o.sub(y0, y1)), t)), data, o2)


def _ir_scale(o: _Ops, ty: Any, args: Any) -> None:
    data, off = o.data(ty[0], args[0]), o.offset(ty[1], args[1])
    c, cq = _twiddles(o, ty, args, 2, 2)
    o.store(o.mul(o.load(data, off), c, cq), data, off)


def _ir_mont(o: _Ops, ty: Any, args: Any) -> None:
    x, y, off = o.data(ty[0], args[0]), o.data(ty[1], args[1]), o.offset(ty[2], args[2])
    o.store(o.mont(o.load(x, off), o.load(y, off)), x, off)


def _dif4_k_typer(  # type: ignore[no-untyped-def]
    typingctx, a, o, q, c1, c1q, c2, c2q, c3, c3q, i, iq
):
    return _typed(_ir_dif4, a, o, q, c1, c1q, c2, c2q, c3, c3q, i, iq)


dif4_k: Any = intrinsic(_dif4_k_typer)


def _dif4_last_k_typer(typingctx, a, o, v, vq, vo, i, iq):  # type: ignore[no-untyped-def]
    return _typed(_ir_dif4_last, a, o, v, vq, vo, i, iq)


dif4_last_k: Any = intrinsic(_dif4_last_k_typer)


def _dit4_k_typer(  # type: ignore[no-untyped-def]
    typingctx, a, o, q, c1, c1q, c2, c2q, c3, c3q, i, iq
):
    return _typed(_ir_dit4, a, o, q, c1, c1q, c2, c2q, c3, c3q, i, iq)


dit4_k: Any = intrinsic(_dit4_k_typer)


def _dit4_first_k_typer(typingctx, a, o, v, vq, vo, i, iq):  # type: ignore[no-untyped-def]
    return _typed(_ir_dit4_first, a, o, v, vq, vo, i, iq)


dit4_first_k: Any = intrinsic(_dit4_first_k_typer)


def _dif2_k_typer(typingctx, a, o, h, c, cq):  # type: ignore[no-untyped-def]
    return _typed(_ir_dif2, a, o, h, c, cq)


dif2_k: Any = intrinsic(_dif2_k_typer)


def _dit2_k_typer(typingctx, a, o, h, c, cq):  # type: ignore[no-untyped-def]
    return _typed(_ir_dit2, a, o, h, c, cq)


dit2_k: Any = intrinsic(_dit2_k_typer)


def _dif3_k_typer(typingctx, a, o, m, t1, t1q, t2, t2q, c, cq):  # type: ignore[no-untyped-def]
    return _typed(_ir_dif3, a, o, m, t1, t1q, t2, t2q, c, cq)


dif3_k: Any = intrinsic(_dif3_k_typer)


def _dit3_k_typer(typingctx, a, o, m, t1, t1q, t2, t2q, c, cq):  # type: ignore[no-untyped-def]
    return _typed(_ir_dit3, a, o, m, t1, t1q, t2, t2q, c, cq)


dit3_k: Any = intrinsic(_dit3_k_typer)


def _scale_k_typer(typingctx, a, o, c, cq):  # type: ignore[no-untyped-def]
    return _typed(_ir_scale, a, o, c, cq)


scale_k: Any = intrinsic(_scale_k_typer)


def _mont_k_typer(typingctx, x, y, o):  # type: ignore[no-untyped-def]
    return _typed(_ir_mont, x, y, o)


mont_k: Any = intrinsic(_mont_k_typer)


@numba.njit(inline="always")
def _log2(size: int) -> int:
    k = 0
    while (1 << k) < size:
        k += 1
    return k


def _transpose16_typer(typingctx, src, src_off, dst, dst_off):  # type: ignore[no-untyped-def]
    """dst[dst_off + 16·j + i] = src[src_off + 16·i + j] for i, j < 16 (uint32 arrays).

    Sixteen 16-lane loads, four rounds of two-source shuffles swapping one bit of the row
    and column index each, sixteen stores: a register transpose LLVM lowers to vpermt2d.
    """
    sig = types.void(src, src_off, dst, dst_off)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        i32, i64 = ir.IntType(32), ir.IntType(64)
        vec = ir.VectorType(i32, LANES)
        s_arr = context.make_array(signature.args[0])(context, builder, args[0])
        d_arr = context.make_array(signature.args[2])(context, builder, args[2])
        s_off = context.cast(builder, args[1], signature.args[1], types.int64)
        d_off = context.cast(builder, args[3], signature.args[3], types.int64)
        rows = []
        for i in range(LANES):
            ptr = builder.gep(s_arr.data, [builder.add(s_off, ir.Constant(i64, LANES * i))])
            rows.append(builder.load(builder.bitcast(ptr, vec.as_pointer()), align=4))
        for bit in (8, 4, 2, 1):
            lo = [j if not j & bit else LANES + j - bit for j in range(LANES)]
            hi = [j + bit if not j & bit else LANES + j for j in range(LANES)]
            new = list(rows)
            for i in range(LANES):
                if not i & bit:
                    new[i] = builder.shuffle_vector(rows[i], rows[i + bit], ir.Constant(vec, lo))
                    new[i + bit] = builder.shuffle_vector(rows[i], rows[i + bit],
                                                          ir.Constant(vec, hi))
            rows = new
        for i in range(LANES):
            ptr = builder.gep(d_arr.data, [builder.add(d_off, ir.Constant(i64, LANES * i))])
            builder.store(rows[i], builder.bitcast(ptr, vec.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


transpose16: Any = intrinsic(_transpose16_typer)


def _bytes16_typer(typingctx, src, so, dst, do, mask, mo):  # type: ignore[no-untyped-def]
    """dst[do : do + 16] = src[so : so + 16] ⊕ mask[mo : mo + 16] (no mask if it is empty)."""
    sig = types.void(src, so, dst, do, mask, mo)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        vec = ir.VectorType(ir.IntType(8), LANES)
        ty = signature.args

        def ptr(k: int) -> Any:
            arr = context.make_array(ty[k])(context, builder, args[k])
            off = context.cast(builder, args[k + 1], ty[k + 1], types.int64)
            return builder.bitcast(builder.gep(arr.data, [off]), vec.as_pointer()), arr

        src_p, _ = ptr(0)
        dst_p, _ = ptr(2)
        mask_p, mask_arr = ptr(4)
        value = builder.load(src_p, align=1)
        size = builder.extract_value(mask_arr.shape, 0)
        with builder.if_then(builder.icmp_signed(">", size, ir.Constant(ir.IntType(64), 0))):
            builder.store(builder.xor(value, builder.load(mask_p, align=1)), dst_p, align=1)
        with builder.if_then(builder.icmp_signed("==", size, ir.Constant(ir.IntType(64), 0))):
            builder.store(value, dst_p, align=1)
        return context.get_dummy_value()

    return sig, codegen


bytes16: Any = intrinsic(_bytes16_typer)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def dif_pow2(a: U32, row0: int, size: int, w: U32, r2: U32, i4: U32, vt: U32) -> None:
    """In-place forward transform (natural → bit-reversed) of rows [row0, row0 + size).

    If ``vt`` is not empty its entry (Shoup pair) for each row and lane multiplies the
    result (done in the last stage, whose own twiddles are all 1).
    """
    im, imq = i4[0], i4[1]
    if _log2(size) % 2:
        h = size // 2
        for j in range(h):
            dif2_k(a, (row0 + j) * 16, h * 16, r2[0, j], r2[1, j])
        q = size // 8
    else:
        q = size // 4
    while q > 1:
        for b in range(row0, row0 + size, 4 * q):
            for j in range(q):
                dif4_k(a, (b + j) * 16, q * 16, w[0, q + j], w[1, q + j], w[2, q + j],
                       w[3, q + j], w[4, q + j], w[5, q + j], im, imq)
        q //= 4
    v, vq = vt[0], vt[1]
    for b in range(row0, row0 + size, 4):
        dif4_last_k(a, b * 16, v, vq, b * 16, im, imq)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def dit_pow2(a: U32, row0: int, size: int, w: U32, r2: U32, i4: U32, vt: U32) -> None:
    """In-place inverse of :func:`dif_pow2` times ``size`` (inverse-root tables).

    If ``vt`` is not empty the input is first multiplied by it (row and lane wise).
    """
    odd = _log2(size) % 2
    top = size // 2 if odd else size
    im, imq = i4[0], i4[1]
    v, vq = vt[0], vt[1]
    for b in range(row0, row0 + size, 4):
        dit4_first_k(a, b * 16, v, vq, b * 16, im, imq)
    q = 4
    while 4 * q <= top:
        for b in range(row0, row0 + size, 4 * q):
            for j in range(q):
                dit4_k(a, (b + j) * 16, q * 16, w[0, q + j], w[1, q + j], w[2, q + j],
                       w[3, q + j], w[4, q + j], w[5, q + j], im, imq)
        q *= 4
    if odd:
        h = size // 2
        for j in range(h):
            dit2_k(a, (row0 + j) * 16, h * 16, r2[0, j], r2[1, j])


@numba.njit(cache=True, nogil=True, boundscheck=False)
def dif3(a: U32, m: int, r3: U32, w3: U32) -> None:
    """Radix-3 decimation-in-frequency stage over rows j, j + m, j + 2m."""
    for j in range(m):
        dif3_k(a, j * 16, m * 16, r3[0, j], r3[1, j], r3[2, j], r3[3, j], w3[0], w3[1])


@numba.njit(cache=True, nogil=True, boundscheck=False)
def dit3(a: U32, m: int, r3: U32, w3: U32) -> None:
    """Inverse of :func:`dif3` times 3 (inverse-root tables)."""
    for j in range(m):
        dit3_k(a, j * 16, m * 16, r3[0, j], r3[1, j], r3[2, j], r3[3, j], w3[0], w3[1])


# The column passes' copy loops take the lane count (always 16) as an argument: with a
# compile-time 16 LLVM may unroll a lane loop and vectorise across rows instead (strided
# gathers, several times slower).


@numba.njit(cache=True, nogil=True, boundscheck=False)
def scale_rows(a: U32, n1: int, ut: U32, first: int) -> None:
    """Row r of an n1 × 16 buffer times ut[:, first + r] (Shoup pairs)."""
    for r in range(n1):
        scale_k(a, r * 16, ut[0, first + r], ut[1, first + r])


@numba.njit(cache=True, nogil=True, boundscheck=False)
def to_blocks(bits: Bits, blocks: Bits, n1: int, n2: int) -> None:
    """Zero-padded N1 × N2 bit matrix → column blocks: blocks[c0·N1 + 16·r + l] = A[r, c0 + l].

    One sequential read; the N2/16 write streams stay within the TLB, which 16-byte reads
    at a stride of N2 bytes (what a column pass needs) do not.
    """
    length = bits.size
    none = np.zeros(0, np.uint8)
    for r in range(n1):
        for c0 in range(0, n2, 16):
            src = r * n2 + c0
            dst = c0 * n1 + r * 16
            if src + 16 <= length:
                bytes16(bits, src, blocks, dst, none, 0)
            else:
                for lane in range(16):
                    blocks[dst + lane] = bits[src + lane] if src + lane < length else 0


@numba.njit(cache=True, nogil=True, boundscheck=False)
def from_blocks(blocks: Bits, out: Bits, lo: int, xor: Bits, n1: int, n2: int) -> None:
    """out[k] = block-layout bit at natural index lo + k (⊕ xor[k] unless xor is empty)."""
    count = out.size
    use_xor = xor.size > 0
    for r in range(lo // n2, min(n1, (lo + count + n2 - 1) // n2)):
        for c0 in range(0, n2, 16):
            k0 = r * n2 + c0 - lo
            src = c0 * n1 + r * 16
            if k0 >= 0 and k0 + 16 <= count:
                bytes16(blocks, src, out, k0, xor, k0)
            else:
                for lane in range(max(0, -k0), max(0, min(16, count - k0))):
                    bit = blocks[src + lane]
                    out[k0 + lane] = bit ^ xor[k0 + lane] if use_xor else bit


@numba.njit(cache=True, nogil=True, boundscheck=False)
def columns_forward(
    blocks: Bits, tiles: U32, buf: U32, n1: int, n2: int, radix: int,
    w: U32, r2: U32, i4: U32, r3: U32, w3: U32, vt: U32, ut: U32, lanes: int,
) -> None:
    """Transform the columns of a block-layout bit matrix, twiddle, store as row tiles."""
    m = n1 // radix
    for c0 in range(0, n2, 16):
        src = _u64(c0 * n1)
        for k in range(n1 * lanes):
            buf[k] = blocks[src + _u64(k)]
        if radix == 3:
            dif3(buf, m, r3, w3)
        for t in range(radix):
            dif_pow2(buf, t * m, m, w, r2, i4, vt)
        scale_rows(buf, n1, ut, (c0 // 16) * n1)
        for rb in range(n1 // 16):
            transpose16(buf, rb * 256, tiles, rb * n2 * 16 + c0 * 16)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def rows(
    xt: U32, st: U32, n1: int, n2: int,
    w: U32, r2: U32, i4: U32, wi: U32, r2i: U32, i4i: U32,
) -> None:
    """Per 16-row tile: forward row transforms of both, pointwise product, inverse."""
    none = np.zeros((2, 0), np.uint32)
    for t in range(n1 // 16):
        row0 = t * n2
        dif_pow2(xt, row0, n2, w, r2, i4, none)
        dif_pow2(st, row0, n2, w, r2, i4, none)
        for k in range(row0 * 16, (row0 + n2) * 16, 16):
            mont_k(xt, st, k)
        dit_pow2(xt, row0, n2, wi, r2i, i4i, none)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def columns_inverse(
    tiles: U32, buf: U32, blocks: Bits, values: U32, n1: int, n2: int, radix: int,
    w: U32, r2: U32, i4: U32, r3: U32, w3: U32, vt: U32, ut: U32, lanes: int,
) -> None:
    """Gather tiles, untwiddle, inverse column transforms; results in block layout.

    Parities go to ``blocks``; if ``values`` is not empty the residues go there instead.
    """
    m = n1 // radix
    raw = values.size > 0
    for c0 in range(0, n2, 16):
        for rb in range(n1 // 16):
            transpose16(tiles, rb * n2 * 16 + c0 * 16, buf, rb * 256)
        scale_rows(buf, n1, ut, (c0 // 16) * n1)
        for t in range(radix):
            dit_pow2(buf, t * m, m, w, r2, i4, vt)
        if radix == 3:
            dit3(buf, m, r3, w3)
        dst = _u64(c0 * n1)
        if raw:
            for k in range(n1 * lanes):
                values[dst + _u64(k)] = buf[k]
        else:
            for k in range(n1 * lanes):
                blocks[dst + _u64(k)] = np.uint8(buf[k] & 1)
