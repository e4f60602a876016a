"""One pass from checkpoint bytes to output bytes: task vectors, merge rule and theta_0 - lam * merged.

Why: merging checkpoints through the engine (negmerge.streaming over sources.DifferenceSource) makes
a float32 copy of every candidate chunk (the difference), a float32 merged tensor, then a pass that
applies it to theta_0 and rounds: three trips through memory per value, each slower than reading the
inputs. ``merge_chunk`` reads theta_0 and the K candidates in their stored dtype (bf16 and fp16 are
widened on their bits, exactly), forms the K differences for one cache-sized block, runs the merge
rule of negmerge.kernels on that block (the very same compiled functions, so the same float
operations in the same order: the results are bit-identical to the engine's), and writes
``theta_0 + coef * merged`` (or the merged vector) rounded to bf16 straight into the output buffer.

Every output element depends on its own inputs only, so a chunk gives the same bits whoever runs
it, wherever it starts and however the work is split. Rounding to bf16 is round-to-nearest-even,
what torch's float32 -> bfloat16 conversion does (a NaN, which the NaN/Inf check never lets through
without an error, becomes 0x7FC0). Other output dtypes come back as float32 for the caller to
convert with torch.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from negmerge import kernels

BLOCK = 4096  # elements per block: K float32 difference rows (8 x 16 KB) beside theta_0's, in L2

# input encodings (``dtype_code``)
BF16, F16, F32 = 0, 1, 2
# merge rules (``rule``): negmerge.kernels' functions
UNANIMOUS, CONSENSUS, MEAN, MAX_MAGNITUDE = 0, 1, 2, 3

_jit = numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")


@intrinsic
def _u16_pointer(typingctx, address):
    signature = types.CPointer(types.uint16)(types.int64)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


@intrinsic
def _f32_pointer(typingctx, address):
    signature = types.CPointer(types.float32)(types.int64)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


_TWO_112 = np.float32(2.0**112)  # 2^(127 - 15): fp16 exponent bias -> fp32's


@_jit
def _widen(address, dtype_code, s, m, dst):  # pragma: no cover (compiled)
    """Elements [s, s + m) of the array at ``address`` as float32 in ``dst`` (exact conversions)."""
    bits = dst.view(np.uint32)
    if dtype_code == F32:
        src = numba.carray(_f32_pointer(address + 4 * s), m)
        for j in range(m):
            dst[j] = src[j]
        return
    half = numba.carray(_u16_pointer(address + 2 * s), m)
    if dtype_code == BF16:  # bf16 is the top half of a float32
        for j in range(m):
            bits[j] = np.uint32(half[j]) << np.uint32(16)
        return
    # fp16: exponent and mantissa shifted into place are a float32 2^112 times too small (normal and
    # subnormal alike: the product is exact); Inf/NaN keep an all-ones exponent; then the sign
    for j in range(m):
        bits[j] = (np.uint32(half[j]) & np.uint32(0x7FFF)) << np.uint32(13)
    for j in range(m):
        dst[j] = dst[j] * _TWO_112
    for j in range(m):
        h = np.uint32(half[j])
        special = (h & np.uint32(0x7C00)) == np.uint32(0x7C00)
        body = (np.uint32(0x7F800000) | ((h & np.uint32(0x03FF)) << np.uint32(13))) if special else bits[j]
        bits[j] = body | ((h & np.uint32(0x8000)) << np.uint32(16))


@_jit
def _apply_rule(rule, addresses, m, need, merged):  # pragma: no cover (compiled)
    if rule == UNANIMOUS:
        return kernels.unanimous(addresses, m, merged)
    if rule == CONSENSUS:
        return kernels.consensus(addresses, m, need, merged)
    if rule == MEAN:
        return kernels.mean(addresses, m, merged)
    return kernels.max_magnitude(addresses, m, merged)


@_jit
def merge_chunk(
    base_address, candidate_addresses, dtype_code, start, n, rule, need, apply, coef, out_address, out_bf16
):  # pragma: no cover (compiled)
    """Merge elements [start, start + n) of one tensor.

    ``base_address`` / ``candidate_addresses``: the data of theta_0 and of the K candidates (int64
    addresses, the caller keeps them alive), all of ``dtype_code``. The task vectors are
    ``float32(theta_i) - float32(theta_0)``; ``rule`` (with ``need`` for CONSENSUS) merges them; the
    result is ``float32(theta_0) + coef * merged`` where ``apply``, else ``merged``; element
    ``start + j`` goes to element j at ``out_address``: bf16 bits where ``out_bf16``, else float32.
    Returns (every value the rule summed was finite, merged elements that are not zero).
    """
    k = candidate_addresses.size
    base = np.empty(BLOCK, np.float32)
    diffs = np.empty((k, BLOCK), np.float32)
    merged = np.empty(BLOCK, np.float32)
    result = np.empty(BLOCK, np.float32)
    result_bits = result.view(np.uint32)
    rows = np.empty(k, np.int64)
    for i in range(k):
        rows[i] = diffs.ctypes.data + 4 * BLOCK * i
    zero = np.float32(0.0)
    finite = True
    nonzero = 0
    for s in range(start, start + n, BLOCK):
        m = min(BLOCK, start + n - s)
        _widen(base_address, dtype_code, s, m, base)
        for i in range(k):
            row = diffs[i]
            _widen(candidate_addresses[i], dtype_code, s, m, row)
            for j in range(m):
                row[j] = row[j] - base[j]
        finite &= _apply_rule(rule, rows, m, need, merged)
        count = 0
        for j in range(m):
            count += np.int64(merged[j] != zero)
        nonzero += count
        if apply:
            for j in range(m):
                result[j] = base[j] + coef * merged[j]
        else:
            for j in range(m):
                result[j] = merged[j]
        if out_bf16:
            out = numba.carray(_u16_pointer(out_address + 2 * (s - start)), m)
            for j in range(m):
                u = result_bits[j]
                rounded = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
                nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
                out[j] = np.uint16(0x7FC0) if nan else np.uint16(rounded)
        else:
            out32 = numba.carray(_f32_pointer(out_address + 4 * (s - start)), m)
            for j in range(m):
                out32[j] = result[j]
    return finite, nonzero
