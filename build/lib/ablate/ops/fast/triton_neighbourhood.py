"""Triton kernels (GPU) of neighbourhood attention, fused: exactly the K*K keys of every query, no
logits in memory; forward and gradients.

softmax(q k^T + bias over each position's K x K neighbourhood) v has two fused forms among the
route's other candidates (`wide_attention.py`): FlexAttention computes every key of each tile of keys
a tile of queries touches (8.8x to 12.7x the 49 keys a query needs at tiny stage 1), and the logits
in memory write and read (N, G, K*K, H, W) float32 tensors several times a pass. Here a program owns
a tile of query positions of one head and walks the K*K offsets: at each it loads the keys and
values at the shifted positions (zero-padded, masked out beyond the map), adds the score to an online
softmax (running maximum and sum, as flash attention does over tiles of keys) and never writes a
logit. It saves each query's log-sum-exp for the backward, which recomputes the probabilities:

- queries' side (`_na_bwd_q`): dq = sum over offsets of ds k, and each program's sum of ds per
  offset, the bias table's gradient (partial sums per program, added by PyTorch: no atomics);
- keys' side (`_na_bwd_kv`): a program owns a tile of key positions and walks the offsets backwards
  to the queries that see them: dk = sum of ds q, dv = sum of p dO, where ds = p (dO.v - delta) and
  delta = rowsum(dO * O) (PyTorch, before the kernels).

The scores are computed on CUDA cores, a dot product of the head's d channels per offset: these
kernels trade the tensor cores for doing only the operator's FLOPs. The halo kernels (`halo=True`)
make the other trade: a program owns a 4 x 4 tile of queries and the (4 + K - 1)^2 keys around it
(100 at K = 7, in a 128-key tile), computes all their scores with `tl.dot` on the tensor cores and
masks the pairs that are no neighbours (2.6x the operator's scores; FlexAttention's tiles compute
8.8x to 12.7x at tiny stage 1), with no online softmax (the halo is one tile). Their backward
recomputes the probabilities per query tile, stores dq, and adds dk and dv into float32 gradients by
atomic adds (the halos of neighbouring tiles share keys). Which pays is the GPU's to say (the route
times both). q, k, v are (N, G, T, d) with any strides (the views of one projection that
`attention.attend_rows` hands over); the output is (N, G, T, d) over (N, T, G, d) memory, so that
the caller's merge of the heads is a view. Storage may be bf16; everything is computed in float32.

On the CPU these kernels run through Triton's interpreter (TRITON_INTERPRET=1 before importing this
module); the selfcheck does that on small shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ablate.ops.fast.triton_window import _dot, dot_precision

__all__ = ["neighbourhood_attention"]

BLOCK_P = 64  # query (or key) positions a program owns
# The halo kernels' query tile: TILE_H x TILE_W positions (tl.dot's 16 rows) and the keys around it,
# (TILE_H + K - 1) x (TILE_W + K - 1): 100 for K = 7, in a 128-key tile, 2.6x the 49 keys a query needs
# (FlexAttention's tiles: 8.8x to 12.7x at tiny stage 1).
TILE_H, TILE_W = 4, 4


@triton.jit
def _tile(H, W, D, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's image n, head g, positions p (row h, column w, mask pm) and channels d (mask
    dm) of a head: program (image x tile of positions, head)."""
    tiles = tl.cdiv(H * W, BLOCK_P)
    n = (tl.program_id(0) // tiles).to(tl.int64)
    p = (tl.program_id(0) % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    d = tl.arange(0, BLOCK_D)
    return n, tl.program_id(1), p, p // W, p % W, p < H * W, d, d < D


@triton.jit
def _neighbour(h, w, pm, t, H, W, K: tl.constexpr, SIGN: tl.constexpr):
    """Position p + SIGN * d_t of offset t (raster order of the K x K offsets), and whether it lies on
    the map."""
    hh, ww = h + SIGN * (t // K - K // 2), w + SIGN * (t % K - K // 2)
    return hh * W + ww, pm & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)


@triton.jit
def _raw(ptr, n, g, pos, d, mask, sn, sg, st, sc):
    """The (positions, channels) tile of one head of (N, G, T, d) rows, as stored (the tensor cores'
    operands)."""
    return tl.load(ptr + n * sn + g * sg + pos[:, None] * st + d[None, :] * sc, mask=mask, other=0.0)


@triton.jit
def _rows(ptr, n, g, pos, d, mask, sn, sg, st, sc):
    """`_raw` in float32 (the CUDA cores' operands)."""
    return _raw(ptr, n, g, pos, d, mask, sn, sg, st, sc).to(tl.float32)


@triton.jit
def _score(q, k, b_ptr, g, t, sbg, sbt, HAS_BIAS: tl.constexpr):
    """q.k per position, plus the head's bias for offset t."""
    s = tl.sum(q * k, axis=1)
    if HAS_BIAS:
        s += tl.load(b_ptr + g * sbg + t * sbt).to(tl.float32)
    return s


@triton.jit
def _na_fwd(q_ptr, k_ptr, v_ptr, b_ptr, y_ptr, lse_ptr, H, W, D,
            sqn, sqg, sqt, sqc, skn, skg, skt, skc, svn, svg, svt, svc, sbg, sbt,
            syn, syg, syt, syc, sln, slg, slt,
            K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    n, g, p, h, w, pm, d, dm = _tile(H, W, D, BLOCK_P, BLOCK_D)
    rows = pm[:, None] & dm[None, :]
    q = _rows(q_ptr, n, g, p, d, rows, sqn, sqg, sqt, sqc)
    m = tl.full((BLOCK_P,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_P,), tl.float32)
    acc = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
    for t in range(K * K):
        j, ok = _neighbour(h, w, pm, t, H, W, K, 1)
        mask = ok[:, None] & dm[None, :]
        s = _score(q, _rows(k_ptr, n, g, j, d, mask, skn, skg, skt, skc), b_ptr, g, t, sbg, sbt, HAS_BIAS)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, s)
        # a row whose offsets so far all lie beyond the map has no maximum yet: shift by 0 instead
        # of -inf, so that its (zero) terms stay zero rather than NaN
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift)
        e = tl.exp(s - shift)
        total = total * alpha + e
        acc = acc * alpha[:, None] + e[:, None] * _rows(v_ptr, n, g, j, d, mask, svn, svg, svt, svc)
        m = m_new
    # the centre offset always lies on the map: total > 0 at every position of it
    safe = tl.where(pm, total, 1.0)
    tl.store(y_ptr + n * syn + g * syg + p[:, None] * syt + d[None, :] * syc,
             (acc / safe[:, None]).to(y_ptr.dtype.element_ty), mask=rows)
    tl.store(lse_ptr + n * sln + g * slg + p * slt, m + tl.log(safe), mask=pm)


@triton.jit
def _na_bwd_q(q_ptr, k_ptr, v_ptr, b_ptr, gy_ptr, lse_ptr, delta_ptr, gq_ptr, gb_ptr, H, W, D,
              sqn, sqg, sqt, sqc, skn, skg, skt, skc, svn, svg, svt, svc, sbg, sbt,
              syn, syg, syt, syc, sln, slg, slt, sgqn, sgqg, sgqt, sgqc, sgbp, sgbg, sgbt,
              K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    # dq[i] = sum_t ds[i, t] k[i + d_t], ds = p (dO[i].v[i + d_t] - delta[i]); the bias gradient's
    # partial sum over this program's queries, per offset t
    n, g, p, h, w, pm, d, dm = _tile(H, W, D, BLOCK_P, BLOCK_D)
    rows = pm[:, None] & dm[None, :]
    q = _rows(q_ptr, n, g, p, d, rows, sqn, sqg, sqt, sqc)
    gy = _rows(gy_ptr, n, g, p, d, rows, syn, syg, syt, syc)
    lse = tl.load(lse_ptr + n * sln + g * slg + p * slt, mask=pm, other=0.0)
    delta = tl.load(delta_ptr + n * sln + g * slg + p * slt, mask=pm, other=0.0)
    gq = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
    for t in range(K * K):
        j, ok = _neighbour(h, w, pm, t, H, W, K, 1)
        mask = ok[:, None] & dm[None, :]
        kt = _rows(k_ptr, n, g, j, d, mask, skn, skg, skt, skc)
        vt = _rows(v_ptr, n, g, j, d, mask, svn, svg, svt, svc)
        prob = tl.where(ok, tl.exp(_score(q, kt, b_ptr, g, t, sbg, sbt, HAS_BIAS) - lse), 0.0)
        ds = prob * (tl.sum(gy * vt, axis=1) - delta)
        gq += ds[:, None] * kt
        if HAS_BIAS:
            tl.store(gb_ptr + tl.program_id(0).to(tl.int64) * sgbp + g * sgbg + t * sgbt, tl.sum(ds, axis=0))
    tl.store(gq_ptr + n * sgqn + g * sgqg + p[:, None] * sgqt + d[None, :] * sgqc,
             gq.to(gq_ptr.dtype.element_ty), mask=rows)


@triton.jit
def _na_bwd_kv(q_ptr, k_ptr, v_ptr, b_ptr, gy_ptr, lse_ptr, delta_ptr, gk_ptr, gv_ptr, H, W, D,
               sqn, sqg, sqt, sqc, skn, skg, skt, skc, svn, svg, svt, svc, sbg, sbt,
               syn, syg, syt, syc, sln, slg, slt, sgkn, sgkg, sgkt, sgkc,
               K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    # key j is offset t of query i = j - d_t: dk[j] = sum_t ds[i, t] q[i], dv[j] = sum_t p[i, t] dO[i]
    n, g, p, h, w, pm, d, dm = _tile(H, W, D, BLOCK_P, BLOCK_D)
    rows = pm[:, None] & dm[None, :]
    kt = _rows(k_ptr, n, g, p, d, rows, skn, skg, skt, skc)
    vt = _rows(v_ptr, n, g, p, d, rows, svn, svg, svt, svc)
    gk = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
    gv = tl.zeros((BLOCK_P, BLOCK_D), tl.float32)
    for t in range(K * K):
        i, ok = _neighbour(h, w, pm, t, H, W, K, -1)
        mask = ok[:, None] & dm[None, :]
        q = _rows(q_ptr, n, g, i, d, mask, sqn, sqg, sqt, sqc)
        gy = _rows(gy_ptr, n, g, i, d, mask, syn, syg, syt, syc)
        lse = tl.load(lse_ptr + n * sln + g * slg + i * slt, mask=ok, other=0.0)
        delta = tl.load(delta_ptr + n * sln + g * slg + i * slt, mask=ok, other=0.0)
        prob = tl.where(ok, tl.exp(_score(q, kt, b_ptr, g, t, sbg, sbt, HAS_BIAS) - lse), 0.0)
        gv += prob[:, None] * gy
        gk += (prob * (tl.sum(gy * vt, axis=1) - delta))[:, None] * q
    tl.store(gk_ptr + n * sgkn + g * sgkg + p[:, None] * sgkt + d[None, :] * sgkc,
             gk.to(gk_ptr.dtype.element_ty), mask=rows)
    tl.store(gv_ptr + n * sgkn + g * sgkg + p[:, None] * sgkt + d[None, :] * sgkc,
             gv.to(gv_ptr.dtype.element_ty), mask=rows)


@triton.jit
def _halo(H, W, K: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, KP: tl.constexpr):
    """This program's image n, head g, query tile (positions qp, mask qm), the keys of its halo
    (positions kp, mask km), which query-key pairs are neighbours (nb) and their offsets t (raster
    order of the K x K offsets): program (image x tile, head)."""
    R: tl.constexpr = K // 2
    HW: tl.constexpr = TW + K - 1
    cols = tl.cdiv(W, TW)
    tiles = tl.cdiv(H, TH) * cols
    n = (tl.program_id(0) // tiles).to(tl.int64)
    tile = tl.program_id(0) % tiles
    i = tl.arange(0, TH * TW)
    qh, qw = (tile // cols) * TH + i // TW, (tile % cols) * TW + i % TW
    j = tl.arange(0, KP)
    kh, kw = (tile // cols) * TH - R + j // HW, (tile % cols) * TW - R + j % HW
    qm = (qh < H) & (qw < W)
    km = (j < (TH + K - 1) * HW) & (kh >= 0) & (kh < H) & (kw >= 0) & (kw < W)
    dh, dw = kh[None, :] - qh[:, None], kw[None, :] - qw[:, None]
    nb = qm[:, None] & km[None, :] & (dh >= -R) & (dh <= R) & (dw >= -R) & (dw <= R)
    return n, tl.program_id(1), qh * W + qw, qm, kh * W + kw, km, nb, (dh + R) * K + (dw + R)


@triton.jit
def _halo_scores(q, kh, b_ptr, g, nb, t, sbg, sbt, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                 UPCAST: tl.constexpr):
    """q k^T (+ bias) of the tile's queries and its halo's keys; -inf where they are no neighbours."""
    s = _dot(q, tl.trans(kh), IEEE, UPCAST)
    if HAS_BIAS:
        s += tl.load(b_ptr + g * sbg + t * sbt, mask=nb, other=0.0).to(tl.float32)
    return tl.where(nb, s, float("-inf"))


@triton.jit
def _na_halo_fwd(q_ptr, k_ptr, v_ptr, b_ptr, y_ptr, lse_ptr, H, W, D,
                 sqn, sqg, sqt, sqc, skn, skg, skt, skc, svn, svg, svt, svc, sbg, sbt,
                 syn, syg, syt, syc, sln, slg, slt,
                 K: tl.constexpr, HAS_BIAS: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
                 KP: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # a tile of queries against its halo of keys on the tensor cores: the scores of the pairs that
    # are no neighbours are computed and masked (2.6x the operator's at K = 7), no online softmax
    n, g, qp, qm, kp, km, nb, t = _halo(H, W, K, TH, TW, KP)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = _raw(q_ptr, n, g, qp, d, qm[:, None] & dm[None, :], sqn, sqg, sqt, sqc)
    kh = _raw(k_ptr, n, g, kp, d, km[:, None] & dm[None, :], skn, skg, skt, skc)
    vh = _raw(v_ptr, n, g, kp, d, km[:, None] & dm[None, :], svn, svg, svt, svc)
    s = _halo_scores(q, kh, b_ptr, g, nb, t, sbg, sbt, HAS_BIAS, IEEE, UPCAST)
    m = tl.where(qm, tl.max(s, axis=1), 0.0)  # a query off the map has no neighbour: shift by 0
    p = tl.exp(s - m[:, None])
    total = tl.where(qm, tl.sum(p, axis=1), 1.0)  # the centre is a neighbour of every query on the map
    y = _dot(p, vh, IEEE, UPCAST) / total[:, None]
    tl.store(y_ptr + n * syn + g * syg + qp[:, None] * syt + d[None, :] * syc, y.to(y_ptr.dtype.element_ty),
             mask=qm[:, None] & dm[None, :])
    tl.store(lse_ptr + n * sln + g * slg + qp * slt, m + tl.log(total), mask=qm)


@triton.jit
def _na_halo_bwd(q_ptr, k_ptr, v_ptr, b_ptr, gy_ptr, lse_ptr, delta_ptr, gq_ptr, gk_ptr, gv_ptr, gb_ptr,
                 H, W, D, sqn, sqg, sqt, sqc, skn, skg, skt, skc, svn, svg, svt, svc, sbg, sbt,
                 syn, syg, syt, syc, sln, slg, slt, sgqn, sgqg, sgqt, sgqc, sgkn, sgkg, sgkt, sgkc,
                 sgbp, sgbg, sgbt,
                 K: tl.constexpr, HAS_BIAS: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr,
                 KP: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                 OFFSETS: tl.constexpr):
    # p recomputed from the saved log-sum-exp; ds = p (dO v^T - delta). dq = ds k of the tile's own
    # queries (stored); dk = ds^T q and dv = p^T dO of its halo's keys, which neighbouring tiles'
    # halos share: added into float32 gradients (atomics); the bias gradient's per-program sums.
    n, g, qp, qm, kp, km, nb, t = _halo(H, W, K, TH, TW, KP)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    rows, keys = qm[:, None] & dm[None, :], km[:, None] & dm[None, :]
    q = _raw(q_ptr, n, g, qp, d, rows, sqn, sqg, sqt, sqc)
    gy = _raw(gy_ptr, n, g, qp, d, rows, syn, syg, syt, syc)
    kh = _raw(k_ptr, n, g, kp, d, keys, skn, skg, skt, skc)
    vh = _raw(v_ptr, n, g, kp, d, keys, svn, svg, svt, svc)
    lse = tl.load(lse_ptr + n * sln + g * slg + qp * slt, mask=qm, other=0.0)
    delta = tl.load(delta_ptr + n * sln + g * slg + qp * slt, mask=qm, other=0.0)
    p = tl.exp(_halo_scores(q, kh, b_ptr, g, nb, t, sbg, sbt, HAS_BIAS, IEEE, UPCAST) - lse[:, None])
    ds = p * (_dot(gy, tl.trans(vh), IEEE, UPCAST) - delta[:, None])
    gq = _dot(ds, kh, IEEE, UPCAST)
    tl.store(gq_ptr + n * sgqn + g * sgqg + qp[:, None] * sgqt + d[None, :] * sgqc,
             gq.to(gq_ptr.dtype.element_ty), mask=rows)
    halo = n * sgkn + g * sgkg + kp[:, None] * sgkt + d[None, :] * sgkc
    tl.atomic_add(gk_ptr + halo, _dot(tl.trans(ds), q, IEEE, UPCAST), mask=keys)
    tl.atomic_add(gv_ptr + halo, _dot(tl.trans(p), gy, IEEE, UPCAST), mask=keys)
    if HAS_BIAS:  # query i's offset o is halo column (i's row + o's row) * HW + i's column + o's column
        HW: tl.constexpr = TW + K - 1
        i, o = tl.arange(0, TH * TW), tl.arange(0, OFFSETS)
        col = ((i // TW) * HW + i % TW)[:, None] + ((o // K) * HW + o % K)[None, :]
        gb = tl.sum(tl.gather(ds, tl.where(o[None, :] < K * K, col, 0), axis=1), axis=0)
        tl.store(gb_ptr + tl.program_id(0).to(tl.int64) * sgbp + g * sgbg + o * sgbt, gb, mask=o < K * K)


def _heads_like(t: torch.Tensor) -> torch.Tensor:
    """An empty (N, G, T, d) tensor over (N, T, G, d) memory: the heads merge into rows as a view."""
    n, g, tokens, d = t.shape
    return t.new_empty((n, tokens, g, d)).permute(0, 2, 1, 3)


def _launch(q: torch.Tensor, height: int, width: int, kernel_size: int, halo: bool) -> tuple[tuple[int, int],
                                                                                              dict]:
    """The grid (tiles of positions of each image, heads) and the kernels' tiles: of positions in
    raster order, or (halo) TILE_H x TILE_W queries and their halo of keys, on the tensor cores
    (float32 exactly, as the reference: `dot_precision`)."""
    n, g, tokens, d = q.shape
    if not halo:
        return (n * triton.cdiv(tokens, BLOCK_P), g), dict(BLOCK_P=BLOCK_P, BLOCK_D=triton.next_power_of_2(d))
    keys = (TILE_H + kernel_size - 1) * (TILE_W + kernel_size - 1)
    grid = (n * triton.cdiv(height, TILE_H) * triton.cdiv(width, TILE_W), g)
    return grid, dict(TH=TILE_H, TW=TILE_W, KP=max(16, triton.next_power_of_2(keys)),
                      BLOCK_D=max(16, triton.next_power_of_2(d)), **dot_precision(q.dtype))


def _bias_args(bias: torch.Tensor | None, q: torch.Tensor):
    """The bias pointer and strides (g, t); a dummy (never read) without one."""
    return (q, 0, 0) if bias is None else (bias, bias.stride(0), bias.stride(1))


@torch.library.custom_op("ablate::triton_neighbourhood_attention", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, height: int,
                width: int, kernel_size: int, halo: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    y = _heads_like(q)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    grid, tiles = _launch(q, height, width, kernel_size, halo)
    b_ptr, sbg, sbt = _bias_args(bias, q)
    (_na_halo_fwd if halo else _na_fwd)[grid](
        q, k, v, b_ptr, y, lse, height, width, q.shape[3], *q.stride(), *k.stride(), *v.stride(), sbg, sbt,
        *y.stride(), *lse.stride(), K=kernel_size, HAS_BIAS=bias is not None, **tiles)
    return y, lse


@_forward_op.register_fake
def _(q, k, v, bias, height, width, kernel_size, halo=False):
    return _heads_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("ablate::triton_neighbourhood_attention_backward", mutates_args=())
def _backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                 y: torch.Tensor, lse: torch.Tensor, gy: torch.Tensor, height: int, width: int,
                 kernel_size: int, halo: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    """(dq, dk, dv, dbias); dbias is empty without a bias."""
    delta = (gy.float() * y.float()).sum(-1).contiguous()  # (N, G, T): the kernels read it as lse
    grid, tiles = _launch(q, height, width, kernel_size, halo)
    common = dict(K=kernel_size, HAS_BIAS=bias is not None, **tiles)
    b_ptr, sbg, sbt = _bias_args(bias, q)
    gq, gk, gv = _heads_like(q), _heads_like(k), _heads_like(v)
    parts = (torch.empty((grid[0], q.shape[1], kernel_size ** 2), dtype=torch.float32, device=q.device)
             if bias is not None else q.new_empty((1, 1, 1), dtype=torch.float32))
    operands = (*q.stride(), *k.stride(), *v.stride(), sbg, sbt, *gy.stride(), *lse.stride())
    if halo:  # the halos' keys overlap: their gradients meet in float32 by atomic adds
        gk32, gv32 = (torch.zeros(t.shape[0], t.shape[2], t.shape[1], t.shape[3], dtype=torch.float32,
                                  device=t.device).permute(0, 2, 1, 3) for t in (k, v))
        _na_halo_bwd[grid](q, k, v, b_ptr, gy, lse, delta, gq, gk32, gv32, parts, height, width, q.shape[3],
                           *operands, *gq.stride(), *gk32.stride(), *parts.stride(), **common,
                           OFFSETS=triton.next_power_of_2(kernel_size ** 2))
        gk.copy_(gk32), gv.copy_(gv32)
    else:
        _na_bwd_q[grid](q, k, v, b_ptr, gy, lse, delta, gq, parts, height, width, q.shape[3], *operands,
                        *gq.stride(), *parts.stride(), **common)
        _na_bwd_kv[grid](q, k, v, b_ptr, gy, lse, delta, gk, gv, height, width, q.shape[3], *operands,
                         *gk.stride(), **common)
    gb = parts.sum(0).to(bias.dtype) if bias is not None else q.new_empty((0,))
    return gq, gk, gv, gb


@_backward_op.register_fake
def _(q, k, v, bias, y, lse, gy, height, width, kernel_size, halo=False):
    gb = bias.new_empty(bias.shape) if bias is not None else q.new_empty((0,))
    return _heads_like(q), _heads_like(k), _heads_like(v), gb


def _save(ctx, inputs, output):
    q, k, v, bias, height, width, kernel_size, halo = inputs
    y, lse = output
    ctx.save_for_backward(q, k, v, bias, y, lse)
    ctx.geometry = (height, width, kernel_size, halo)


def _grad(ctx, gy, _glse):
    q, k, v, bias, y, lse = ctx.saved_tensors
    gq, gk, gv, gb = _backward_op(q, k, v, bias, y, lse, gy, *ctx.geometry)
    return gq, gk, gv, (gb if bias is not None else None), None, None, None, None


_forward_op.register_autograd(_grad, setup_context=_save)


def neighbourhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                            resolution: tuple[int, int], kernel_size: int,
                            halo: bool = False) -> torch.Tensor:
    """q, k, v (N, G, T, d) rows of an H x W map (any strides), bias (G, K*K) or None -> (N, G, T, d):
    softmax over each position's K x K neighbourhood (the map's part of it) of q.k + bias, times v. The
    scale is q's (folded into its projection). `halo`: the tensor-core kernels (query tiles against
    their halo of keys) instead of the offset-walking ones."""
    return _forward_op(q, k, v, bias, resolution[0], resolution[1], kernel_size, halo)[0]
