/* The fused quantizer's arithmetic for float32 weights on the CPU, one call per direction for all layers.
 *
 * The same per-element steps as lightning_sgsc/quant/functional.py (_integers, _quantize_backward), in the same
 * order and with the same float32 operations, so the quantized weights and the weight gradients are bit-identical
 * to the torch path; the per-channel b and e gradient sums are taken in another order (last bits may differ).
 * Compiled at first use by lightning_sgsc/quant/native.py (plain C, no Python or torch headers) and called
 * through ctypes; the caller checks every shape, dtype and layout before it passes a pointer.
 *
 * Layer m has rows[m] output channels of cols[m] weights each, contiguous, and rows[m] bits and exponents; channel
 * c of the per-channel vectors (all layers' channels in order) is row c - (channels of the layers before m) of
 * layer m.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
/* rintf vectorises from SSE4.1 on; one build, the best variant picked at load time. */
#define SGSC_CLONES __attribute__((target_clones("avx2", "sse4.1", "default")))
#else
#define SGSC_CLONES
#endif

/* maximum(x, lo) then minimum(x, hi), as torch's: a NaN stays NaN. */
static inline float clamp_(float x, float lo, float hi) {
    x = x < lo ? lo : x;
    return x > hi ? hi : x;
}

/* Rows of the per-channel table written by sgsc_forward and read by sgsc_backward (C floats each). */
enum { SCALE, INV_SCALE, LO, HI, E_FACTOR, B_FACTOR, EFFECTIVE }; /* 7 rows: native.TABLE_ROWS */

/* The per-channel table as functional._Steps.of computes it, from bits b and exponents e (one pointer per layer):
 * effective = max(b, 0) * keep, rows (e, e, eff, eff, e, e + eff), arg = arg_offset + row * arg_sign,
 * p = (float)exp2((double)arg), value = offset + p * sign; consts holds arg_offset, arg_sign, offset and sign (6
 * floats each, the float32 values of _constants). Returns sum(effective * share), the bits-per-weight term. Not
 * vectorised on purpose: exp2 stays glibc's double exp2 (what torch's scalar kernel calls). */
__attribute__((noinline)) static float channel_table(int64_t n, const int64_t *rows, const float *const *bits,
                                                     const float *const *exponent, const float *keep,
                                                     const float *share, const float *consts, float *table,
                                                     int64_t C) {
    const float *arg_offset = consts, *arg_sign = consts + 6, *offset = consts + 12, *sign = consts + 18;
    float bpw = 0.0f;
    int64_t c = 0;
    for (int64_t m = 0; m < n; m++) {
        for (int64_t r = 0; r < rows[m]; r++, c++) {
            const float b = bits[m][r], e = exponent[m][r];
            const float effective = (b < 0.0f ? 0.0f : b) * keep[c];
            const float row[6] = {e, e, effective, effective, e, e + effective};
            float arg_last = 0.0f, p = 0.0f;
            for (int i = 0; i < 6; i++) {
                const float arg = arg_offset[i] + row[i] * arg_sign[i];
                if (i == 0 || arg != arg_last) p = (float)exp2((double)arg); /* the two bound rows share theirs */
                arg_last = arg;
                table[i * C + c] = offset[i] + p * sign[i];
            }
            table[EFFECTIVE * C + c] = effective;
            bpw += effective * share[c];
        }
    }
    return bpw;
}

/* q = 2^e * round(clamp(2^-e w, lo, hi)) for every layer, after the per-channel table (ROWS x C floats, kept for
 * the backward); *bpw receives the bits-per-weight term. */
SGSC_CLONES void sgsc_forward(int64_t n, const int64_t *rows, const int64_t *cols, const float *const *bits,
                              const float *const *exponent, const float *keep, const float *share,
                              const float *consts, const float *const *w, float *const *q, float *table, int64_t C,
                              float *bpw) {
    *bpw = channel_table(n, rows, bits, exponent, keep, share, consts, table, C);
    const float *scale = table + SCALE * C, *inv_scale = table + INV_SCALE * C;
    const float *lo = table + LO * C, *hi = table + HI * C;
    int64_t c = 0;
    for (int64_t m = 0; m < n; m++) {
        const int64_t f = cols[m];
        for (int64_t r = 0; r < rows[m]; r++, c++) {
            const float s = scale[c], is = inv_scale[c], l = lo[c], h = hi[c];
            const float *wr = w[m] + r * f;
            float *qr = q[m] + r * f;
            for (int64_t k = 0; k < f; k++) qr[k] = rintf(clamp_(wr[k] * is, l, h)) * s;
        }
    }
}

#define LANES 8

/* Weight k of a channel: adds g * side and g * residual to the sums, writes gw[k] when write_gw (gw is not read or
 * offset otherwise: it may be NULL). */
static inline void element(const float w, const float g, float *gw, const int64_t k, const int write_gw,
                           const float is, const float l, const float h, float *sum_b, float *sum_e) {
    const float x = w * is;
    const float clamped = clamp_(x, l, h);
    const float d = x - clamped;
    const float side = (float)(d > 0.0f) - (float)(d < 0.0f);
    const float outside = side * side;
    *sum_b += g * side;
    *sum_e += g * ((rintf(clamped) - clamped) + outside * clamped);
    if (write_gw) gw[k] = g + (-g) * outside;
}

/* One channel of the backward: the weight gradients (when write_gw) and the two sums of g * side and
 * g * residual. The sums run as LANES interleaved partial sums added pairwise at the end (a fixed order, so the
 * same result on every run) and the loop vectorises; one running sum would chain every addition on the last. */
static inline void row_backward(const float *wr, const float *gr, float *gwr, const int write_gw, const int64_t f,
                                const float is, const float l, const float h, float *sum_b, float *sum_e) {
    float acc_b[LANES] = {0.0f}, acc_e[LANES] = {0.0f};
    int64_t k = 0;
    for (; k + LANES <= f; k += LANES)
        for (int i = 0; i < LANES; i++)
            element(wr[k + i], gr[k + i], gwr, k + i, write_gw, is, l, h, &acc_b[i], &acc_e[i]);
    for (int i = 0; k < f; k++, i++) /* the tail, into the first lanes */
        element(wr[k], gr[k], gwr, k, write_gw, is, l, h, &acc_b[i], &acc_e[i]);
    for (int width = LANES / 2; width > 0; width /= 2) {
        for (int i = 0; i < width; i++) {
            acc_b[i] += acc_b[i + width];
            acc_e[i] += acc_e[i + width];
        }
    }
    *sum_b = acc_b[0];
    *sum_e = acc_e[0];
}

/* STE gradients for the upstream gradients g: gw (NULL for a layer whose weight needs none) and, per channel,
 *   gb = (sum(g * side) * b_factor + share * grad_bpw) * sign(effective),  ge = sum(g * residual) * e_factor
 * with side = sign(x - clamp(x)) and residual = round(clamp(x)) - clamp(x) + |side| * clamp(x), as
 * _quantize_backward and _FusedQuantize.backward compute them; table: the forward's. */
SGSC_CLONES void sgsc_backward(int64_t n, const int64_t *rows, const int64_t *cols, const float *const *w,
                               const float *const *g, float *const *gw, const float *table, int64_t C,
                               const float *share, float grad_bpw, float *gb, float *ge) {
    const float *inv_scale = table + INV_SCALE * C, *lo = table + LO * C, *hi = table + HI * C;
    const float *b_factor = table + B_FACTOR * C, *e_factor = table + E_FACTOR * C;
    const float *effective = table + EFFECTIVE * C;
    int64_t c = 0;
    for (int64_t m = 0; m < n; m++) {
        const int64_t f = cols[m];
        for (int64_t r = 0; r < rows[m]; r++, c++) {
            const float is = inv_scale[c], l = lo[c], h = hi[c];
            const float *wr = w[m] + r * f, *gr = g[m] + r * f;
            float *gwr = gw[m] ? gw[m] + r * f : NULL;
            float sum_b, sum_e;
            if (gwr)
                row_backward(wr, gr, gwr, 1, f, is, l, h, &sum_b, &sum_e);
            else
                row_backward(wr, gr, NULL, 0, f, is, l, h, &sum_b, &sum_e);
            const float e = effective[c];
            gb[c] = (sum_b * b_factor[c] + share[c] * grad_bpw) * ((float)(e > 0.0f) - (float)(e < 0.0f));
            ge[c] = sum_e * e_factor[c];
        }
    }
}
