/* Float32 kernels for MLX's CPU backend, where its exp is scalar: softmax attention (the matmuls go to the BLAS
 * MLX uses, cblas_sgemm passed in by the caller; the softmax between them is one vectorised pass per row, over a
 * cache-sized block of scores that MLX's graph would write several times), SiLU / SwiGLU, RMSNorm + RoPE of
 * attention heads, 3x3 convolutions (one BLAS matmul per band of unfolded rows) and GroupNorm (+ SiLU).
 * Built at run time by mlximg/nn/native.py; see there for when they are used. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef void (*sgemm_fn)(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                         int lda, const float *b, int ldb, float beta, float *c, int ldc);
enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
enum { QUERY_BLOCK = 256 };  /* rows of scores per block: 256 x 4128 keys = 4 MB, cache-sized */
enum { CONV_BAND_VALUES = 1 << 18 };  /* unfolded convolution input per matmul (at least one image row): 1 MB */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

typedef float floats __attribute__((vector_size(32)));   /* 8 lanes: one AVX register, two SSE ones */
typedef int32_t ints __attribute__((vector_size(32)));
enum { LANES = 8 };

static inline floats splat(float x) { return floats{} + x; }

/* e^x as a degree-7 polynomial of the Cody-Waite reduced argument times 2^n set in the exponent bits (1e-7
 * relative error); x is clamped to [-87, 88], so the result is between ~1e-38 and ~1.6e38, never 0 or inf. */
static inline floats exp_clamped(floats x) {
    x = x < splat(-87.0f) ? splat(-87.0f) : x;
    x = x > splat(88.0f) ? splat(88.0f) : x;
    floats n = (x * 1.44269504f + 12582912.0f) - 12582912.0f; /* round(x / ln 2): 1.5 * 2^23 drops the fraction */
    floats r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    floats p = splat(1.98412698e-4f);
    p = p * r + 1.38888889e-3f;
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    ints bits = (__builtin_convertvector(n, ints) + 127) << 23;
    return p * (floats)bits;
}

static inline floats silu(floats x) { return x / (1.0f + exp_clamped(-x)); }

/* f(x[0]) of a lane-wise f, for the scalar tail of a vector loop. */
#define FIRST_LANE(f, value) (f((floats){value}))[0]

static inline floats load(const float *p) {
    floats x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void store(float *p, floats x) { memcpy(p, &x, sizeof x); }

static inline float lanes_max(floats x) {
    float m = x[0];
    for (int i = 1; i < LANES; i++) m = x[i] > m ? x[i] : m;
    return m;
}

static inline float lanes_sum(floats x) {
    float s = 0.0f;
    for (int i = 0; i < LANES; i++) s += x[i];
    return s;
}

/* Row i of `scores` (leading dimension ld, a multiple of LANES) becomes exp(row - max(row)) over its first
 * limit_0 + i * limit_step keys (at most n; causal attention steps by one key per row), 0 elsewhere, and
 * inv_sums[i] 1 / its sum (0 for a row with no key). Keys with valid[j] == 0 get weight exactly 0 too (valid: ld
 * floats of 0 / 1, or NULL). */
VECTOR_CLONES
static void softmax_rows(float *scores, int rows, int n, int ld, int limit_0, int limit_step, const float *valid,
                         float *inv_sums) {
    const floats lowest = splat(-3.0e38f);
    const ints lane = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int i = 0; i < rows; i++) {
        float *row = scores + (size_t)i * ld;
        int limit = limit_0 + i * limit_step;
        limit = limit < 0 ? 0 : (limit > n ? n : limit);
        int end = (limit + LANES - 1) / LANES * LANES;
        floats vmax = lowest;
        for (int j = 0; j < end; j += LANES) {
            floats x = load(row + j);
            x = lane + j < limit ? x : lowest;
            if (valid) x = load(valid + j) != 0.0f ? x : lowest;
            vmax = x > vmax ? x : vmax;
        }
        floats row_max = splat(lanes_max(vmax)), vsum = floats{};
        for (int j = 0; j < end; j += LANES) {
            floats e = exp_clamped(load(row + j) - row_max);
            e = lane + j < limit ? e : floats{};
            if (valid) e *= load(valid + j);
            store(row + j, e);
            vsum += e;
        }
        memset(row + end, 0, sizeof(float) * (size_t)(ld - end));
        float sum = lanes_sum(vsum);
        inv_sums[i] = sum > 0.0f ? 1.0f / sum : 0.0f;
    }
}

/* out = silu(gate) * value, or silu(gate) where value is NULL, over `rows` rows of `cols` values; row r of gate
 * starts at gate + r * gate_stride (likewise value), so column slices of a fused projection are read in place;
 * out is contiguous. */
extern "C" VECTOR_CLONES void silu_mul_f32(const float *gate, int64_t gate_stride, const float *value,
                                           int64_t value_stride, float *out, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate + r * gate_stride, *v = value ? value + r * value_stride : NULL;
        float *o = out + r * cols;
        int64_t i = 0;
        for (; i + LANES <= cols; i += LANES) {
            floats y = silu(load(g + i));
            store(o + i, v ? y * load(v + i) : y);
        }
        for (; i < cols; i++) {
            float y = FIRST_LANE(silu, g[i]);
            o[i] = v ? y * v[i] : y;
        }
    }
}

/* out = RoPE(rms_norm(x) * weight) for x of (batch, length, heads, d): head rows of d contiguous values, heads
 * side by side, x_strides[0] / [1] elements between batches / positions; out contiguous. Each head row is
 * normalised (skipped where weight is NULL) and its channel pairs (2i, 2i+1) rotated by the angle whose cos and
 * sin are at cos / sin + b * table_batch_stride + position * d / 2 + i. */
extern "C" VECTOR_CLONES void rms_norm_rope_f32(const float *x, const int64_t *x_strides, const float *weight,
                                                float eps, const float *cos, const float *sin,
                                                int64_t table_batch_stride, float *out, int batch, int length,
                                                int heads, int d) {
    for (int b = 0; b < batch; b++)
        for (int position = 0; position < length; position++) {
            const float *c = cos + b * table_batch_stride + (int64_t)position * (d / 2);
            const float *s = sin + b * table_batch_stride + (int64_t)position * (d / 2);
            for (int h = 0; h < heads; h++) {
                const float *row = x + b * x_strides[0] + position * x_strides[1] + (int64_t)h * d;
                float *o = out + (((int64_t)b * length + position) * heads + h) * d;
                float scale = 1.0f;
                if (weight) {
                    float squares = 0.0f;
                    for (int i = 0; i < d; i++) squares += row[i] * row[i];
                    scale = 1.0f / sqrtf(squares / d + eps);
                }
                for (int i = 0; i < d / 2; i++) {
                    float real = row[2 * i] * scale, imag = row[2 * i + 1] * scale;
                    if (weight) {
                        real *= weight[2 * i];
                        imag *= weight[2 * i + 1];
                    }
                    o[2 * i] = real * c[i] - imag * s[i];
                    o[2 * i + 1] = real * s[i] + imag * c[i];
                }
            }
        }
}

/* out = GroupNorm(x) * weight + bias, then SiLU if `then_silu`; x and out: (batch, pixels, channels)
 * contiguous, the channels in `groups` consecutive groups. Statistics per (sample, group) are two-pass (mean,
 * then mean squared deviation) with double accumulators: float32 running sums over the millions of values of a
 * group would lose digits. Returns 0, or -1 out of memory. */
extern "C" VECTOR_CLONES int group_norm_f32(const float *x, const float *weight, const float *bias, float *out,
                                            int batch, int64_t pixels, int channels, int groups, float eps,
                                            int then_silu) {
    double *sums = (double *)malloc(sizeof(double) * channels);
    float *scale = (float *)malloc(sizeof(float) * channels), *shift = (float *)malloc(sizeof(float) * channels);
    if (!sums || !scale || !shift) {
        free(sums), free(scale), free(shift);
        return -1;
    }
    int per_group = channels / groups;
    double count = (double)pixels * per_group;
    for (int b = 0; b < batch; b++) {
        const float *image = x + (int64_t)b * pixels * channels;
        float *o = out + (int64_t)b * pixels * channels;
        memset(sums, 0, sizeof(double) * channels);
        for (int64_t p = 0; p < pixels; p++)
            for (int c = 0; c < channels; c++) sums[c] += image[p * channels + c];
        for (int g = 0; g < groups; g++) {  /* the group's mean, per channel in scale[] for the second pass */
            double total = 0.0;
            for (int c = g * per_group; c < (g + 1) * per_group; c++) total += sums[c];
            for (int c = g * per_group; c < (g + 1) * per_group; c++) scale[c] = (float)(total / count);
        }
        memset(sums, 0, sizeof(double) * channels);
        for (int64_t p = 0; p < pixels; p++)
            for (int c = 0; c < channels; c++) {
                double deviation = (double)image[p * channels + c] - scale[c];
                sums[c] += deviation * deviation;
            }
        for (int g = 0; g < groups; g++) {
            double total = 0.0;
            for (int c = g * per_group; c < (g + 1) * per_group; c++) total += sums[c];
            float inv_std = (float)(1.0 / sqrt(total / count + eps));
            for (int c = g * per_group; c < (g + 1) * per_group; c++) {
                float mean = scale[c];
                scale[c] = inv_std * weight[c];
                shift[c] = bias[c] - mean * scale[c];
            }
        }
        for (int64_t p = 0; p < pixels; p++) {
            const float *row = image + p * channels;
            float *o_row = o + p * channels;
            int c = 0;
            for (; c + LANES <= channels; c += LANES) {
                floats y = load(row + c) * load(scale + c) + load(shift + c);
                store(o_row + c, then_silu ? silu(y) : y);
            }
            for (; c < channels; c++) {
                float y = row[c] * scale[c] + shift[c];
                o_row[c] = then_silu ? FIRST_LANE(silu, y) : y;
            }
        }
    }
    free(sums), free(scale), free(shift);
    return 0;
}

/* out = 3x3 convolution (stride 1, zero padding 1) of x plus bias; x: (batch, height, width, c_in), out: (batch,
 * height, width, c_out), weight: (c_out, 3, 3, c_in) as MLX stores it, all contiguous. Bands of output rows are
 * unfolded into a cache-sized (pixels, 9 c_in) buffer and multiplied by the weight in one matmul each: a longer
 * inner dimension than nine per-tap matmuls, and the output written once. Returns 0, or -1 out of memory. */
extern "C" int conv3x3_f32(sgemm_fn sgemm, const float *x, const float *weight, const float *bias, float *out,
                           int batch, int height, int width, int c_in, int c_out) {
    int k = 9 * c_in;
    int band = CONV_BAND_VALUES / (width * k);
    band = band < 1 ? 1 : (band > height ? height : band);
    float *unfolded = (float *)malloc(sizeof(float) * (size_t)band * width * k);
    if (!unfolded) return -1;
    for (int b = 0; b < batch; b++) {
        const float *image = x + (int64_t)b * height * width * c_in;
        for (int top = 0; top < height; top += band) {
            int rows = height - top < band ? height - top : band;
            float *column = unfolded;
            for (int y = top; y < top + rows; y++)
                for (int x_out = 0; x_out < width; x_out++)
                    for (int dy = -1; dy <= 1; dy++)
                        for (int dx = -1; dx <= 1; dx++, column += c_in) {
                            int source_y = y + dy, source_x = x_out + dx;
                            if (source_y < 0 || source_y >= height || source_x < 0 || source_x >= width)
                                memset(column, 0, sizeof(float) * c_in);
                            else
                                memcpy(column, image + ((int64_t)source_y * width + source_x) * c_in,
                                       sizeof(float) * c_in);
                        }
            float *o = out + (((int64_t)b * height + top) * width) * c_out;
            for (int p = 0; p < rows * width; p++) memcpy(o + (int64_t)p * c_out, bias, sizeof(float) * c_out);
            sgemm(ROW_MAJOR, NO_TRANS, TRANS, rows * width, c_out, k, 1.0f, unfolded, k, weight, k, 1.0f, o, c_out);
        }
    }
    free(unfolded);
    return 0;
}

/* out = softmax(q k^T scale + mask) v for every batch b and head h. q: (nq, d) rows at q + b*q_strides[0] +
 * h*q_strides[1], row stride q_strides[2] (elements; unit column stride), likewise out; k and v: (nk, d) rows of
 * KV head h / (heads / kv_heads) (grouped-query attention). key_valid: (batch, nk rounded up to 8) of 0 / 1 with
 * row stride key_valid_stride (0: one row for all), or NULL. causal: query i sees keys up to i + nk - nq, as
 * MLX's "causal" mask. Returns 0, or -1 when memory runs out. */
extern "C" int attention_f32(sgemm_fn sgemm, const float *q, const float *k, const float *v, float *out, int batch,
                             int heads, int kv_heads, int nq, int nk, int d, const int64_t *q_strides,
                             const int64_t *k_strides, const int64_t *v_strides, const int64_t *out_strides,
                             const float *key_valid, int64_t key_valid_stride, int causal, float scale) {
    int block = nq < QUERY_BLOCK ? nq : QUERY_BLOCK;
    int ld = (nk + LANES - 1) / LANES * LANES;
    int group = heads / kv_heads;
    float *scores = (float *)malloc(sizeof(float) * (size_t)block * ld);
    float *inv_sums = (float *)malloc(sizeof(float) * (size_t)block);
    if (!scores || !inv_sums) {
        free(scores);
        free(inv_sums);
        return -1;
    }
    for (int b = 0; b < batch; b++) {
        const float *valid = key_valid ? key_valid + b * key_valid_stride : NULL;
        for (int h = 0; h < heads; h++) {
            const float *qh = q + b * q_strides[0] + h * q_strides[1];
            const float *kh = k + b * k_strides[0] + (h / group) * k_strides[1];
            const float *vh = v + b * v_strides[0] + (h / group) * v_strides[1];
            float *oh = out + b * out_strides[0] + h * out_strides[1];
            for (int start = 0; start < nq; start += block) {
                int rows = nq - start < block ? nq - start : block;
                sgemm(ROW_MAJOR, NO_TRANS, TRANS, rows, nk, d, scale, qh + start * q_strides[2], (int)q_strides[2],
                      kh, (int)k_strides[2], 0.0f, scores, ld);
                if (causal)
                    softmax_rows(scores, rows, nk, ld, start + 1 + nk - nq, 1, valid, inv_sums);
                else
                    softmax_rows(scores, rows, nk, ld, nk, 0, valid, inv_sums);
                float *o = oh + start * out_strides[2];
                sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, rows, d, nk, 1.0f, scores, ld, vh, (int)v_strides[2], 0.0f, o,
                      (int)out_strides[2]);
                for (int i = 0; i < rows; i++)
                    for (int c = 0; c < d; c++) o[i * out_strides[2] + c] *= inv_sums[i];
            }
        }
    }
    free(scores);
    free(inv_sums);
    return 0;
}

/* Row r of out = residual + gate * (norm(x) * weight * scale + shift) over d contiguous values, where norm is
 * none (0), RMSNorm (1) or LayerNorm without affine (2), each of weight / scale / shift / residual / gate may be
 * NULL (absent), and scale / shift / gate are per sample: sample r / rows_per_sample's d values. The adaLN
 * modulation, the gated residual add and their norm in one pass instead of MLX's three to five. */
extern "C" VECTOR_CLONES void norm_modulate_f32(const float *x, const float *weight, const float *scale,
                                                const float *shift, const float *residual, const float *gate,
                                                float *out, int64_t rows, int64_t rows_per_sample, int d, int norm,
                                                float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * d;
        int64_t sample = (r / rows_per_sample) * d;
        float mean = 0.0f, inv = 1.0f;
        if (norm) {
            floats sum = floats{}, squares = floats{};
            int i = 0;
            for (; i + LANES <= d; i += LANES) {
                floats v = load(row + i);
                sum += v;
                squares += v * v;
            }
            float s = lanes_sum(sum), q = lanes_sum(squares);
            for (; i < d; i++) s += row[i], q += row[i] * row[i];
            if (norm == 2) {  /* LayerNorm: the variance from a second pass about the mean, not E[x^2] - mean^2 */
                mean = s / d;
                floats deviations = floats{};
                for (i = 0; i + LANES <= d; i += LANES) {
                    floats v = load(row + i) - mean;
                    deviations += v * v;
                }
                q = lanes_sum(deviations);
                for (; i < d; i++) q += (row[i] - mean) * (row[i] - mean);
            }
            inv = 1.0f / sqrtf(q / d + eps);
        }
        const float *res = residual ? residual + r * d : NULL;
        float *o = out + r * d;
        int i = 0;
        for (; i + LANES <= d; i += LANES) {  /* the branches go the same way for every row: predicted */
            floats y = load(row + i);
            if (norm) y = (y - mean) * inv;
            if (weight) y *= load(weight + i);
            if (scale) y *= load(scale + sample + i);
            if (shift) y += load(shift + sample + i);
            if (gate) y *= load(gate + sample + i);
            store(o + i, res ? load(res + i) + y : y);
        }
        for (; i < d; i++) {
            float y = norm ? (row[i] - mean) * inv : row[i];
            if (weight) y *= weight[i];
            if (scale) y *= scale[sample + i];
            if (shift) y += shift[sample + i];
            if (gate) y *= gate[sample + i];
            o[i] = res ? res[i] + y : y;
        }
    }
}
