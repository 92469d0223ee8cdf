"""Window attention without materialising the reference's weight tensor, on NHWC rows.

The reference builds the attention weights w (softmax of the logits) as a (N, nW, G, T, T) tensor and
hands it to the layout, which applies it; that is what lets every operator show its effective
weights. The fast path computes the same operator the way Swin's own code does:

- one GEMM for the projections: the queries (with the 1/sqrt(d) scale folded into their weights),
  the keys and, when the block hands over its value projection (`SpatialMixer(..., value_proj=)`),
  the values too, as Swin's fused qkv;
- the window partition by pad, roll and reshape of the channels_last rows (positions' channels are
  contiguous), as Swin does; where the windows tile the map (tiny at 224 px) the narrower input is
  cut into windows before the projection, otherwise after it, so that padding positions hold zeros
  in q, k and v as the reference pads them. (An earlier form cut maps with one index gather and
  its inverse; on a GPU the gathers and their backward took 35% of local attention's step.)
- the position bias and the shift mask as one additive (nW, G, T, T) term;
- `scaled_dot_product_attention` where its fused kernels take the mask: always on a GPU, and on a
  CPU when the mask needs no gradient (inference, or no learned position bias). The CPU's fused
  kernel cannot return the mask's gradient, and its unfused fallback spends a pass over the logits
  guarding fully masked rows (which windows never have), so training on a CPU runs the three steps
  (q k^T plus the mask, softmax, times v) as Swin does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["window_attention", "attend", "attend_rows", "fusable_projection", "fused_projection", "heads",
           "partition_rows", "merge_rows"]

_CPU_ORDER = [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def fusable_projection(module: nn.Module | None, in_channels: int) -> bool:
    """Whether `module` is a plain 1x1 convolution of `in_channels` (one GEMM per position)."""
    return (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1) and module.stride == (1, 1)
            and module.padding == (0, 0) and module.dilation == (1, 1) and module.groups == 1
            and module.in_channels == in_channels)


def partition_rows(rows: torch.Tensor, layout) -> torch.Tensor:
    """(N, H, W, C) rows -> (N * nW, T, C) windows: pad, roll, cut (the layout's `partition`)."""
    n, c = rows.shape[0], rows.shape[-1]
    (h, w), (hp, wp) = layout.resolution, layout.padded
    if (hp, wp) != (h, w):
        rows = F.pad(rows, (0, 0, 0, wp - w, 0, hp - h))
    if any(layout.shift):
        rows = torch.roll(rows, shifts=(-layout.shift[0], -layout.shift[1]), dims=(1, 2))
    (gh, gw), (wh, ww) = layout.grid, layout.window
    return rows.reshape(n, gh, wh, gw, ww, c).transpose(2, 3).reshape(n * gh * gw, wh * ww, c)


def merge_rows(windows: torch.Tensor, layout, n: int) -> torch.Tensor:
    """(N * nW, T, C) windows -> (N, H, W, C) rows: the inverse of `partition_rows`."""
    c = windows.shape[-1]
    (gh, gw), (wh, ww), (hp, wp) = layout.grid, layout.window, layout.padded
    rows = windows.reshape(n, gh, gw, wh, ww, c).transpose(2, 3).reshape(n, hp, wp, c)
    if any(layout.shift):
        rows = torch.roll(rows, shifts=layout.shift, dims=(1, 2))
    return rows[:, : layout.resolution[0], : layout.resolution[1]]


def _additive_mask(source, layout, dtype) -> torch.Tensor | None:
    """The position bias plus the shift mask (-inf between regions): (nW | 1, G, T, T), or None."""
    mask = None
    if source.position_bias is not None:
        mask = source.position_bias[:, layout.relative_index][None].to(dtype)  # (1, G, T, T)
    if layout.same_region is not None:
        blocked = torch.zeros(layout.same_region.shape, dtype=dtype, device=layout.same_region.device)
        blocked = blocked.masked_fill(~layout.same_region, float("-inf"))[:, None]  # (nW, 1, T, T)
        mask = blocked if mask is None else mask + blocked
    return mask


# Elements of logits one chunk of `_LearnedMaskAttention` holds: 8 MB of float32, so a chunk's mask add,
# softmax and its backward run in the last-level cache (32 MB here) rather than in memory.
CHUNK_ELEMENTS = 1 << 21


def _chunks(n: int, per_image: int, rows: int):
    """(image slice, query-row slice) blocks of (n, ..., rows, T) logits with about CHUNK_ELEMENTS each:
    whole images where one fits (many of them at once), else blocks of one image's query rows."""
    if per_image <= CHUNK_ELEMENTS:
        step = max(1, CHUNK_ELEMENTS // per_image)
        return [(slice(i, min(i + step, n)), slice(None)) for i in range(0, n, step)]
    # images inner: a block of the mask (and of its gradient) stays in cache across the batch
    step = max(1, rows * CHUNK_ELEMENTS // per_image)
    return [(slice(i, i + 1), slice(r, min(r + step, rows))) for r in range(0, rows, step) for i in range(n)]


class _LearnedMaskAttention(torch.autograd.Function):
    """softmax(q k^T + mask) v with the gradient of a mask shared by every image (the learned position
    bias), in cache-sized chunks.

    Autograd's composition of the same steps writes and reads the whole (N, nW, G, T, T) logits about
    ten times (the product, the mask add, the softmax, their gradients, the mask's sum over the batch),
    each time into a freshly allocated buffer; at global attention's 3136 tokens that is 0.9 GB per
    layer and image batch of 8, so the step is bound by memory, not by its FLOPs. Here each chunk's
    logits are added to, softmaxed, used and differentiated while they sit in cache; only the softmax
    P goes to memory (written once, read once by the backward). q, k, v: (N, nW, G, T, Cg); mask:
    (nW | 1, G, T, T). The softmax is kept as one contiguous tensor per chunk, as computed.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask):
        n, t = q.shape[0], q.shape[-2]
        chunks = _chunks(n, q[0].numel() // q.shape[-1] * t, t)
        y = torch.empty_like(v)
        kt = k.transpose(-2, -1)
        probs = []
        for im, rows in chunks:
            s = torch.matmul(q[im, ..., rows, :], kt[im]).add_(mask[..., rows, :])
            torch.ops.aten._softmax.out(s, -1, False, out=s)  # in place: row by row
            probs.append(s)
            y[im, ..., rows, :] = torch.matmul(s, v[im])
        ctx.save_for_backward(q, k, v, mask)
        ctx.chunks, ctx.probs, ctx.mask_shape = chunks, probs, mask.shape
        return y

    @staticmethod
    def backward(ctx, gy):
        q, k, v, mask = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the gradients will be differentiated again
            # the chunks hold the softmax as a constant and write in place: differentiated, they
            # would lose its dependence on q, k and the mask. Autograd's composition keeps it.
            inputs = (q, k, v, mask)
            wanted = [t for t, need in zip(inputs, ctx.needs_input_grad) if need]
            with torch.enable_grad():
                y = torch.matmul(torch.matmul(q, k.transpose(-2, -1)).add(mask).softmax(-1), v)
            grads = iter(torch.autograd.grad(y, wanted, gy, create_graph=True))
            return tuple(next(grads) if need else None for need in ctx.needs_input_grad)
        gq, gk, gv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        gmask = q.new_zeros(ctx.mask_shape, dtype=torch.promote_types(q.dtype, torch.float32))
        for (im, rows), p in zip(ctx.chunks, ctx.probs):
            g = gy[im, ..., rows, :]
            gs = torch.matmul(g, v[im].transpose(-2, -1))
            gv[im] += torch.matmul(p.transpose(-2, -1), g)
            torch.ops.aten._softmax_backward_data.out(gs, p, -1, gs.dtype, grad_input=gs)  # in place
            part = gs.sum(0)  # (nW, G, rows, T): the mask is the same for every image
            gmask[..., rows, :] += part.sum(0, keepdim=True) if ctx.mask_shape[0] == 1 else part
            gq[im, ..., rows, :] = torch.matmul(gs, k[im])
            gk[im] += torch.matmul(gs.transpose(-2, -1), q[im, ..., rows, :])
        return gq, gk, gv, gmask.to(q.dtype)


def attend(q, k, v, mask, n: int) -> torch.Tensor:
    """softmax(q k^T + mask) v over (N * nW, G, T, Cg) windows; q carries the scale already."""
    # torch.export and torch.jit.trace record autograd's composition of the steps, whatever the grad
    # mode: export refused the chunks' in-place softmax where the mask needs a gradient, and trace's
    # check (run without grad) met SDPA where its trace (with grad) had met the chunks
    recorded = torch.jit.is_tracing() or torch.compiler.is_exporting()
    if mask is not None and q.device.type == "cpu" and (
            recorded or mask.requires_grad and torch.is_grad_enabled()):
        if q.dtype == torch.bfloat16 or recorded:  # autocast: autograd's composition, with its fp32 softmax
            logits = torch.matmul(q, k.transpose(-2, -1))
            logits = logits.view(n, -1, *logits.shape[1:]) + mask  # the mask is shared over the batch
            return torch.matmul(logits.softmax(dim=-1).flatten(0, 1), v)

        def split(t):
            return t.view(n, -1, *t.shape[1:])

        return _LearnedMaskAttention.apply(split(q), split(k), split(v), mask).flatten(0, 1)
    if mask is not None and mask.shape[0] > 1:  # one mask per window, the same for every image
        # (N * nW, G, T, T): the windows' masks repeat every nW batch entries, which no broadcast
        # expresses. A mask of one window (no shift: the position bias alone) stays (1, G, T, T):
        # the kernels broadcast it, where expanding it would write the batch's copy of it.
        b, g, t = q.shape[:3]
        mask = mask.expand(b // n, g, t, t)[None].expand(n, b // n, g, t, t).reshape(b, g, t, t)
    if q.device.type == "cpu":  # flash takes the mask where it needs no gradient: try it first
        with sdpa_kernel(_CPU_ORDER, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


def fused_projection(source, value_proj: nn.Module | None):
    """Weight (rows, in) and bias of one linear map giving [q * scale, k] (and v, with `value_proj`)
    at every position: the 1x1 convolutions of `source.qk` (and `value_proj`) stacked."""
    q_w, k_w = source.qk.weight.chunk(2)
    q_b, k_b = source.qk.bias.chunk(2) if source.qk.bias is not None else (None, None)
    pairs = [(q_w * source.scale, None if q_b is None else q_b * source.scale), (k_w, k_b)]
    if value_proj is not None:
        pairs.append((value_proj.weight, value_proj.bias))
    weight = torch.cat([w for w, _ in pairs]).flatten(1)
    if all(b is None for _, b in pairs):
        return weight, None
    return weight, torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in pairs])


def heads(rows: torch.Tensor, parts: int, groups: int) -> tuple[torch.Tensor, ...]:
    """(B, T, parts * C) -> `parts` views (B, G, T, Cg): the heads of q, k (and v), no copy."""
    b, t = rows.shape[:2]
    return rows.view(b, t, parts, groups, -1).permute(2, 0, 3, 1, 4).unbind(0)


def window_attention(source, x: torch.Tensor, context: torch.Tensor, layout,
                     value_proj: nn.Module | None = None) -> torch.Tensor:
    """y (N, C, H, W), channels_last, of a `WindowAttentionWeights` source: queries and keys from
    `context`; values x, or `value_proj(x)` when it is given (then `x` is the context, and one GEMM
    makes all three)."""
    n, g = x.shape[0], source.groups
    weight, bias = fused_projection(source, value_proj)
    parts = weight.shape[0] // source.dim  # q, k (and v)
    rows = context.permute(0, 2, 3, 1)  # (N, H, W, C): a view of a channels_last map
    if layout.padded == layout.resolution:  # cutting is a permutation: cut the narrower input
        qkv = F.linear(partition_rows(rows, layout), weight, bias)
    else:  # padding positions must hold zeros in q, k and v, as the reference pads them
        qkv = partition_rows(F.linear(rows, weight, bias), layout)
    q, k, *v = heads(qkv, parts, g)
    if not v:
        v = heads(partition_rows(x.permute(0, 2, 3, 1), layout), 1, g)
    y = attend(q, k, v[0], _additive_mask(source, layout, q.dtype), n)  # (N * nW, G, T, Cg)
    y = merge_rows(y.transpose(1, 2).flatten(2), layout, n)  # (N, H, W, C)
    return y.permute(0, 3, 1, 2)


def attend_rows(source, x, context, value_proj, core) -> torch.Tensor:
    """y (N, C, H, W), channels_last, of an attention source over the whole map's rows (no windows):
    q, k (and v) from one projection of the rows of `context` (raster order, so q, k and v are views
    of it), attended by `core(q, k, v)` on (N, G, T, d) rows."""
    n, _, h, w = x.shape
    weight, bias = fused_projection(source, value_proj)
    parts = weight.shape[0] // source.dim
    rows = F.linear(context.permute(0, 2, 3, 1).reshape(n, h * w, -1), weight, bias)  # (N, T, parts*C)
    q, k, *v = heads(rows, parts, source.groups)
    if not v:
        v = heads(x.permute(0, 2, 3, 1).reshape(n, h * w, -1), 1, source.groups)
    y = core(q, k, v[0])
    return y.transpose(1, 2).reshape(n, h, w, -1).permute(0, 3, 1, 2)
