/* The three passes of the per-position sliding operators on the CPU, as plain loops.
 *
 *   aggregate: y[n,g,c,i]  = sum_t w[n|0,g,t,i] * x[n,g,c,i+d_t]      (apply per-position weights)
 *   scatter:   gx[n,g,c,j] += w[n|0,g,t,i] * gy[n,g,c,i]  at j = i+d_t (the transpose of aggregate in x)
 *   correlate: o[n|sum,g,t,i] = sum_c a[n,g,c,i] * b[n,g,c,i+d_t]      (logits; the gradient in w)
 *
 * d_t is the t-th offset of the K x K neighbourhood (row-major). Every map is laid out on rows of
 * Wp = W + 2p values (p = K/2): the operand read at shifted positions (x, b) or written there (gx)
 * is zero padded by p on every side plus one spare row (Hp = H + 2p + 1 rows); the others are padded
 * on the right only (H rows of Wp) or copied so into a small per-thread buffer. On that grid each
 * offset is one flat shift dy * Wp + dx, so every tap is one multiply-add over a contiguous run of
 * H * Wp values: long vectorised loops even on 4 x 4 maps (the 2p extra columns per row are computed
 * and dropped; their inputs are zeros). Every output plane is written by one thread (OpenMP over
 * (n, g), or over (g, t) when correlate sums over the batch): no write races, and results that do
 * not depend on the thread count. The weights (and correlate's output, their gradient) are read and
 * written through strides, so a weight tensor laid out position-major (the channels_last output of
 * the 1x1 convolution that predicts it) is used as it is, never copied. Built by
 * ablate/ops/fast/native.py, once per machine.
 */
#include <stdlib.h>
#include <string.h>

#define SKIP(t) (labs((t) / K - p) >= H || labs((t) % K - p) >= W) /* the tap only ever reads zeros */

/* strides (in elements) of a (N, G, TT, H, W) view; sn = 0 broadcasts one weight set over the batch */
typedef struct { long n, g, t, h, w; } Strides;

#define DEFINE(T, S)                                                                                    \
/* the weights of (n, g), any strides -> wg[t] (H x Wp), zeros in the extra columns */                  \
static void to_grid_##S(const T *w, Strides s, long n, long g, T *wg, long TT, long H, long W, long Wp) { \
    const T *base = w + n * s.n + g * s.g;                                                              \
    const long L = H * Wp;                                                                              \
    memset(wg, 0, TT * L * sizeof(T));                                                                  \
    if (s.t < s.w) { /* position-major: the taps of one position are contiguous */                      \
        for (long r = 0; r < H; r++)                                                                    \
            for (long q = 0; q < W; q++)                                                                \
                for (long t = 0; t < TT; t++) wg[t * L + r * Wp + q] = base[t * s.t + r * s.h + q * s.w];  \
    } else {                                                                                            \
        for (long t = 0; t < TT; t++)                                                                   \
            for (long r = 0; r < H; r++)                                                                \
                for (long q = 0; q < W; q++) wg[t * L + r * Wp + q] = base[t * s.t + r * s.h + q * s.w];  \
    }                                                                                                   \
}                                                                                                       \
                                                                                                        \
/* og[t] (H x Wp) -> the planes of (n, g) in out, any strides */                                        \
static void from_grid_##S(const T *og, T *out, Strides s, long n, long g, long TT, long H, long W,      \
                          long Wp) {                                                                    \
    T *base = out + n * s.n + g * s.g;                                                                  \
    const long L = H * Wp;                                                                              \
    if (s.t < s.w) {                                                                                    \
        for (long r = 0; r < H; r++)                                                                    \
            for (long q = 0; q < W; q++)                                                                \
                for (long t = 0; t < TT; t++) base[t * s.t + r * s.h + q * s.w] = og[t * L + r * Wp + q];  \
    } else {                                                                                            \
        for (long t = 0; t < TT; t++)                                                                   \
            for (long r = 0; r < H; r++)                                                                \
                for (long q = 0; q < W; q++) base[t * s.t + r * s.h + q * s.w] = og[t * L + r * Wp + q];  \
    }                                                                                                   \
}                                                                                                       \
                                                                                                        \
/* xp (N,G,C,Hp,Wp), w (strided) -> y (N,G,C,H,W) */                                                    \
void ablate_aggregate_##S(const T *xp, const T *w, T *y, long N, long G, long C, long H, long W,        \
                          long K, long wn, long wgs, long wt, long wh, long ww, int threads) {          \
    const long p = K / 2, Wp = W + 2 * p, Hp = H + 2 * p + 1, TT = K * K, L = H * Wp;                   \
    const Strides s = {wn, wgs, wt, wh, ww};                                                            \
    _Pragma("omp parallel num_threads(threads)")                                                        \
    {                                                                                                   \
        T *wg = malloc(TT * L * sizeof(T)), *yg = malloc(L * sizeof(T));                                \
        _Pragma("omp for schedule(static)")                                                             \
        for (long ng = 0; ng < N * G; ng++) {                                                           \
            to_grid_##S(w, s, ng / G, ng % G, wg, TT, H, W, Wp);                                        \
            for (long c = 0; c < C; c++) {                                                              \
                const T *xc = xp + (ng * C + c) * Hp * Wp;                                              \
                T *yc = y + (ng * C + c) * H * W;                                                       \
                memset(yg, 0, L * sizeof(T));                                                           \
                for (long t = 0; t < TT; t++) {                                                         \
                    if (SKIP(t)) continue;                                                              \
                    const T *wt_ = wg + t * L, *xt = xc + (t / K) * Wp + t % K;                         \
                    _Pragma("omp simd")                                                                 \
                    for (long i = 0; i < L; i++) yg[i] += wt_[i] * xt[i];                               \
                }                                                                                       \
                for (long r = 0; r < H; r++) memcpy(yc + r * W, yg + r * Wp, W * sizeof(T));            \
            }                                                                                           \
        }                                                                                               \
        free(wg);                                                                                       \
        free(yg);                                                                                       \
    }                                                                                                   \
}                                                                                                       \
                                                                                                        \
/* gyp (N,G,C,H,Wp) right-padded, w (strided) -> gxp (N,G,C,Hp,Wp), cropped by the caller */           \
void ablate_scatter_##S(const T *gyp, const T *w, T *gxp, long N, long G, long C, long H, long W,       \
                        long K, long wn, long wgs, long wt, long wh, long ww, int threads) {            \
    const long p = K / 2, Wp = W + 2 * p, Hp = H + 2 * p + 1, TT = K * K, L = H * Wp;                   \
    const Strides s = {wn, wgs, wt, wh, ww};                                                            \
    _Pragma("omp parallel num_threads(threads)")                                                        \
    {                                                                                                   \
        T *wg = malloc(TT * L * sizeof(T));                                                             \
        _Pragma("omp for schedule(static)")                                                             \
        for (long ng = 0; ng < N * G; ng++) {                                                           \
            to_grid_##S(w, s, ng / G, ng % G, wg, TT, H, W, Wp);                                        \
            for (long c = 0; c < C; c++) {                                                              \
                T *gc = gxp + (ng * C + c) * Hp * Wp;                                                   \
                const T *yc = gyp + (ng * C + c) * L;                                                   \
                memset(gc, 0, Hp * Wp * sizeof(T));                                                    \
                for (long t = 0; t < TT; t++) {                                                         \
                    if (SKIP(t)) continue;                                                              \
                    const T *wt_ = wg + t * L;                                                          \
                    T *gt = gc + (t / K) * Wp + t % K;                                                  \
                    _Pragma("omp simd")                                                                 \
                    for (long i = 0; i < L; i++) gt[i] += wt_[i] * yc[i];                               \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        free(wg);                                                                                       \
    }                                                                                                   \
}                                                                                                       \
                                                                                                        \
/* The backward of aggregate in one pass: gx (scatter) and gw (correlate of gy with x) share the
 * weights' grid and every load of gy. gyp (N,G,C,H,Wp) right-padded, xp (N,G,C,Hp,Wp), w (strided)
 * -> gxp (N,G,C,Hp,Wp), cropped by the caller, and gw (strided like w; wn = 0: summed over the batch,
 * one unit per group then, the shared weights gridded once) */                                        \
void ablate_aggregate_backward_##S(const T *gyp, const T *xp, const T *w, T *gxp, T *gw, long N, long G,  \
                                   long C, long H, long W, long K, long wn, long wgs, long wt, long wh,  \
                                   long ww, int threads) {                                              \
    const long p = K / 2, Wp = W + 2 * p, Hp = H + 2 * p + 1, TT = K * K, L = H * Wp;                   \
    const Strides s = {wn, wgs, wt, wh, ww};                                                            \
    const long units = wn == 0 ? G : N * G;                                                             \
    _Pragma("omp parallel num_threads(threads)")                                                        \
    {                                                                                                   \
        T *wg = malloc(TT * L * sizeof(T)), *og = malloc(TT * L * sizeof(T));                           \
        _Pragma("omp for schedule(static)")                                                             \
        for (long u = 0; u < units; u++) {                                                              \
            const long g = u % G, n0 = wn == 0 ? 0 : u / G, n1 = wn == 0 ? N : n0 + 1;                  \
            to_grid_##S(w, s, n0, g, wg, TT, H, W, Wp);                                                 \
            memset(og, 0, TT * L * sizeof(T));                                                          \
            for (long n = n0; n < n1; n++)                                                              \
                for (long c = 0; c < C; c++) {                                                          \
                    const long plane = (n * G + g) * C + c;                                             \
                    const T *yc = gyp + plane * L, *xc = xp + plane * Hp * Wp;                          \
                    T *gc = gxp + plane * Hp * Wp;                                                      \
                    memset(gc, 0, Hp * Wp * sizeof(T));                                                \
                    for (long t = 0; t < TT; t++) {                                                     \
                        if (SKIP(t)) continue;                                                          \
                        const long off = (t / K) * Wp + t % K;                                          \
                        const T *wt_ = wg + t * L, *xt = xc + off;                                      \
                        T *gt = gc + off, *ot = og + t * L;                                             \
                        _Pragma("omp simd")                                                             \
                        for (long i = 0; i < L; i++) {                                                  \
                            gt[i] += wt_[i] * yc[i];                                                    \
                            ot[i] += yc[i] * xt[i];                                                     \
                        }                                                                               \
                    }                                                                                   \
                }                                                                                       \
            from_grid_##S(og, gw, s, n0, g, TT, H, W, Wp);                                              \
        }                                                                                               \
        free(wg);                                                                                       \
        free(og);                                                                                       \
    }                                                                                                   \
}                                                                                                       \
                                                                                                        \
/* ap (N,G,C,H,Wp) right-padded, bp (N,G,C,Hp,Wp) -> out (strided; sn = 0: summed over the batch) */     \
void ablate_correlate_##S(const T *ap, const T *bp, T *out, long N, long G, long C, long H, long W,     \
                          long K, long on, long ogs, long ot, long oh, long ow, int threads) {           \
    const long p = K / 2, Wp = W + 2 * p, Hp = H + 2 * p + 1, TT = K * K, L = H * Wp;                   \
    const Strides s = {on, ogs, ot, oh, ow};                                                            \
    const long units = on == 0 ? G : N * G; /* summed: one unit per group, over the whole batch */      \
    _Pragma("omp parallel num_threads(threads)")                                                        \
    {                                                                                                   \
        T *og = malloc(TT * L * sizeof(T));                                                             \
        _Pragma("omp for schedule(static)")                                                             \
        for (long u = 0; u < units; u++) {                                                              \
            const long g = u % G, n0 = on == 0 ? 0 : u / G, n1 = on == 0 ? N : n0 + 1;                  \
            memset(og, 0, TT * L * sizeof(T));                                                          \
            for (long n = n0; n < n1; n++)                                                              \
                for (long c = 0; c < C; c++) {                                                          \
                    const T *ac = ap + ((n * G + g) * C + c) * L;                                       \
                    const T *bc = bp + ((n * G + g) * C + c) * Hp * Wp;                                 \
                    for (long t = 0; t < TT; t++) {                                                     \
                        if (SKIP(t)) continue;                                                          \
                        T *o = og + t * L;                                                              \
                        const T *bt = bc + (t / K) * Wp + t % K;                                        \
                        _Pragma("omp simd")                                                             \
                        for (long i = 0; i < L; i++) o[i] += ac[i] * bt[i];                             \
                    }                                                                                   \
                }                                                                                       \
            from_grid_##S(og, out, s, on == 0 ? 0 : n0, g, TT, H, W, Wp);                               \
        }                                                                                               \
        free(og);                                                                                       \
    }                                                                                                   \
}

DEFINE(float, f32)
DEFINE(double, f64)
