"""Fused merge kernels: each candidate's chunk is read once, the accumulators stay in cache.

Why compiled loops: a merge written as numpy/torch ops makes one pass over memory per op (sum, min,
max, compare, select: three to six passes over every chunk), so it runs several times slower than
reading its inputs. Here one loop per block of BLOCK elements folds all K candidates into small
accumulators (the K input streams read once, some tens of KB of accumulators in L2).

Exactness: every float operation is the one the reference definition performs, in the same order
(sums left to right over the candidates, then one division), without fast-math reassociation, so
the results are bit-identical to the op-by-op code (tests/test_merge_digests.py). Two patterns keep
the loops vectorised (AVX2): comparisons and min/max run on int32 bit patterns (for non-NaN floats
``x > 0`` iff ``bits(x) > 0``, and ``|x| >= |y|`` iff ``bits(|x|) >= bits(|y|)``); and no loop
writes ``a[j] = x if c else a[j]``, which LLVM turns into masked stores that AMD cores microcode.
Each pass over a block takes two candidates, so the accumulators are loaded and stored once per
two inputs (the operations and their order are unchanged: ``(acc + x) + y``).

Kernels take the K chunks as an int64 array of their addresses (one compiled signature for every
K; the caller keeps the tensors alive) and report whether every value they summed is finite; the
streaming engine's exact check runs only where one is not (negmerge.streaming.Where.check).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

BLOCK = 8192  # elements per accumulator block: 3 x 32 KB, in L2 beside the K input streams
_SIGN = np.int32(-(2**31))  # bits of -0.0
_ABS = np.int32(0x7FFFFFFF)
_INF_BITS = np.int32(0x7F800000)  # |x| bits at or above this: Inf or NaN

_jit = numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")


@intrinsic
def _as_float_pointer(typingctx, address):
    """An int64 address as a float32*, for numba.carray (zero-copy views of the caller's chunks)."""
    signature = types.CPointer(types.float32)(types.int64)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


@_jit
def _chunk(addresses, i, start, m):
    return numba.carray(_as_float_pointer(addresses[i] + 4 * start), m)


@_jit
def unanimous(addresses, n, out):
    """NegMerge's released rule: mean over all K where every candidate is > 0 or every one < 0, else +0.0.

    Requires K >= 2. Returns whether every sum was finite."""
    k = addresses.size
    kf = np.float32(k)
    zero = np.float32(0.0)
    total = np.empty(BLOCK, np.float32)
    low = np.empty(BLOCK, np.int32)
    high = np.empty(BLOCK, np.int32)
    bad = False
    for s in range(0, n, BLOCK):
        m = min(BLOCK, n - s)
        a = _chunk(addresses, 0, s, m)
        b = _chunk(addresses, 1, s, m)
        ai = a.view(np.int32)
        bi = b.view(np.int32)
        for j in range(m):
            total[j] = a[j] + b[j]
            low[j] = min(ai[j], bi[j])
            high[j] = max(ai[j], bi[j])
        for i in range(2, k - 1, 2):
            c = _chunk(addresses, i, s, m)
            d = _chunk(addresses, i + 1, s, m)
            ci = c.view(np.int32)
            di = d.view(np.int32)
            for j in range(m):
                total[j] = (total[j] + c[j]) + d[j]
                low[j] = min(min(low[j], ci[j]), di[j])
                high[j] = max(max(high[j], ci[j]), di[j])
        if k % 2 == 1:
            c = _chunk(addresses, k - 1, s, m)
            ci = c.view(np.int32)
            for j in range(m):
                total[j] += c[j]
                low[j] = min(low[j], ci[j])
                high[j] = max(high[j], ci[j])
        o = out[s : s + m]
        for j in range(m):
            t = total[j]
            bad |= (t - t) != zero  # NaN exactly where t is Inf or NaN
            # all > 0: every pattern positive; all < 0: every pattern negative and none is -0.0
            keep = (low[j] > 0) | ((high[j] < 0) & (low[j] != _SIGN))
            o[j] = (t / kf + zero) if keep else zero  # + 0.0 turns a kept -0.0 into +0.0
    return not bad


@_jit
def _vote_buffers():
    """One block's per-sign sums and counts (_signed_votes fills them)."""
    return (
        np.empty(BLOCK, np.float32),
        np.empty(BLOCK, np.float32),
        np.empty(BLOCK, np.int32),
        np.empty(BLOCK, np.int32),
    )


@_jit
def _sign_means(pos_sum, neg_sum, pos_cnt, neg_cnt, j):
    """Element j's mean over its positive voters and over its negative ones (0 where none voted)."""
    return pos_sum[j] / np.float32(max(pos_cnt[j], 1)), neg_sum[j] / np.float32(max(neg_cnt[j], 1))


@_jit
def _signed_votes(addresses, s, m, below, pos_sum, neg_sum, pos_cnt, neg_cnt):
    """Per element of one block: the sums and counts of the strictly positive and strictly negative
    values, after candidate i's trim (hardshrink: |x| > below[i] is kept, NaN too, so it reaches the
    sums). An exact zero votes for no sign; a trimmed value adds +0.0 to both sums."""
    zero = np.float32(0.0)
    pos_sum[:m] = zero
    neg_sum[:m] = zero
    pos_cnt[:m] = 0
    neg_cnt[:m] = 0
    k = addresses.size
    for i in range(0, k - 1, 2):  # two candidates per pass (module docstring)
        c, d = _chunk(addresses, i, s, m), _chunk(addresses, i + 1, s, m)
        cut_c, cut_d = below[i], below[i + 1]
        for j in range(m):
            x = c[j]
            y = d[j]
            tx = zero if (x >= -cut_c) & (x <= cut_c) else x
            ty = zero if (y >= -cut_d) & (y <= cut_d) else y
            pos_sum[j] = (pos_sum[j] + (zero if tx <= zero else tx)) + (zero if ty <= zero else ty)
            neg_sum[j] = (neg_sum[j] + (zero if tx >= zero else tx)) + (zero if ty >= zero else ty)
            pos_cnt[j] += np.int32(tx > zero) + np.int32(ty > zero)
            neg_cnt[j] += np.int32(tx < zero) + np.int32(ty < zero)
    if k % 2:
        c = _chunk(addresses, k - 1, s, m)
        cut = below[k - 1]
        for j in range(m):
            x = c[j]
            trimmed = zero if (x >= -cut) & (x <= cut) else x
            pos_sum[j] += zero if trimmed <= zero else trimmed  # clamp_min(., 0), NaN kept
            neg_sum[j] += zero if trimmed >= zero else trimmed  # clamp_max(., 0), NaN kept
            pos_cnt[j] += trimmed > zero
            neg_cnt[j] += trimmed < zero


@_jit
def consensus(addresses, n, need, out):
    """NegMerge's generalised threshold (negmerge/merge.py): keep a sign with at least ``need`` strict
    votes and more votes than the other sign; the value is the mean over its voters, else +0.0.

    Returns whether every sum was finite (clamping keeps NaN, so a NaN input reaches the sums)."""
    below = np.zeros(addresses.size, np.float32)  # no trim: every non-zero value votes
    zero = np.float32(0.0)
    pos_sum, neg_sum, pos_cnt, neg_cnt = _vote_buffers()
    bad = False
    for s in range(0, n, BLOCK):
        m = min(BLOCK, n - s)
        _signed_votes(addresses, s, m, below, pos_sum, neg_sum, pos_cnt, neg_cnt)
        o = out[s : s + m]
        for j in range(m):
            mass = pos_sum[j] + neg_sum[j]
            bad |= (mass - mass) != zero
            p = pos_cnt[j]
            q = neg_cnt[j]
            pos_mean, neg_mean = _sign_means(pos_sum, neg_sum, pos_cnt, neg_cnt, j)
            o[j] = pos_mean if (p >= need) & (p > q) else (neg_mean if (q >= need) & (q > p) else zero)
    return not bad


@_jit
def mean(addresses, n, out):
    """The plain mean: ((c0 + c1) + c2 ...) / K. Returns whether every sum was finite."""
    k = addresses.size
    kf = np.float32(k)
    zero = np.float32(0.0)
    total = np.empty(BLOCK, np.float32)
    bad = False
    for s in range(0, n, BLOCK):
        m = min(BLOCK, n - s)
        a = _chunk(addresses, 0, s, m)
        for j in range(m):
            total[j] = a[j]
        for i in range(1, k - 1, 2):
            c = _chunk(addresses, i, s, m)
            d = _chunk(addresses, i + 1, s, m)
            for j in range(m):
                total[j] = (total[j] + c[j]) + d[j]
        if k % 2 == 0:
            c = _chunk(addresses, k - 1, s, m)
            for j in range(m):
                total[j] += c[j]
        o = out[s : s + m]
        for j in range(m):
            t = total[j]
            bad |= (t - t) != zero
            o[j] = t / kf
    return not bad


@_jit
def max_magnitude(addresses, n, out):
    """MagMax: the value of largest |x|, a tie going to the later candidate.

    Returns whether every input was finite (the running max of |x| bits sees an Inf or NaN)."""
    k = addresses.size
    best = np.empty(BLOCK, np.int32)
    best_abs = np.empty(BLOCK, np.int32)
    bad = False
    out_bits = out.view(np.int32)
    for s in range(0, n, BLOCK):
        m = min(BLOCK, n - s)
        ai = _chunk(addresses, 0, s, m).view(np.int32)
        for j in range(m):
            best[j] = ai[j]
            best_abs[j] = ai[j] & _ABS
        for i in range(1, k - 1, 2):
            ci = _chunk(addresses, i, s, m).view(np.int32)
            di = _chunk(addresses, i + 1, s, m).view(np.int32)
            for j in range(m):
                b = best[j]
                ba = best_abs[j]
                y = ci[j]
                y_abs = y & _ABS
                take = -np.int32(y_abs >= ba)
                b ^= (b ^ y) & take
                ba = max(ba, y_abs)
                z = di[j]
                z_abs = z & _ABS
                take = -np.int32(z_abs >= ba)
                best[j] = b ^ ((b ^ z) & take)
                best_abs[j] = max(ba, z_abs)
        if k % 2 == 0:
            ci = _chunk(addresses, k - 1, s, m).view(np.int32)
            for j in range(m):
                y = ci[j]
                y_abs = y & _ABS
                take = -np.int32(y_abs >= best_abs[j])
                best[j] ^= (best[j] ^ y) & take
                best_abs[j] = max(best_abs[j], y_abs)
        o = out_bits[s : s + m]
        for j in range(m):
            o[j] = best[j]
            bad |= best_abs[j] >= _INF_BITS
    return not bad


@_jit
def ties(addresses, n, below, out, undecided, undecided_pos, undecided_neg):
    """TIES trim / elect / disjoint mean (baselines/ties.py has the definition).

    ``below[i]``: candidate i keeps x where |x| > below[i] (hardshrink: NaN is kept, so it reaches
    the check). Writes +0.0 where the elected mass is not > 0 and not < 0, and lists those of them
    that had a trimmed entry (index, positive mean, negative mean) for the majority-sign fix-up.
    Returns (every mass finite, elements elected +, elements elected -, undecided listed).
    """
    zero = np.float32(0.0)
    pos_sum, neg_sum, pos_cnt, neg_cnt = _vote_buffers()
    bad = False
    n_up = 0
    n_down = 0
    n_undecided = 0
    for s in range(0, n, BLOCK):
        m = min(BLOCK, n - s)
        _signed_votes(addresses, s, m, below, pos_sum, neg_sum, pos_cnt, neg_cnt)
        o = out[s : s + m]
        for j in range(m):
            mass = pos_sum[j] + neg_sum[j]
            bad |= (mass - mass) != zero
            pos_mean, neg_mean = _sign_means(pos_sum, neg_sum, pos_cnt, neg_cnt, j)
            up = mass > zero
            down = mass < zero
            n_up += up
            n_down += down
            o[j] = pos_mean if up else (neg_mean if down else zero)
            if not (up | down) and (pos_cnt[j] > 0 or neg_cnt[j] > 0):
                undecided[n_undecided] = s + j
                undecided_pos[n_undecided] = pos_mean
                undecided_neg[n_undecided] = neg_mean
                n_undecided += 1
    return not bad, n_up, n_down, n_undecided


@_jit
def count_and_collect(values, lo, hi, inside):
    """For a top-k cut (baselines/topk_cut.py): count |x| >= hi, and copy each |x| in [lo, hi) to
    ``inside`` (as long as ``values``). NaN is in neither. Returns (count >= hi, copied).

    The values inside are a fraction of a percent, so groups of 64 are counted in a vectorised loop
    and only a group holding some is copied (branch-free: each value is written at the index, which moves
    only past the ones inside)."""
    group = 64
    above = 0
    n_inside = 0
    size = values.size
    for s in range(0, size, group):
        e = min(s + group, size)
        group_above = np.int32(0)
        group_inside = np.int32(0)
        for j in range(s, e):
            v = abs(values[j])
            group_above += np.int32(v >= hi)
            group_inside += np.int32((v >= lo) & (v < hi))
        above += group_above
        if group_inside:
            for j in range(s, e):
                v = abs(values[j])
                inside[n_inside] = v
                n_inside += (v >= lo) & (v < hi)
    return above, n_inside


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment (2^64 / golden ratio)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@_jit
def splitmix64(state):
    """Steele, Lea & Flood's SplitMix64 output function (uint64 wrap-around arithmetic)."""
    z = state
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@_jit
def drop_and_rescale(values, out, key, start, below, keep):
    """DARE's drop (baselines/dare.py): element e = start + j of a tensor is dropped (+0.0) where the
    top 53 bits of splitmix64(key + (e + 1) * golden) are < ``below``, else rescaled to x / keep.

    The bits depend only on (key, e), never on where a chunk starts or which thread runs it.
    Returns 0, 1 where an input is NaN/Inf, or 2 where a kept value overflowed when rescaled."""
    zero = np.float32(0.0)
    bad_in = False
    bad_out = False
    base = key + np.uint64(start) * _GOLDEN
    for j in range(values.size):
        bits = splitmix64(base + np.uint64(j + 1) * _GOLDEN)
        x = values[j]
        scaled = x / keep
        kept = (bits >> np.uint64(11)) >= below
        out[j] = scaled if kept else zero
        bad_in |= (x - x) != zero
        bad_out |= kept & ((scaled - scaled) != zero)
    if bad_in:
        return 1
    return 2 if bad_out else 0


@_jit
def drop_and_rescale_all(addresses, out_addresses, n, keys, start, below, keep):
    """``drop_and_rescale`` for each of the K chunks at ``addresses`` into the chunks at
    ``out_addresses``, in one call. Returns (1, i) for the first candidate i with a NaN/Inf input, else
    (2, i) for the first whose rescaling overflowed, else (0, -1)."""
    overflowed = -1
    for i in range(addresses.size):
        status = drop_and_rescale(
            _chunk(addresses, i, 0, n), _chunk(out_addresses, i, 0, n), keys[i], start, below, keep
        )
        if status == 1:
            return 1, i
        if status == 2 and overflowed < 0:
            overflowed = i
    return (2, overflowed) if overflowed >= 0 else (0, -1)
