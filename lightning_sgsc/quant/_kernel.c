/* The fused quantizer's arithmetic for float32 weights on the CPU, one call per direction for all layers.
 *
 * The same per-element steps as lightning_sgsc/quant/functional.py (_integers, _quantize_backward), in the same
 * order and with the same float32 operations, so the quantized weights and the weight gradients are bit-identical
 * to the torch path; the per-channel b and e gradient sums are taken in another order (last bits may differ).
 * Compiled at first use by lightning_sgsc/quant/native.py (plain C, no Python or torch headers) and called
 * through ctypes; the caller checks every shape, dtype and layout before it passes a pointer.
 *
 * Layer m has rows[m] output channels of cols[m] weights each, contiguous; channel c of the per-channel vectors
 * (all layers' channels in order) is row c - (channels of the layers before m) of layer m.
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

/* q = 2^e * round(clamp(2^-e w, lo, hi)) for every layer. */
SGSC_CLONES void sgsc_forward(int64_t n, const int64_t *rows, const int64_t *cols, const float *const *w,
                              float *const *q, const float *scale, const float *inv_scale, const float *lo,
                              const float *hi) {
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

/* STE gradients for the upstream gradients g: gw (NULL for a layer whose weight needs none) and, per channel,
 *   gb = (sum(g * side) * b_factor + share * grad_bpw) * sign(effective),  ge = sum(g * residual) * e_factor
 * with side = sign(x - clamp(x)) and residual = round(clamp(x)) - clamp(x) + |side| * clamp(x), as
 * _quantize_backward and _FusedQuantize.backward compute them. */
SGSC_CLONES void sgsc_backward(int64_t n, const int64_t *rows, const int64_t *cols, const float *const *w,
                               const float *const *g, float *const *gw, const float *inv_scale, const float *lo,
                               const float *hi, const float *b_factor, const float *e_factor, const float *share,
                               const float *effective, float grad_bpw, float *gb, float *ge) {
    int64_t c = 0;
    for (int64_t m = 0; m < n; m++) {
        const int64_t f = cols[m];
        for (int64_t r = 0; r < rows[m]; r++, c++) {
            const float is = inv_scale[c], l = lo[c], h = hi[c];
            const float *wr = w[m] + r * f, *gr = g[m] + r * f;
            float *gwr = gw[m] ? gw[m] + r * f : NULL;
            float sum_b = 0.0f, sum_e = 0.0f;
            for (int64_t k = 0; k < f; k++) {
                const float x = wr[k] * is;
                const float clamped = clamp_(x, l, h);
                const float d = x - clamped;
                const float side = (float)(d > 0.0f) - (float)(d < 0.0f);
                const float outside = side * side;
                sum_b += gr[k] * side;
                sum_e += gr[k] * ((rintf(clamped) - clamped) + outside * clamped);
                if (gwr) gwr[k] = gr[k] + (-gr[k]) * outside;
            }
            const float e = effective[c];
            gb[c] = (sum_b * b_factor[c] + share[c] * grad_bpw) * ((float)(e > 0.0f) - (float)(e < 0.0f));
            ge[c] = sum_e * e_factor[c];
        }
    }
}
