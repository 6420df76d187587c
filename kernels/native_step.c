/* The spread step on the CPU in one pass over memory (see native.py): element sparsity, and row sparsity (one
   group factor u per row of a (groups, width) tensor).

   The same numbers as the spec's step (kernels/compiled.py: element_step, grouped_step, composed of
   kernels/reference.py): the same IEEE operations on the same values in the same order, each rounded to the
   factors' type (built without contraction into fused multiply-adds and without fast-math). The hyperparameters
   come as doubles, as the spec's float64 `hyper`, and are rounded to the factors' type where the spec's
   0-dimensional float64 tensors meet the factors (a float32 operation with the scalar cast to float32). Sums over a
   row are taken in 16 interleaved partial sums, as vectorised code does (the spec's order differs: the row kernel
   agrees with it to rounding; the element kernel equals the spec compiled by inductor bit for bit, and the eager
   spec to an ulp of eager PyTorch's vectorised float32 square root).

   g is the loss gradient, divided by the grad scale (`scaled`) and negated (`maximize`) on the way in. An entry
   (row) whose weight no longer equals its factors' product was written outside the optimizer: it is left exactly
   as it is and counted, and the caller adopts it. Every other one takes the spec's step:
     element: dU = g*W + 2k*U, dW = g*U + 2k*W;
     rows:    du = sum_row g*W + 2k*u, dW = 2k*W + u*g;
   the base rule (torch's SGD or Adam) moves the factors; the exact-zero pass (hold, revive, snap); theta.
   Last, the optimizer's non-finite-gradient check (spread_nonfinite_*). */

#include <math.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

enum { KAPPA, LR, THRESHOLD, STEP_SIZE_0, BC2_SQRT_0, STEP_SIZE_1, BC2_SQRT_1, BETA1, BETA2, EPS, MOMENTUM,
       DAMPENING, GRAD_SCALE };
enum { SGD = 0, SGD_MOMENTUM = 1, ADAM = 2 };  /* rules */
#define LANES 16

/* dst[0..n) = src[0..n) with non-temporal stores where the CPU has them (x86: the aligned body of the row): a line
   written without being read first is not fetched before it is written (a plain store reads it in first). The
   columns loop writes theta so (its move pass does not read theta: the store's fetch was a fifth of its reads);
   the same values, put in order by STREAM_FENCE before anything else touches them. */
#if defined(__AVX512F__)
#define STREAM_ALIGN 64
#define STREAM_F32(d, s) _mm512_stream_ps(d, _mm512_loadu_ps(s))
#define STREAM_F64(d, s) _mm512_stream_pd(d, _mm512_loadu_pd(s))
#define STREAM_FENCE() _mm_sfence()
#elif defined(__AVX__)
#define STREAM_ALIGN 32
#define STREAM_F32(d, s) _mm256_stream_ps(d, _mm256_loadu_ps(s))
#define STREAM_F64(d, s) _mm256_stream_pd(d, _mm256_loadu_pd(s))
#define STREAM_FENCE() _mm_sfence()
#else
#define STREAM_ALIGN 0  /* (plain stores) */
#define STREAM_F32(d, s) ((void)0)
#define STREAM_F64(d, s) ((void)0)
#define STREAM_FENCE() ((void)0)
#endif
#define DEFINE_STREAM(real, suffix, STREAM)                                                                        \
static inline void stream_##suffix(real *restrict dst, const real *restrict src, int64_t n) {                      \
    const int64_t V = STREAM_ALIGN / (int64_t)sizeof(real);                                                        \
    int64_t i = 0;                                                                                                 \
    for (; STREAM_ALIGN && i < n && ((uintptr_t)(dst + i) & (STREAM_ALIGN - 1)); i++) dst[i] = src[i];             \
    for (; STREAM_ALIGN && i + V <= n; i += V) STREAM(dst + i, src + i);                                           \
    for (; i < n; i++) dst[i] = src[i];                                                                            \
}
DEFINE_STREAM(float, f32, STREAM_F32)
DEFINE_STREAM(double, f64, STREAM_F64)

/* sweep (b) of rows_loop on entry j of the row, partial sums in lane l */
#define ROW_MOVE(real, suffix, j, l) {                                                                                   \
    const real gj = grad_##suffix(g[j], scaled, c), w = Wr[j], t_old = ur * w;                                     \
    real a0 = rule != SGD ? m0[j] : 0, a1 = rule == ADAM ? m1[j] : 0, a2 = amsgrad ? m2[j] : 0;                    \
    const real w1 = rule_##suffix(rule, amsgrad, nesterov, first, 1, w, c->k2 * w + ur * gj, &a0, &a1, &a2, c);    \
    if (rule != SGD) m0[j] = a0;                                                                                   \
    if (rule == ADAM) m1[j] = a1;                                                                                  \
    if (amsgrad) m2[j] = a2;                                                                                       \
    Wr[j] = w1;                                                                                                    \
    gsq[l] += gj * gj; w1sq[l] += w1 * w1; osq[l] += t_old * t_old; wold[l] += w1 * t_old;                         \
}

/* While sweep (b) moves row r (in cache, compute-bound), the lines of row r+1 that its sweeps read are fetched: the
   memory then works while the row is computed (row r+1's first sweep no longer waits on it), which took the row
   kernel on ResNet-18's tensors from 1.8x to 1.4x torch's fused Adam step (benchmarks/native_step.py). */
#define PREFETCH_NEXT_ROW(real) {                                                                                  \
    const int64_t q = o + width + j0;                                                                              \
    for (int64_t b = 0; b < (int64_t)(LANES * sizeof(real)); b += 64) {                                            \
        __builtin_prefetch((const char *)(grad + q) + b, 0, 3);                                                    \
        __builtin_prefetch((const char *)(p + q) + b, 0, 3);                                                       \
        __builtin_prefetch((const char *)(W + q) + b, 0, 3);                                                       \
        if (rule != SGD) __builtin_prefetch((const char *)(sW0 + q) + b, 0, 3);                                    \
        if (rule == ADAM) __builtin_prefetch((const char *)(sW1 + q) + b, 0, 3);                                   \
        if (amsgrad) __builtin_prefetch((const char *)(sW2 + q) + b, 0, 3);                                        \
    }                                                                                                              \
}

#define DEFINE_KERNELS(real, suffix, SQRT, FABS)                                                                   \
typedef struct { real k2, lr, thr, scale, c1, b2, c2, eps, ss[2], bc[2], mom, cd, sign; } consts_##suffix;         \
                                                                                                                   \
static inline consts_##suffix consts_of_##suffix(const double *h, real sign) {                                     \
    consts_##suffix c = {(real)(2.0 * h[KAPPA]), (real)h[LR], (real)h[THRESHOLD], (real)h[GRAD_SCALE],             \
                         (real)(1.0 - h[BETA1]), (real)h[BETA2], (real)(1.0 - h[BETA2]), (real)h[EPS],             \
                         {(real)h[STEP_SIZE_0], (real)h[STEP_SIZE_1]}, {(real)h[BC2_SQRT_0], (real)h[BC2_SQRT_1]},  \
                         (real)h[MOMENTUM], (real)(1.0 - h[DAMPENING]), sign};                                      \
    return c;                                                                                                      \
}                                                                                                                  \
                                                                                                                   \
/* the loss gradient of an entry */                                                                                \
static inline real grad_##suffix(real g, int scaled, const consts_##suffix *c) {                                   \
    if (scaled) g = g / c->scale;                                                                                  \
    return g * c->sign;                                                                                            \
}                                                                                                                  \
                                                                                                                   \
/* the base rule on one entry of factor `which` (0: U or u, 1: W): x moved by gradient d; the state (s0, s1, s2:   \
   Adam's exp_avg, exp_avg_sq, max_exp_avg_sq; SGD's momentum buffer) updated in place (torch's Adam and SGD) */    \
static inline real rule_##suffix(int rule, int amsgrad, int nesterov, int first, int which, real x, real d,       \
                                 real *s0, real *s1, real *s2, const consts_##suffix *c) {                        \
    if (rule == ADAM) {                                                                                            \
        const real m = *s0 + c->c1 * (d - *s0);                                                                    \
        const real v = *s1 * c->b2 + (c->c2 * d) * d;                                                              \
        real vv = v;                                                                                               \
        if (amsgrad) { vv = *s2 > v ? *s2 : v; *s2 = vv; }                                                         \
        *s0 = m; *s1 = v;                                                                                          \
        return x - c->ss[which] * (m / (SQRT(vv) / c->bc[which] + c->eps));                                        \
    }                                                                                                              \
    if (rule == SGD) return x - c->lr * d;                                                                         \
    const real b = first ? d : *s0 * c->mom + c->cd * d;                                                           \
    *s0 = b;                                                                                                       \
    return x - c->lr * (nesterov ? d + c->mom * b : b);                                                            \
}                                                                                                                  \
                                                                                                                   \
static inline __attribute__((always_inline)) int64_t element_loop_##suffix(                                       \
        int64_t n, int64_t width, int64_t inner, const real *restrict grad, real *restrict p, real *restrict U,     \
        real *restrict W, real *restrict sU0, real *restrict sU1, real *restrict sU2, real *restrict sW0, real *restrict sW1,        \
        real *restrict sW2, void *pre, const consts_##suffix *restrict c, int rule, int amsgrad, int nesterov,     \
        int first, int scaled) {                                                                                   \
    (void)width; (void)inner; (void)pre;                                                                           \
    int64_t changed = 0;                                                                                           \
    for (int64_t i = 0; i < n; i++) {                                                                              \
        const real g = grad_##suffix(grad[i], scaled, c);                                                          \
        const real u = U[i], w = W[i], t = p[i], theta_old = u * w;                                                \
        const int keep = theta_old != t;                                                                           \
        changed += keep;                                                                                           \
        const int dead = (u == 0) & (w == 0);                                                                      \
        /* the states as they were (a first momentum buffer is read too: kept entries keep it) */                  \
        const real a0 = rule != SGD ? sU0[i] : 0, b0 = rule != SGD ? sW0[i] : 0;                                   \
        const real a1 = rule == ADAM ? sU1[i] : 0, b1 = rule == ADAM ? sW1[i] : 0;                                 \
        const real a2 = amsgrad ? sU2[i] : 0, b2 = amsgrad ? sW2[i] : 0;                                           \
        real na0 = a0, na1 = a1, na2 = a2, nb0 = b0, nb1 = b1, nb2 = b2;                                           \
        const real u1 = rule_##suffix(rule, amsgrad, nesterov, first, 0, u, g * w + c->k2 * u, &na0, &na1, &na2, c);\
        const real w1 = rule_##suffix(rule, amsgrad, nesterov, first, 1, w, g * u + c->k2 * w, &nb0, &nb1, &nb2, c);\
        /* the exact-zero pass: hold, revive, snap */                                                              \
        const real theta = u1 * w1, excess = FABS(g) - c->k2;                                                      \
        const int revive = dead & (excess > 0);                                                                    \
        const int settled = (FABS(theta) <= FABS(theta_old)) | (excess <= 0);                                     \
        const int snap = (!dead) & (((FABS(theta) <= c->thr) & settled) | (theta * theta_old < 0));                \
        const int zero = (dead & !revive) | snap;                                                                  \
        const real s = SQRT(c->lr * (excess > 0 ? excess : 0));                                                    \
        const real sg = (real)((g > 0) - (g < 0));                                                                 \
        const real u2 = revive ? s : (zero ? 0 : u1);                                                              \
        const real w2 = revive ? 0 - sg * s : (zero ? 0 : w1);                                                     \
        U[i] = keep ? u : u2;                                                                                      \
        W[i] = keep ? w : w2;                                                                                      \
        p[i] = keep ? t : u2 * w2;                                                                                 \
        if (rule != SGD) { sU0[i] = keep ? a0 : na0; sW0[i] = keep ? b0 : nb0; }                                   \
        if (rule == ADAM) { sU1[i] = keep ? a1 : na1; sW1[i] = keep ? b1 : nb1; }                                  \
        if (amsgrad) { sU2[i] = keep ? a2 : na2; sW2[i] = keep ? b2 : nb2; }                                       \
    }                                                                                                              \
    return changed;                                                                                                \
}                                                                                                                  \
                                                                                                                   \
static inline real total_##suffix(const real *acc) {                                                               \
    real t = 0;                                                                                                    \
    for (int l = 0; l < LANES; l++) t += acc[l];                                                                   \
    return t;                                                                                                      \
}                                                                                                                  \
                                                                                                                   \
/* rows: n rows of `width` entries, u and its state one per row. Three sweeps of a row, which stays in cache:      \
   (a) is any weight written outside, the saddle test (||W||^2), sum g*W; (b) the base rule on u and on W, and     \
   the sums of the zero pass (||g||^2, ||W_moved||^2, ||theta_old||^2, <W_moved, theta_old>); (c) the zero pass    \
   and theta. Rows of one entry take one vectorised loop over the rows instead. Returns the number of rows left   \
   for adoption. */                                                                                                \
static inline __attribute__((always_inline)) int64_t rows_loop_##suffix(                                          \
        int64_t n, int64_t width, int64_t inner, const real *restrict grad, real *restrict p, real *restrict u,     \
        real *restrict W, real *restrict su0, real *restrict su1, real *restrict su2, real *restrict sW0,          \
        real *restrict sW1, real *restrict sW2, void *pre, const consts_##suffix *restrict c, int rule,            \
        int amsgrad, int nesterov, int first, int scaled) {                                                        \
    (void)inner; (void)pre;                                                                                        \
    int64_t changed = 0;                                                                                           \
    if (width == 1) {  /* one entry per row (biases, norms' scales): rows side by side, vectorised, the same numbers */ \
        for (int64_t r = 0; r < n; r++) {                                                                          \
            const real gj = grad_##suffix(grad[r], scaled, c), w = W[r], ur = u[r], pw = p[r], t_old = ur * w;     \
            const int written = t_old != pw;                                                                       \
            changed += written;                                                                                    \
            const int dead = (ur == 0) & ((w * w) + (real)0 == 0);  /* (a sum of one term: x + 0, as the sweeps') */ \
            real ua0 = rule != SGD ? su0[r] : 0, ua1 = rule == ADAM ? su1[r] : 0, ua2 = amsgrad ? su2[r] : 0;      \
            real wa0 = rule != SGD ? sW0[r] : 0, wa1 = rule == ADAM ? sW1[r] : 0, wa2 = amsgrad ? sW2[r] : 0;      \
            const real o0 = ua0, o1 = ua1, o2 = ua2, q0 = wa0, q1 = wa1, q2 = wa2;                                 \
            const real u1 = rule_##suffix(rule, amsgrad, nesterov, first, 0, ur, ((gj * w) + (real)0) + c->k2 * ur, &ua0, &ua1, &ua2, c); \
            const real w1 = rule_##suffix(rule, amsgrad, nesterov, first, 1, w, c->k2 * w + ur * gj, &wa0, &wa1, &wa2, c); \
            const real gnorm = SQRT((gj * gj) + (real)0), excess = gnorm - c->k2;                                  \
            const int revive = dead & (excess > 0);                                                                \
            const real theta_norm = FABS(u1) * SQRT((w1 * w1) + (real)0);                                          \
            const int settled = (theta_norm <= SQRT((t_old * t_old) + (real)0)) | (excess <= 0);                   \
            const int snap = (!dead) & (((theta_norm <= c->thr) & settled) | (u1 * ((w1 * t_old) + (real)0) < 0)); \
            const int zero = (dead & !revive) | snap;                                                              \
            const real s = SQRT(c->lr * (excess > 0 ? excess : 0));                                                \
            const real direction = revive ? -s / gnorm : 0;                                                        \
            const int keep = !zero & !revive;                                                                      \
            const real u2 = revive ? s : (keep ? u1 : 0), w2 = (keep ? w1 : 0) + gj * direction;                   \
            W[r] = written ? w : w2;                                                                               \
            p[r] = written ? pw : u2 * w2;                                                                         \
            u[r] = written ? ur : u2;                                                                              \
            if (rule != SGD) { su0[r] = written ? o0 : ua0; sW0[r] = written ? q0 : wa0; }                         \
            if (rule == ADAM) { su1[r] = written ? o1 : ua1; sW1[r] = written ? q1 : wa1; }                        \
            if (amsgrad) { su2[r] = written ? o2 : ua2; sW2[r] = written ? q2 : wa2; }                             \
        }                                                                                                          \
        return changed;                                                                                            \
    }                                                                                                              \
    const int64_t body = width - width % LANES;                                                                    \
    for (int64_t r = 0; r < n; r++) {                                                                              \
        const int64_t o = r * width;                                                                               \
        const real *restrict g = grad + o;                                                                         \
        real *restrict pr = p + o, *restrict Wr = W + o, *restrict m0 = sW0 + o, *restrict m1 = sW1 + o;           \
        real *restrict m2 = sW2 + o;                                                                               \
        const real ur = u[r];                                                                                      \
        real wsq[LANES] = {0}, gw[LANES] = {0};                                                                    \
        int diff[LANES] = {0};                                                                                     \
        for (int64_t j0 = 0; j0 < width; j0 += LANES) {                                                            \
            if (j0 < body) {                                                                                       \
                for (int l = 0; l < LANES; l++) {                                                                  \
                    const int64_t j = j0 + l;                                                                      \
                    const real w = Wr[j];                                                                          \
                    diff[l] |= ur * w != pr[j];                                                                    \
                    wsq[l] += w * w;                                                                               \
                    gw[l] += grad_##suffix(g[j], scaled, c) * w;                                                   \
                }                                                                                                  \
            } else {                                                                                               \
                for (int64_t j = j0; j < width; j++) {                                                             \
                    const real w = Wr[j];                                                                          \
                    diff[0] |= ur * w != pr[j];                                                                    \
                    wsq[j - j0] += w * w;                                                                          \
                    gw[j - j0] += grad_##suffix(g[j], scaled, c) * w;                                              \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
        int any = 0;                                                                                               \
        for (int l = 0; l < LANES; l++) any |= diff[l];                                                            \
        if (any) { changed++; continue; }                                                                          \
        const int dead = (ur == 0) & (total_##suffix(wsq) == 0);                                                   \
        real ua0 = rule != SGD ? su0[r] : 0, ua1 = rule == ADAM ? su1[r] : 0, ua2 = amsgrad ? su2[r] : 0;          \
        const real u1 = rule_##suffix(rule, amsgrad, nesterov, first, 0, ur, total_##suffix(gw) + c->k2 * ur,     \
                                      &ua0, &ua1, &ua2, c);                                                        \
        if (rule != SGD) su0[r] = ua0;                                                                             \
        if (rule == ADAM) su1[r] = ua1;                                                                            \
        if (amsgrad) su2[r] = ua2;                                                                                 \
        real gsq[LANES] = {0}, w1sq[LANES] = {0}, osq[LANES] = {0}, wold[LANES] = {0};                             \
        for (int64_t j0 = 0; j0 < width; j0 += LANES) {                                                            \
            if (j0 < body) {                                                                                       \
                PREFETCH_NEXT_ROW(real)                                                                            \
                for (int l = 0; l < LANES; l++)                                                                    \
                    ROW_MOVE(real, suffix, j0 + l, l)                                                                    \
            } else {                                                                                               \
                for (int64_t j = j0; j < width; j++)                                                               \
                    ROW_MOVE(real, suffix, j, j - j0)                                                                    \
            }                                                                                                      \
        }                                                                                                          \
        /* the exact-zero pass of the row */                                                                       \
        const real gnorm = SQRT(total_##suffix(gsq)), excess = gnorm - c->k2;                                      \
        const int revive = dead & (excess > 0);                                                                    \
        const real theta_norm = FABS(u1) * SQRT(total_##suffix(w1sq));                                             \
        const int settled = (theta_norm <= SQRT(total_##suffix(osq))) | (excess <= 0);                             \
        const int snap = (!dead) & (((theta_norm <= c->thr) & settled) | (u1 * total_##suffix(wold) < 0));         \
        const int zero = (dead & !revive) | snap;                                                                  \
        const real s = SQRT(c->lr * (excess > 0 ? excess : 0));                                                    \
        const real direction = revive ? -s / gnorm : 0;                                                            \
        const int keep = !zero & !revive;                                                                          \
        const real u2 = revive ? s : (keep ? u1 : 0);                                                              \
        for (int64_t j = 0; j < width; j++) {                                                                      \
            const real w2 = (keep ? Wr[j] : 0) + grad_##suffix(g[j], scaled, c) * direction;                      \
            Wr[j] = w2;                                                                                            \
            pr[j] = u2 * w2;                                                                                       \
        }                                                                                                          \
        u[r] = u2;                                                                                                 \
    }                                                                                                              \
    return changed;                                                                                                \
}

/* the base rule on W's entry e (of column k) in sweep (b) of columns_loop */
#define COLUMN_MOVE(real, suffix, e)                                                                                  \
            const real gk = grad_##suffix(gi[e], scaled, c), w = wi[e], t_old = uo[k] * w;                            \
            real a0 = rule != SGD ? m0[e] : 0, a1 = rule == ADAM ? m1[e] : 0, a2 = amsgrad ? m2[e] : 0;               \
            const real w1 = rule_##suffix(rule, amsgrad, nesterov, first, 1, w, c->k2 * w + uo[k] * gk, &a0, &a1, &a2, c); \
            if (rule != SGD) m0[e] = a0;                                                                              \
            if (rule == ADAM) m1[e] = a1;                                                                             \
            if (amsgrad) m2[e] = a2;

/* the same for a live group when no group of the tensor is dead: W and theta written (w1 + g*0: the held and
   revived groups' arithmetic, whose terms are 0 here) */
#define COLUMN_MOVE_KEPT(real, suffix, e)                                                                             \
            COLUMN_MOVE(real, suffix, e)                                                                              \
            const real w2 = w1 + gk * (real)0;                                                                        \
            wi[e] = w2; tb[e] = up[k] * w2;

#define DEFINE_COLUMNS(real, suffix, SQRT, FABS)                                                                      \
/* columns: n rows of K = G*r entries (the canonical (rows, G, r) view, flattened to (n, K)); group j is entries      \
   j*r .. j*r+r-1 of every row; u and its state one per group. A group's sums run over all rows, so the passes go     \
   over the whole tensor, row by row:                                                                                 \
   (a) what must be known before W moves: per entry, sums over the rows of g*W and theta_old^2 (and, where some u is  \
       0, ||W||^2 and ||g||^2: a dead group's zero pass, hold or revive, is decided before W moves), and the written  \
       test (a flag per row; per entry only in a row with a written weight); then per group the base rule on u;       \
   (b) the base rule on W, the new W and theta (a live group tentatively kept), and the sums of a live group's snap   \
       test (||W_moved||^2, <W_moved, theta_old>);                                                                    \
   (c) per live group the snap test (its ||g||^2 summed, in one sweep over the rows, only for the groups whose theta  \
       is at most the threshold); the entries of the groups that snap are zeroed in one sweep over the rows. A group  \
       with a weight written outside the optimizer is saved after (a) and put back after (b), exactly as it was.      \
   The sweeps are memory-bound, and a running sum costs a load and a store per entry: the passes keep as few as       \
   the step needs, and where the sums outgrow the L1 cache (rows over 4 KB) they take two rows at once (each sum      \
   loaded and stored once per pair, the same additions in the same order). Returns the number of groups left for      \
   adoption (-1: no memory for the scratch; then nothing has moved). */                                               \
typedef struct { real *scratch; int64_t *list; int *diffs, *mode; } colsums_##suffix;  /* (a)'s results */        \
                                                                                                                      \
/* sweep (a), which moves nothing, into s (its scratch freed by columns_loop, or by the caller when that does not     \
   run); returns -1 (no memory: nothing allocated), else 1 when a sum g*W is not finite (a gradient's inf or NaN      \
   always makes its sum so; finite gradients only when the sum overflows), else 0 */                                  \
static inline __attribute__((always_inline)) int columns_sums_##suffix(                                               \
        int64_t n, int64_t K, int64_t r, const real *restrict grad, const real *restrict p, const real *restrict u,   \
        const real *restrict W, const consts_##suffix *restrict c, int scaled, colsums_##suffix *s) {                 \
    s->scratch = NULL; s->list = NULL; s->diffs = NULL; s->mode = NULL;                                               \
    if (n == 0 || K == 0 || r == 0) return 0;                                                                         \
    const int64_t G = K / r, S = K + 16;  /* (scratch arrays S apart: not 4 KB apart, no false store-to-load waits) */ \
    real *scratch = calloc((size_t)(12 * S + 2 * G), sizeof(real));  /* (the last 2 S: theta's rows, see stream) */ \
    int64_t *list = malloc(sizeof(int64_t) * (size_t)K);                                                              \
    int *diffs = calloc((size_t)K, sizeof(int)), *mode = calloc((size_t)G, sizeof(int));                              \
    if (!scratch || !list || !diffs || !mode) { free(scratch); free(list); free(diffs); free(mode); return -1; }      \
    s->scratch = scratch; s->list = list; s->diffs = diffs; s->mode = mode;                                           \
    real *restrict uo = scratch, *restrict gw = uo + S, *restrict wsq = gw + S, *restrict gsq = wsq + S;              \
    real *restrict osq = gsq + S;                                                                                     \
    int dead_possible = 0;  /* (a dead group has u = 0) */                                                            \
    for (int64_t j = 0; j < G; j++) dead_possible |= u[j] == 0;                                                       \
    for (int64_t k = 0; k < K; k++) uo[k] = u[k / r];                                                                 \
    const int pairs = K * (int64_t)sizeof(real) > 4096;                                                               \
    for (int64_t i = 0, o; i < n; i += o ? 2 : 1) {                         /* (a) */                                 \
        o = pairs && !dead_possible && i + 1 < n ? K : 0;  /* (row i+1's offset when it is taken with row i) */       \
        const real *restrict gi = grad + i * K, *restrict pi = p + i * K, *restrict wi = W + i * K;                   \
        int rowdiff = 0;  /* (a weight written outside: rare; its entries are found after the row) */                 \
        if (dead_possible) {                                                                                          \
            _Pragma("GCC ivdep") for (int64_t k = 0; k < K; k++) {                                                    \
                const real w = wi[k], gk = grad_##suffix(gi[k], scaled, c), t = uo[k] * w;                            \
                rowdiff |= t != pi[k];                                                                                \
                gw[k] += gk * w; osq[k] += t * t; wsq[k] += w * w; gsq[k] += gk * gk;                                 \
            }                                                                                                         \
        } else if (o) {                                                                                               \
            _Pragma("GCC ivdep") for (int64_t k = 0; k < K; k++) {                                                    \
                const real w = wi[k], t = uo[k] * w, v = wi[o + k], s = uo[k] * v;                                    \
                rowdiff |= (t != pi[k]) | (s != pi[o + k]);                                                           \
                gw[k] = (gw[k] + grad_##suffix(gi[k], scaled, c) * w) + grad_##suffix(gi[o + k], scaled, c) * v;      \
                osq[k] = (osq[k] + t * t) + s * s;                                                                    \
            }                                                                                                         \
        } else {                                                                                                      \
            _Pragma("GCC ivdep") for (int64_t k = 0; k < K; k++) {                                                    \
                const real w = wi[k], t = uo[k] * w;                                                                  \
                rowdiff |= t != pi[k];                                                                                \
                gw[k] += grad_##suffix(gi[k], scaled, c) * w; osq[k] += t * t;                                        \
            }                                                                                                         \
        }                                                                                                             \
        if (rowdiff)                                                                                                  \
            for (int64_t k = 0; k < K; k++) diffs[k] |= (uo[k] * wi[k] != pi[k]) | (o && uo[k] * wi[o + k] != pi[o + k]); \
    }                                                                                                                 \
    int nonfinite = 0;                                                                                                \
    for (int64_t k = 0; k < K; k++) nonfinite |= !(gw[k] - gw[k] == 0);                                              \
    return nonfinite;                                                                                                 \
}                                                                                                                     \
                                                                                                                      \
/* sweep (a), unless `pre` holds its results (columns_sums: then the caller has checked them), and the rest */       \
static inline __attribute__((always_inline)) int64_t columns_loop_##suffix(                                           \
        int64_t n, int64_t K, int64_t r, const real *restrict grad, real *restrict p, real *restrict u,               \
        real *restrict W, real *restrict su0, real *restrict su1, real *restrict su2, real *restrict sW0,             \
        real *restrict sW1, real *restrict sW2, void *pre, const consts_##suffix *restrict c, int rule, int amsgrad,  \
        int nesterov, int first, int scaled) {                                                                        \
    colsums_##suffix own, *sums = pre;                                                                                \
    if (!sums) {                                                                                                      \
        sums = &own;                                                                                                  \
        if (columns_sums_##suffix(n, K, r, grad, p, u, W, c, scaled, sums) < 0) return -1;                            \
    }                                                                                                                 \
    if (!sums->scratch) return 0;  /* (an empty tensor) */                                                            \
    const int64_t G = K / r, S = K + 16;                                                                              \
    real *scratch = sums->scratch;                                                                                    \
    int64_t *list = sums->list;                                                                                       \
    int *diffs = sums->diffs, *mode = sums->mode;                                                                     \
    real *restrict uo = scratch, *restrict gw = uo + S, *restrict wsq = gw + S, *restrict gsq = wsq + S;              \
    real *restrict osq = gsq + S, *restrict w1sq = osq + S, *restrict wold = w1sq + S;                                \
    real *restrict up = wold + S, *restrict dir = up + S, *restrict keep = dir + S, *restrict u1g = keep + S;         \
    real *restrict norm = u1g + G;  /* (per group: u's new value above, theta's new norm here) */                     \
    real *restrict tb = norm + G;  /* (theta's new rows, streamed out) */                                             \
    const int pairs = K * (int64_t)sizeof(real) > 4096;                                                               \
    int64_t changed = 0, written = 0, held = 0, snapped = 0;                                                          \
    for (int64_t j = 0; j < G; j++) {                                                                                 \
        int any = 0;                                                                                                  \
        for (int64_t k = j * r; k < j * r + r; k++) any |= diffs[k];                                                  \
        mode[j] = any ? 2 : 0;                                                                                        \
        if (any) for (int64_t k = j * r; k < j * r + r; k++) list[written++] = k;                                     \
        changed += any;                                                                                               \
    }                                                                                                                 \
    real *saved = written ? malloc(sizeof(real) * (size_t)(written * n * 5)) : NULL;  /* (before anything moves) */   \
    if (written && !saved) { free(scratch); free(list); free(diffs); free(mode); return -1; }                         \
    for (int64_t j = 0; j < G; j++) {                                                                                 \
        real GW = 0, Wsq = 0, Gsq = 0;                                                                                \
        for (int64_t k = j * r; k < j * r + r; k++) { GW += gw[k]; Wsq += wsq[k]; Gsq += gsq[k]; }                    \
        real up_j = 0, dir_j = 0, keep_j = 0;                                                                         \
        if (mode[j] != 2) {                                                                                           \
            const real uj = u[j];                                                                                     \
            real a0 = rule != SGD ? su0[j] : 0, a1 = rule == ADAM ? su1[j] : 0, a2 = amsgrad ? su2[j] : 0;            \
            const real u1 = rule_##suffix(rule, amsgrad, nesterov, first, 0, uj, GW + c->k2 * uj, &a0, &a1, &a2, c);  \
            if (rule != SGD) su0[j] = a0;                                                                             \
            if (rule == ADAM) su1[j] = a1;                                                                            \
            if (amsgrad) su2[j] = a2;                                                                                 \
            u1g[j] = u1;                                                                                              \
            if ((uj == 0) & (Wsq == 0)) {  /* dead: held, or revived with one group proximal-gradient step */         \
                const real gnorm = SQRT(Gsq), excess = gnorm - c->k2, s = SQRT(c->lr * (excess > 0 ? excess : 0));    \
                mode[j] = 1; held++;                                                                                  \
                up_j = excess > 0 ? s : 0; dir_j = excess > 0 ? -s / gnorm : 0;                                       \
            } else { up_j = u1; keep_j = 1; }                                                                         \
        }                                                                                                             \
        for (int64_t k = j * r; k < j * r + r; k++) { up[k] = up_j; dir[k] = dir_j; keep[k] = keep_j; }               \
    }                                                                                                                 \
    for (int64_t i = 0, s = 0; i < n; i++)                                                                            \
        for (int64_t q = 0; q < written; q++, s += 5) {                                                               \
            const int64_t k = i * K + list[q];                                                                        \
            saved[s] = W[k]; saved[s + 1] = p[k];                                                                     \
            saved[s + 2] = rule != SGD ? sW0[k] : 0; saved[s + 3] = rule == ADAM ? sW1[k] : 0; saved[s + 4] = amsgrad ? sW2[k] : 0; \
        }                                                                                                             \
    for (int64_t i = 0; i < n; i++) {                                       /* (b) */                                 \
        const real *restrict gi = grad + i * K;                                                                       \
        real *restrict wi = W + i * K, *restrict pi = p + i * K, *restrict m0 = sW0 + i * K, *restrict m1 = sW1 + i * K; \
        real *restrict m2 = sW2 + i * K;                                                                              \
        if (held) {  /* some group dead: its W is 0, or a proximal-gradient step along g */                           \
            _Pragma("GCC ivdep") for (int64_t k = 0; k < K; k++) {  /* (no two arrays overlap: no runtime alias test) */ \
                COLUMN_MOVE(real, suffix, k)                                                                          \
                w1sq[k] += w1 * w1; wold[k] += w1 * t_old;                                                            \
                const real w2 = (keep[k] != 0 ? w1 : 0) + gk * dir[k];                                                \
                wi[k] = w2;                                                                                           \
                tb[k] = up[k] * w2;                                                                                   \
            }                                                                                                         \
            stream_##suffix(pi, tb, K);                                                                               \
        } else if (pairs && i + 1 < n) {  /* (the same numbers: keep is 1 and dir 0 everywhere; rows i and i+1) */    \
            _Pragma("GCC ivdep") for (int64_t k = 0; k < K; k++) {                                                    \
                real sq, dot;                                                                                         \
                { COLUMN_MOVE_KEPT(real, suffix, k) sq = w1sq[k] + w1 * w1; dot = wold[k] + w1 * t_old; }             \
                { COLUMN_MOVE_KEPT(real, suffix, K + k) w1sq[k] = sq + w1 * w1; wold[k] = dot + w1 * t_old; }         \
            }                                                                                                         \
            stream_##suffix(pi, tb, 2 * K);                                                                           \
            i++;                                                                                                      \
        } else {                                                                                                      \
            _Pragma("GCC ivdep") for (int64_t k = 0; k < K; k++) {                                                    \
                COLUMN_MOVE_KEPT(real, suffix, k)                                                                     \
                w1sq[k] += w1 * w1; wold[k] += w1 * t_old;                                                            \
            }                                                                                                         \
            stream_##suffix(pi, tb, K);                                                                               \
        }                                                                                                             \
    }                                                                                                                 \
    STREAM_FENCE();  /* (the streamed rows in place before (c) writes some of them again) */                          \
    for (int64_t i = 0, s = 0; i < n; i++)                                  /* (c) */                                 \
        for (int64_t q = 0; q < written; q++, s += 5) {                                                               \
            const int64_t k = i * K + list[q];                                                                        \
            W[k] = saved[s]; p[k] = saved[s + 1];                                                                     \
            if (rule != SGD) sW0[k] = saved[s + 2];                                                                   \
            if (rule == ADAM) sW1[k] = saved[s + 3];                                                                  \
            if (amsgrad) sW2[k] = saved[s + 4];                                                                       \
        }                                                                                                             \
    int64_t small = 0;  /* live groups whose snap test needs ||g||^2 (a theta at most the threshold): rare */         \
    for (int64_t j = 0; j < G; j++) {                                                                                 \
        if (mode[j] == 2) continue;                                                                                   \
        if (mode[j] == 1) { u[j] = up[j * r]; continue; }                                                             \
        real W1sq = 0, Wold = 0;                                                                                      \
        for (int64_t k = j * r; k < j * r + r; k++) { W1sq += w1sq[k]; Wold += wold[k]; }                             \
        const real u1 = u1g[j];                                                                                       \
        norm[j] = FABS(u1) * SQRT(W1sq);                                                                              \
        mode[j] = u1 * Wold < 0 ? 3 : norm[j] <= c->thr ? 4 : 0;  /* 3: snaps; 4: snaps if settled */                 \
        if (mode[j] == 0) u[j] = u1;                                                                                  \
        if (mode[j] == 4) for (int64_t k = j * r; k < j * r + r; k++) { list[small++] = k; gsq[k] = 0; }              \
    }                                                                                                                 \
    for (int64_t i = 0; i < n; i++)                                                                                   \
        for (int64_t q = 0; q < small; q++) {                                                                         \
            const real gk = grad_##suffix(grad[i * K + list[q]], scaled, c);                                          \
            gsq[list[q]] += gk * gk;                                                                                  \
        }                                                                                                             \
    for (int64_t j = 0; j < G; j++) {  /* (the rare groups that snap, or may) */                                      \
        if (mode[j] != 3 && mode[j] != 4) continue;                                                                   \
        real Gsq = 0, Osq = 0;                                                                                        \
        for (int64_t k = j * r; k < j * r + r; k++) { Gsq += gsq[k]; Osq += osq[k]; }                                 \
        const int snap = mode[j] == 3 || (norm[j] <= SQRT(Osq)) | (SQRT(Gsq) - c->k2 <= 0);                           \
        u[j] = snap ? 0 : u1g[j];                                                                                     \
        if (snap) for (int64_t k = j * r; k < j * r + r; k++) list[snapped++] = k;                                    \
    }                                                                                                                 \
    for (int64_t i = 0; i < n; i++)                                                                                   \
        for (int64_t q = 0; q < snapped; q++) {                                                                       \
            const int64_t k = i * K + list[q];                                                                        \
            const real w2 = (real)0 + grad_##suffix(grad[k], scaled, c) * (real)0;                                    \
            W[k] = w2;                                                                                                \
            p[k] = (real)0 * w2;                                                                                      \
        }                                                                                                             \
    free(saved); free(scratch); free(list); free(diffs); free(mode);                                                  \
    return changed;                                                                                                   \
}

DEFINE_KERNELS(float, f32, sqrtf, fabsf)
DEFINE_KERNELS(double, f64, sqrt, fabs)
DEFINE_COLUMNS(float, f32, sqrtf, fabsf)
DEFINE_COLUMNS(double, f64, sqrt, fabs)

/* One function per kernel and combination of flags, each loop specialised and vectorised by the compiler;
   `maximize` is a factor of -1 (an exact negation); `first`: the momentum buffer is created in this step. */
#define ARGS(real) int64_t n, int64_t width, int64_t inner, const real *restrict g, real *restrict p, real *restrict U,            \
    real *restrict W, real *restrict sU0, real *restrict sU1, real *restrict sU2, real *restrict sW0,               \
    real *restrict sW1, real *restrict sW2, void *pre
#define PASS n, width, inner, g, p, U, W, sU0, sU1, sU2, sW0, sW1, sW2, pre
#define LOOP(kernel, suffix, real, name, RULE, AMSGRAD, NESTEROV, FIRST, SCALED)                                  \
static int64_t kernel##_##name##_##suffix(ARGS(real), const consts_##suffix *c) {                                 \
    return kernel##_loop_##suffix(PASS, c, RULE, AMSGRAD, NESTEROV, FIRST, SCALED);                                \
}
#define ENTRY(kernel, suffix, real)                                                                                \
LOOP(kernel, suffix, real, adam, ADAM, 0, 0, 0, 0) LOOP(kernel, suffix, real, adam_scaled, ADAM, 0, 0, 0, 1)       \
LOOP(kernel, suffix, real, ams, ADAM, 1, 0, 0, 0) LOOP(kernel, suffix, real, ams_scaled, ADAM, 1, 0, 0, 1)         \
LOOP(kernel, suffix, real, sgd, SGD, 0, 0, 0, 0) LOOP(kernel, suffix, real, sgd_scaled, SGD, 0, 0, 0, 1)           \
LOOP(kernel, suffix, real, heavy, SGD_MOMENTUM, 0, 0, 0, 0) LOOP(kernel, suffix, real, heavy_scaled, SGD_MOMENTUM, 0, 0, 0, 1) \
LOOP(kernel, suffix, real, nest, SGD_MOMENTUM, 0, 1, 0, 0) LOOP(kernel, suffix, real, nest_scaled, SGD_MOMENTUM, 0, 1, 0, 1) \
LOOP(kernel, suffix, real, first, SGD_MOMENTUM, 0, 0, 1, 0) LOOP(kernel, suffix, real, first_scaled, SGD_MOMENTUM, 0, 0, 1, 1) \
LOOP(kernel, suffix, real, first_nest, SGD_MOMENTUM, 0, 1, 1, 0)                                                   \
LOOP(kernel, suffix, real, first_nest_scaled, SGD_MOMENTUM, 0, 1, 1, 1)                                            \
int64_t spread_##kernel##_##suffix(ARGS(real), const double *h, int rule, int amsgrad, int nesterov, int first,    \
                                   int maximize, int scaled) {                                                     \
    const consts_##suffix k = consts_of_##suffix(h, maximize ? -1 : 1), *c = &k;                                   \
    if (rule == ADAM && amsgrad) return (scaled ? kernel##_ams_scaled_##suffix : kernel##_ams_##suffix)(PASS, c); \
    if (rule == ADAM) return (scaled ? kernel##_adam_scaled_##suffix : kernel##_adam_##suffix)(PASS, c);           \
    if (rule == SGD) return (scaled ? kernel##_sgd_scaled_##suffix : kernel##_sgd_##suffix)(PASS, c);              \
    if (first && nesterov) return (scaled ? kernel##_first_nest_scaled_##suffix : kernel##_first_nest_##suffix)(PASS, c); \
    if (first) return (scaled ? kernel##_first_scaled_##suffix : kernel##_first_##suffix)(PASS, c);                \
    if (nesterov) return (scaled ? kernel##_nest_scaled_##suffix : kernel##_nest_##suffix)(PASS, c);               \
    return (scaled ? kernel##_heavy_scaled_##suffix : kernel##_heavy_##suffix)(PASS, c);                           \
}                                                                                                                  \
                                                                                                                   \
/* `count` tensors in one call (a model's many small tensors cost one call): tensor i has sizes[3i] (entries or    \
   rows), sizes[3i+1] (row width) and sizes[3i+2] (columns: entries per row and group), the ten pointers ptrs[10i..10i+9] (g, p, U, W, the factor's three states,   \
   W's three states; NULL where the rule keeps none), its hyperparameters h[13i..13i+12]; changed[i] receives     \
   what spread_<kernel>_<type> returns. */                                                                         \
void spread_##kernel##_batch_##suffix(int64_t count, const int64_t *sizes, real *const *ptrs, const double *h,     \
                                      int rule, int amsgrad, int nesterov, int first, int maximize, int scaled,    \
                                      int64_t *changed) {                                                          \
    for (int64_t i = 0; i < count; i++) {                                                                          \
        real *const *q = ptrs + 10 * i;                                                                            \
        changed[i] = spread_##kernel##_##suffix(sizes[3 * i], sizes[3 * i + 1], sizes[3 * i + 2], q[0], q[1], q[2],\
                                                q[3], q[4], q[5], q[6], q[7], q[8], q[9], NULL, h + 13 * i, rule,   \
                                                amsgrad, nesterov, first, maximize, scaled);                       \
    }                                                                                                              \
}

ENTRY(element, f32, float)
ENTRY(element, f64, double)
ENTRY(rows, f32, float)
ENTRY(rows, f64, double)
ENTRY(columns, f32, float)
ENTRY(columns, f64, double)

/* The columns batch with the optimizer's non-finite-gradient check taken by sweep (a), which reads every gradient
   anyway (the separate check's read of them is saved): every tensor's sweep (a) first, the last tensor first, then,
   when every sum g*W is finite, the rest of each tensor's step, the first tensor first (so that the small early
   tensors of a model find their sums pass's data still in cache). Else nothing moves, and changed[i] is -2 for each
   tensor whose sums are not finite (a non-finite gradient, or rarely an overflow: the caller's own check decides),
   -3 where sweep (a) found no memory for its scratch (nothing moved either), -1 where a step found none. */
#define DEFINE_CHECKED(suffix, real)                                                                               \
void spread_columns_checked_batch_##suffix(int64_t count, const int64_t *sizes, real *const *ptrs, const double *h,\
                                           int rule, int amsgrad, int nesterov, int first, int maximize,          \
                                           int scaled, int64_t *changed) {                                         \
    colsums_##suffix *sums = calloc((size_t)(count > 0 ? count : 1), sizeof *sums);                                \
    int failed = !sums;                                                                                            \
    for (int64_t i = 0; i < count; i++) changed[i] = failed ? -3 : 0;                                              \
    for (int64_t i = count - 1; i >= 0 && !failed; i--) {                                                          \
        real *const *q = ptrs + 10 * i;                                                                            \
        const consts_##suffix k = consts_of_##suffix(h + 13 * i, maximize ? -1 : 1);                               \
        const int got = columns_sums_##suffix(sizes[3 * i], sizes[3 * i + 1], sizes[3 * i + 2], q[0], q[1], q[2],  \
                                              q[3], &k, scaled, sums + i);                                         \
        changed[i] = got < 0 ? -3 : got ? -2 : 0;                                                                  \
        failed |= got < 0;                                                                                         \
    }                                                                                                              \
    for (int64_t i = 0; i < count; i++) failed |= changed[i] != 0;                                                 \
    if (failed) {                                                                                                  \
        for (int64_t i = 0; sums && i < count; i++) {                                                              \
            free(sums[i].scratch); free(sums[i].list); free(sums[i].diffs); free(sums[i].mode);                    \
        }                                                                                                          \
        free(sums);                                                                                                \
        return;                                                                                                    \
    }                                                                                                              \
    for (int64_t i = 0; i < count; i++) {  /* (each call frees its sums) */                                        \
        real *const *q = ptrs + 10 * i;                                                                            \
        changed[i] = spread_columns_##suffix(sizes[3 * i], sizes[3 * i + 1], sizes[3 * i + 2], q[0], q[1], q[2],   \
                                             q[3], q[4], q[5], q[6], q[7], q[8], q[9], sums + i, h + 13 * i, rule, \
                                             amsgrad, nesterov, first, maximize, scaled);                          \
    }                                                                                                              \
    free(sums);                                                                                                    \
}
DEFINE_CHECKED(f32, float)
DEFINE_CHECKED(f64, double)

/* 1 when one of the n entries is an inf or a NaN (its exponent bits all set), else 0: the optimizer's
   non-finite-gradient check, one read of the gradient (integer compares: vectorised, no float traps). A plain loop:
   the hardware prefetcher follows its one stream (software prefetches 16 KB ahead, non-temporal, were about 10%
   faster on an AMD Zen 5 and 2.3x slower on an Intel Xeon, benchmarks/native_step.py). */
#define DEFINE_NONFINITE(suffix, bits, EXPONENT)                                                                   \
int64_t spread_nonfinite_##suffix(int64_t n, const bits *restrict x) {                                             \
    bits bad = 0;                                                                                                  \
    for (int64_t i = 0; i < n; i++) bad |= (x[i] & EXPONENT) == EXPONENT;                                          \
    return (int64_t)bad;                                                                                           \
}
DEFINE_NONFINITE(f32, uint32_t, 0x7f800000u)
DEFINE_NONFINITE(f64, uint64_t, 0x7ff0000000000000ull)

/* The check of `count` tensors in one call: tensor i has sizes[2i] entries of sizes[2i+1] bytes (4: float32,
   8: float64) at ptrs[i]; bad[i] receives its check. Returns how many hold an inf or a NaN. */
int64_t spread_nonfinite_batch(int64_t count, const int64_t *sizes, const void *const *ptrs, int64_t *bad) {
    int64_t total = 0;
    for (int64_t i = 0; i < count; i++) {
        bad[i] = sizes[2 * i + 1] == 8 ? spread_nonfinite_f64(sizes[2 * i], ptrs[i]) : spread_nonfinite_f32(sizes[2 * i], ptrs[i]);
        total += bad[i];
    }
    return total;
}

/* Adam's step counters, torch's 0-dimensional tensors: counter i at ptrs[i] (sizes[i] bytes: 4, float32, or 8,
   float64) is advanced by one, as torch's add does in its own type; out[i] receives the new count, out[count + i]
   the one it had. */
void spread_count_steps(int64_t count, const int64_t *sizes, void *const *ptrs, double *out) {
    for (int64_t i = 0; i < count; i++) {
        if (sizes[i] == 8) { double *s = ptrs[i]; out[count + i] = *s; *s += 1.0; out[i] = *s; }
        else { float *s = ptrs[i]; out[count + i] = (double)*s; *s += 1.0f; out[i] = (double)*s; }
    }
}

/* The counters put back to the counts they had (values[i], as spread_count_steps gave them: exact in their type). */
void spread_set_counts(int64_t count, const int64_t *sizes, void *const *ptrs, const double *values) {
    for (int64_t i = 0; i < count; i++) {
        if (sizes[i] == 8) *(double *)ptrs[i] = values[i];
        else *(float *)ptrs[i] = (float)values[i];
    }
}
