"""LLVM vector-IR micro-kernels for the native CPU block-sparse ops (numba intrinsics).

One register-blocked rank-1-update loop in the BLIS style (Van Zee & van de Geijn, "BLIS: A
Framework for Rapidly Instantiating BLAS Functionality", 2015) serves both products: an
``MR x 16*NV`` tile of the result lives in ``MR*NV`` vector registers; each step of the
reduction loads ``NV`` 16-lane vectors of the right operand, broadcasts one element of the
left operand per tile row and does ``MR*NV`` fused multiply-adds (``llvm.fma.v16f32``, which
LLVM lowers to AVX-512 zmm FMAs, or to pairs of AVX2 ones). The two ops differ only in
addressing:

* :func:`bsr_tile` (forward, ``Y = X @ W``): rows of ``X``, reduction over the ``bk`` rows of
  every stored block of one output block-column, summed in registers; ``Y`` written once.
* :func:`sddmm_tile` (``dW`` blocks, ``X.T @ dY`` at one stored block): rows of the block,
  reduction over the batch rows ``M``.

``MR`` and ``NV`` are literal ints, so each pair compiles to its own unrolled tile.

The disk cache of the drivers in ``native.py`` is keyed on both files (``cache.py``), so
editing this one recompiles them.
"""

from __future__ import annotations

try:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - numba is a dependency; checked by ffi.available()
    intrinsic = None

if intrinsic is not None:
    _I32, _I64 = ir.IntType(32), ir.IntType(64)
    _VT = ir.VectorType(ir.FloatType(), 16)

    def _i64(v: int):
        return ir.Constant(_I64, v)

    def _vec_ptr(builder, data, index):
        return builder.bitcast(builder.gep(data, [index]), _VT.as_pointer())

    def _zero_tile(builder, n_rows, n_vec):
        zero = ir.Constant(_VT, [0.0] * 16)
        return [
            [cgutils.alloca_once_value(builder, zero) for _ in range(n_vec)] for _ in range(n_rows)
        ]

    def _accumulate(builder, acc, a, a_base, a_row, a_step, b, b_base, b_step, steps):
        """``acc[r][v] += sum_t a[a_base + r*a_row + t*a_step] * b[b_base + t*b_step + 16v:]``
        for ``0 <= t < steps`` (all strides in elements, i64 values)."""
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_VT, [_VT] * 3), "llvm.fma.v16f32"
        )
        undef = ir.Constant(_VT, ir.Undefined)
        splat0 = ir.Constant(ir.VectorType(_I32, 16), [0] * 16)
        with cgutils.for_range(builder, steps) as loop:
            bt = builder.add(b_base, builder.mul(loop.index, b_step))
            w = [
                builder.load(_vec_ptr(builder, b, builder.add(bt, _i64(16 * v))), align=4)
                for v in range(len(acc[0]))
            ]
            at = builder.add(a_base, builder.mul(loop.index, a_step))
            for r, row in enumerate(acc):
                s = builder.load(builder.gep(a, [builder.add(at, builder.mul(_i64(r), a_row))]))
                bcast = builder.shuffle_vector(
                    builder.insert_element(undef, s, ir.Constant(_I32, 0)), undef, splat0
                )
                for v, cell in enumerate(row):
                    builder.store(builder.call(fma, [bcast, w[v], builder.load(cell)]), cell)

    def _tile_ptrs(builder, out, base, row_stride, n_rows, n_vec):
        """Vector pointers ``out + base + r*row_stride + 16v`` of an ``n_rows x 16n_vec`` tile."""
        rows = [builder.add(base, builder.mul(_i64(r), row_stride)) for r in range(n_rows)]
        return [
            [_vec_ptr(builder, out, builder.add(o, _i64(16 * v))) for v in range(n_vec)]
            for o in rows
        ]

    def _load_tile(builder, out, base, row_stride, n_rows, n_vec):
        """Accumulators initialised from ``out[base + r*row_stride + 16v:][:16]``."""
        ptrs = _tile_ptrs(builder, out, base, row_stride, n_rows, n_vec)
        return [
            [cgutils.alloca_once_value(builder, builder.load(p, align=4)) for p in row]
            for row in ptrs
        ]

    def _store_tile(builder, acc, out, base, row_stride):
        """``out[base + r*row_stride + 16v:][:16] = acc[r][v]``."""
        ptrs = _tile_ptrs(builder, out, base, row_stride, len(acc), len(acc[0]))
        for row, row_ptrs in zip(acc, ptrs, strict=True):
            for cell, ptr in zip(row, row_ptrs, strict=True):
                builder.store(builder.load(cell), ptr, align=4)

    def _literals(*args):
        if all(isinstance(a, types.IntegerLiteral) for a in args):
            return tuple(a.literal_value for a in args)
        return None

    def _arrays(context, builder, signature, args, which):
        return [context.make_array(signature.args[i])(context, builder, args[i]) for i in which]

    def _dims(builder, array):
        return cgutils.unpack_tuple(builder, array.shape)

    @intrinsic
    def bsr_tile(typingctx, x, vals, rows, z0, z1, m0, out, col, cc, mr, nv):
        """``out[m0:m0+MR, col:col+16NV] = sum_{z0<=z<z1} x[m0:m0+MR, rows[z]*bk:][:, :bk]
        @ vals[z][:, cc:cc+16NV]``."""
        sizes = _literals(mr, nv)
        if sizes is None:
            return None
        sig = types.void(x, vals, rows, z0, z1, m0, out, col, cc, mr, nv)

        def codegen(context, builder, signature, args):
            xa, va, ra, oa = _arrays(context, builder, signature, args, (0, 1, 2, 6))
            z0v, z1v, m0v, colv, ccv = (args[i] for i in (3, 4, 5, 7, 8))
            ldx, (_, bk, bn), ldo = _dims(builder, xa)[1], _dims(builder, va), _dims(builder, oa)[1]
            acc = _zero_tile(builder, *sizes)
            with cgutils.for_range(builder, builder.sub(z1v, z0v)) as zl:
                z = builder.add(z0v, zl.index)
                row = builder.sext(builder.load(builder.gep(ra.data, [z])), _I64)
                a_base = builder.add(builder.mul(m0v, ldx), builder.mul(row, bk))
                b_base = builder.add(builder.mul(builder.mul(z, bk), bn), ccv)
                _accumulate(builder, acc, xa.data, a_base, ldx, _i64(1), va.data, b_base, bn, bk)
            _store_tile(builder, acc, oa.data, builder.add(builder.mul(m0v, ldo), colv), ldo)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def sddmm_tile(typingctx, x, dy, z, row, col, kr, cc, m0, m1, out, mr, nv):
        """``out[z, kr:kr+MR, cc:cc+16NV] += x[m0:m1, row*bk+kr:][:, :MR].T @
        dy[m0:m1, col*bn+cc:][:, :16NV]`` (``out``: ``(nnz, bk, bn)``)."""
        sizes = _literals(mr, nv)
        if sizes is None:
            return None
        sig = types.void(x, dy, z, row, col, kr, cc, m0, m1, out, mr, nv)

        def codegen(context, builder, signature, args):
            xa, da, oa = _arrays(context, builder, signature, args, (0, 1, 9))
            zv, rowv, colv, krv, ccv, m0v, m1v = (args[i] for i in range(2, 9))
            ldx, ldy, (_, bk, bn) = _dims(builder, xa)[1], _dims(builder, da)[1], _dims(builder, oa)
            o = builder.add(builder.mul(builder.add(builder.mul(zv, bk), krv), bn), ccv)
            acc = _load_tile(builder, oa.data, o, bn, *sizes)
            a_base = builder.add(builder.mul(m0v, ldx), builder.add(builder.mul(rowv, bk), krv))
            b_base = builder.add(builder.mul(m0v, ldy), builder.add(builder.mul(colv, bn), ccv))
            steps = builder.sub(m1v, m0v)
            _accumulate(builder, acc, xa.data, a_base, _i64(1), ldx, da.data, b_base, ldy, steps)
            _store_tile(builder, acc, oa.data, o, bn)
            return context.get_dummy_value()

        return sig, codegen
