/* Fused CPU training steps of the calibrating norm layers (RBN, IEBN, blended σ) on float and double batches in
 * either memory format: NCHW-contiguous or channels_last (NHWC).
 *
 * Built at first use by native_kernels.py (plain C99, no Python or torch header: about a second to compile) and
 * called through ctypes on the tensors' data pointers; the Python side checks device, dtype and layout first. Each
 * layer has a forward in one call, which also updates the running statistics in place as BN's kernels do, and a
 * backward in one call (RBN's and IEBN's sigmoid uses the branch-free exponential below, which the compiler
 * vectorises, as torch's own sigmoid is). Why: the same steps as separate tensor ops take dozens of dispatches of small
 * (N, C) ops and an extra pass over the activation, which made RBN and IEBN up to 1.7× BN's time on channels_last
 * batches (benchmarks/HISTORY.md).
 *
 * A layer is y = x·A + B' with per-plane (n, c) or per-channel A and B' computed from the plane means m and biased
 * variances v; the coefficient math follows the Python closed forms of norm.py (_RBNBase, _IEBNBase, _BlendedStdBase
 * and _CalibratedBase._batch_mean_var / _moments_backward) line by line, and the tests check both against the
 * formulas. The activation passes, per layout (m, v of each plane; A, P, Q per plane or per channel):
 *   moments     m and v, two-pass (Σ(x − m)² after m, while the plane, or the chunk of an NHWC sample, is in cache)
 *   affine      y = x·A + B'
 *   grad_sums   Σdy and Σdy·(x − m), one pass
 *   input_grad  dx = A·dy + P·(x − m) + Q, one pass (stock tensor ops take two)
 * In NHWC, sample n is a row-major (H·W rows) × (C channels) matrix whose columns are its planes: loops run along a
 * row, over contiguous channels, and sums accumulate in column order, as BN's channels_last kernels do. In NCHW a
 * plane is H·W contiguous values, summed in 16 interleaved partial sums (vectorisable without reordering flags).
 * Threads (OpenMP, torch's count) split samples × channel blocks or planes, so they never share an output.
 *
 * Every function exists for float (suffix _f32) and double (_f64): the second half of this file is compiled once for
 * each, by including this file into itself with T and NAME defined.
 */
#ifndef T

#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
/* an AVX2 version beside the baseline one, chosen by the CPU at load time (GCC's function multi-versioning); both
 * add in the same order, so they give the same bits */
#define TARGETS __attribute__((target_clones("avx2", "default")))
#else
#define TARGETS
#endif

/* Helpers are inlined into each exported function, so that they are compiled for each of its target versions. */
#if defined(__GNUC__)
#define INLINE static inline __attribute__((always_inline))
#else
#define INLINE static inline
#endif

enum { LAYOUT_NCHW = 0, LAYOUT_NHWC = 1 };

/* Channels per NHWC unit: all of them when there are at least as many samples as threads, else blocks of a multiple
 * of 16 so that every thread gets work. */
static int64_t channel_block(int64_t samples, int64_t channels, int threads) {
    if (threads <= 1 || samples >= threads) return channels;
    int64_t per_sample = (threads + samples - 1) / samples;
    int64_t block = ((channels + per_sample - 1) / per_sample + 15) / 16 * 16;
    return block < channels ? block : channels;
}

/* Runs the statement that follows for every NHWC unit (sample s, channels [j0, j0 + width)), over the threads. */
#define FOR_EACH_UNIT(samples, channels, threads)                                                                 \
    int64_t block_ = channel_block(samples, channels, threads), blocks_ = (channels + block_ - 1) / block_;      \
    _Pragma("omp parallel for num_threads(threads) schedule(static) if(threads > 1)")                            \
    for (int64_t unit_ = 0; unit_ < samples * blocks_; ++unit_)                                                   \
        for (int64_t s = unit_ / blocks_, j0 = unit_ % blocks_ * block_,                                          \
             width = j0 + block_ < channels ? block_ : channels - j0, once_ = 1; once_; once_ = 0)

/* Runs the statement that follows for every NCHW plane p = n·C + c, over the threads. */
#define FOR_EACH_PLANE(planes, threads)                                                                           \
    _Pragma("omp parallel for num_threads(threads) schedule(static) if(threads > 1)")                            \
    for (int64_t p = 0; p < planes; ++p)

#define LANES 16 /* partial sums of a contiguous NCHW plane */

/* Channels per thread in the coefficient math: all of them on one thread, else an equal share (at least 64). */
static int64_t channel_range(int64_t channels, int threads) {
    if (threads <= 1) return channels;
    int64_t range = ((channels + threads - 1) / threads + 15) / 16 * 16;
    return range < 64 ? 64 : range;
}

/* Runs the statement that follows for every range of channels [j0, j1), over the threads. */
#define FOR_EACH_CHANNEL_RANGE(channels, threads)                                                                 \
    int64_t range_ = channel_range(channels, threads);                                                           \
    _Pragma("omp parallel for num_threads(threads) schedule(static) if(threads > 1)")                            \
    for (int64_t r_ = 0; r_ < (channels + range_ - 1) / range_; ++r_)                                             \
        for (int64_t j0 = r_ * range_, j1 = j0 + range_ < channels ? j0 + range_ : channels, once_ = 1; once_;     \
             once_ = 0)

/* lets the loader check that it opened the library it built */
int plane_kernels_version(void) { return 7; }

/* e^t without branches or calls, so that a loop of them vectorises: e^t = 2^n·e^r with n = round(t/ln 2) (added to
 * and taken from 1.5·2^52, or 1.5·2^23, which rounds to an integer and leaves n in the low bits), r = t − n·ln 2 with
 * ln 2 in two parts (Cody and Waite; |r| ≤ ln 2 / 2, the product n·ln2_hi exact), e^r by its Taylor polynomial to r^13
 * (r^7 in float: the first term left out is below half an ulp) and 2^n built in the exponent bits. t is clamped to
 * where e^t and 2^n are normal numbers (NaN stays NaN). The sigmoids built on it are checked against torch's float64
 * sigmoid, within 4 ulps, over the whole range in tests/test_native_kernels.py. */
INLINE double exponential_f64(double t) {
    t = t < -708.0 ? -708.0 : t;
    t = t > 709.0 ? 709.0 : t;
    const double shifter = 6755399441055744.0; /* 1.5·2^52 */
    double k = t * 1.4426950408889634 + shifter, n = k - shifter;
    double r = (t - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int64_t k_bits, shifter_bits, scale_bits;
    memcpy(&k_bits, &k, sizeof k);
    memcpy(&shifter_bits, &shifter, sizeof shifter);
    scale_bits = (k_bits - shifter_bits + 1023) << 52;
    double scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    return p * scale;
}

INLINE float exponential_f32(float t) {
    t = t < -87.0f ? -87.0f : t;
    t = t > 88.0f ? 88.0f : t;
    const float shifter = 12582912.0f; /* 1.5·2^23 */
    float k = t * 1.44269504f + shifter, n = k - shifter;
    float r = (t - n * 0.693145752f) - n * 1.42860677e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t k_bits, shifter_bits, scale_bits;
    memcpy(&k_bits, &k, sizeof k);
    memcpy(&shifter_bits, &shifter, sizeof shifter);
    scale_bits = (k_bits - shifter_bits + 127) << 23;
    float scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    return p * scale;
}


#define T float
#define NAME(name) name##_f32
#include __FILE__
#undef T
#undef NAME
#define T double
#define NAME(name) name##_f64
#include __FILE__
#undef T
#undef NAME

#else /* ---- everything below, for one element type T ------------------------------------------------------------ */

/* σ(z) = 1 / (1 + e^(−z)), as RBN's and IEBN's forward compute it */
INLINE T NAME(sigmoid_of)(T z) { return (T)1 / ((T)1 + NAME(exponential)(-z)); }

/* σ over n contiguous values: the tests' way to check the layers' sigmoid against torch's */
TARGETS void NAME(sigmoid)(const T* restrict z, int64_t n, T* restrict s) {
    for (int64_t i = 0; i < n; ++i) s[i] = NAME(sigmoid_of)(z[i]);
}

/* ---- NHWC activation passes, one unit: pointers at the unit's first channel, rows `stride` apart ---------------- */

/* m and Σ(x − m)² of `rows` rows of `width` columns, two-pass: the second pass rereads what the first just read */
INLINE void NAME(nhwc_two_pass)(const T* restrict x, int64_t rows, int64_t stride, int64_t width,
                                       T* restrict mean, T* restrict square_sum) {
    T inv_rows = (T)1 / (T)rows;
    for (int64_t j = 0; j < width; ++j) mean[j] = square_sum[j] = 0;
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < width; ++j) mean[j] += x[i * stride + j];
    for (int64_t j = 0; j < width; ++j) mean[j] *= inv_rows;
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < width; ++j) {
            T d = x[i * stride + j] - mean[j];
            square_sum[j] += d * d;
        }
}

/* A unit's m and v, two-pass within chunks of rows small enough to stay in L2 (MOMENTS_CHUNK_BYTES) for the second
 * pass, the chunks combined as Chan, Golub and LeVeque do (each chunk's Σ(x − m)² about its own mean, plus
 * δ²·n_a·n_b/n for the means' difference δ: no cancellation). A sample of one chunk is one plain two-pass; a larger
 * one (a 28×28 sample of 512 channels is 1.6 MB, L2 is 0.5-2 MB) is read from memory once instead of twice, where BN's
 * channels_last kernel reads the whole batch twice: 10-20% off the forward at 28×28 and 56×56 (benchmarks/HISTORY.md,
 * "Less Python per step"). Columns go in blocks of MOMENTS_COLUMNS. */
#define MOMENTS_CHUNK_BYTES (256 * 1024)
#define MOMENTS_COLUMNS 2048

INLINE void NAME(nhwc_moments_unit)(const T* restrict x, int64_t rows, int64_t stride, int64_t width,
                                           T* restrict mean, T* restrict var) {
    T chunk_mean[MOMENTS_COLUMNS], chunk_square_sum[MOMENTS_COLUMNS];
    for (int64_t j0 = 0; j0 < width; j0 += MOMENTS_COLUMNS) {
        int64_t columns = width - j0 < MOMENTS_COLUMNS ? width - j0 : MOMENTS_COLUMNS;
        int64_t chunk = MOMENTS_CHUNK_BYTES / ((int64_t)sizeof(T) * columns);
        chunk = chunk < 8 ? 8 : chunk;
        T* restrict m = mean + j0;
        T* restrict v = var + j0;
        NAME(nhwc_two_pass)(x + j0, chunk < rows ? chunk : rows, stride, columns, m, v);
        for (int64_t done = chunk; done < rows; done += chunk) {
            int64_t count = rows - done < chunk ? rows - done : chunk;
            NAME(nhwc_two_pass)(x + done * stride + j0, count, stride, columns, chunk_mean, chunk_square_sum);
            T weight = (T)count / (T)(done + count), cross = (T)done * weight;
            for (int64_t j = 0; j < columns; ++j) {
                T delta = chunk_mean[j] - m[j];
                m[j] += delta * weight;
                v[j] += chunk_square_sum[j] + delta * delta * cross;
            }
        }
        T inv_rows = (T)1 / (T)rows;
        for (int64_t j = 0; j < columns; ++j) v[j] *= inv_rows;
    }
}

INLINE void NAME(nhwc_affine_unit)(const T* restrict x, const T* restrict scale, const T* restrict shift,
                                          int64_t rows, int64_t stride, int64_t width, T* restrict y) {
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < width; ++j) y[i * stride + j] = x[i * stride + j] * scale[j] + shift[j];
}

/* Σdy, then Σdy·(x − m), over each 1 KiB piece of a row: dy's piece is reread from L1, and the reads from memory
 * alternate between dy and x a piece at a time, which was up to 1.6× faster than one loop over both on narrow rows
 * (C = 256, 512) and as fast on wide ones (measured; BN's kernel splits whole rows, which thrashes L1 on wide ones) */
INLINE void NAME(nhwc_grad_sums_unit)(const T* restrict grad_y, const T* restrict x, const T* restrict mean,
                                             int64_t rows, int64_t stride, int64_t width, T* restrict total,
                                             T* restrict dot) {
    const int64_t piece = 1024 / sizeof(T);
    for (int64_t j = 0; j < width; ++j) total[j] = dot[j] = 0;
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t start = 0; start < width; start += piece) {
            int64_t stop = start + piece < width ? start + piece : width;
            for (int64_t j = start; j < stop; ++j) total[j] += grad_y[i * stride + j];
            for (int64_t j = start; j < stop; ++j) dot[j] += grad_y[i * stride + j] * (x[i * stride + j] - mean[j]);
        }
}

INLINE void NAME(nhwc_input_grad_unit)(const T* restrict grad_y, const T* restrict x, const T* restrict mean,
                                              const T* restrict scale, const T* restrict coef_x,
                                              const T* restrict coef_const, int64_t rows, int64_t stride,
                                              int64_t width, T* restrict grad_x) {
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < width; ++j)
            grad_x[i * stride + j] = scale[j] * grad_y[i * stride + j] + coef_x[j] * (x[i * stride + j] - mean[j])
                                     + coef_const[j];
}

/* ---- NCHW activation passes, one plane of `size` contiguous values ------------------------------------------- */

INLINE T NAME(plane_sum)(const T* restrict x, int64_t size) {
    T partial[LANES] = {0}, total = 0;
    int64_t i = 0;
    for (; i + LANES <= size; i += LANES)
        for (int k = 0; k < LANES; ++k) partial[k] += x[i + k];
    for (int k = 0; k < LANES; ++k) total += partial[k];
    for (; i < size; ++i) total += x[i];
    return total;
}

INLINE T NAME(plane_centered_square_sum)(const T* restrict x, T mean, int64_t size) {
    T partial[LANES] = {0}, total = 0;
    int64_t i = 0;
    for (; i + LANES <= size; i += LANES)
        for (int k = 0; k < LANES; ++k) partial[k] += (x[i + k] - mean) * (x[i + k] - mean);
    for (int k = 0; k < LANES; ++k) total += partial[k];
    for (; i < size; ++i) total += (x[i] - mean) * (x[i] - mean);
    return total;
}

INLINE void NAME(plane_grad_sums)(const T* restrict grad_y, const T* restrict x, T mean, int64_t size,
                                         T* total, T* dot) {
    T partial_total[LANES] = {0}, partial_dot[LANES] = {0}, sum_total = 0, sum_dot = 0;
    int64_t i = 0;
    for (; i + LANES <= size; i += LANES)
        for (int k = 0; k < LANES; ++k) {
            partial_total[k] += grad_y[i + k];
            partial_dot[k] += grad_y[i + k] * (x[i + k] - mean);
        }
    for (int k = 0; k < LANES; ++k) {
        sum_total += partial_total[k];
        sum_dot += partial_dot[k];
    }
    for (; i < size; ++i) {
        sum_total += grad_y[i];
        sum_dot += grad_y[i] * (x[i] - mean);
    }
    *total = sum_total;
    *dot = sum_dot;
}

/* ---- the passes in either layout. (N, C) arrays are row-major: plane (n, c) at n·C + c. A coefficient with stride
 * C is per plane, with stride 0 per channel (the same C values for every sample). */

TARGETS static void NAME(moments)(const T* x, int layout, int64_t samples, int64_t rows, int64_t channels, T* mean, T* var,
                          int threads) {
    if (layout == LAYOUT_NHWC) {
        FOR_EACH_UNIT(samples, channels, threads) {
            NAME(nhwc_moments_unit)(x + s * rows * channels + j0, rows, channels, width, mean + s * channels + j0,
                                    var + s * channels + j0);
        }
    } else {
        FOR_EACH_PLANE(samples * channels, threads) {
            T m = NAME(plane_sum)(x + p * rows, rows) / (T)rows;
            mean[p] = m;
            var[p] = NAME(plane_centered_square_sum)(x + p * rows, m, rows) / (T)rows;
        }
    }
}

TARGETS static void NAME(affine)(const T* x, int layout, int64_t samples, int64_t rows, int64_t channels, const T* scale,
                         int64_t scale_stride, const T* shift, int64_t shift_stride, T* y, int threads) {
    if (layout == LAYOUT_NHWC) {
        FOR_EACH_UNIT(samples, channels, threads) {
            NAME(nhwc_affine_unit)(x + s * rows * channels + j0, scale + s * scale_stride + j0,
                                   shift + s * shift_stride + j0, rows, channels, width, y + s * rows * channels + j0);
        }
    } else {
        FOR_EACH_PLANE(samples * channels, threads) {
            int64_t n = p / channels, c = p % channels;
            T a = scale[n * scale_stride + c], b = shift[n * shift_stride + c];
            const T* restrict in = x + p * rows;
            T* restrict out = y + p * rows;
            for (int64_t i = 0; i < rows; ++i) out[i] = in[i] * a + b;
        }
    }
}

TARGETS static void NAME(grad_sums)(const T* grad_y, const T* x, int layout, int64_t samples, int64_t rows, int64_t channels,
                            const T* mean, T* total, T* dot, int threads) {
    if (layout == LAYOUT_NHWC) {
        FOR_EACH_UNIT(samples, channels, threads) {
            NAME(nhwc_grad_sums_unit)(grad_y + s * rows * channels + j0, x + s * rows * channels + j0,
                                      mean + s * channels + j0, rows, channels, width, total + s * channels + j0,
                                      dot + s * channels + j0);
        }
    } else {
        FOR_EACH_PLANE(samples * channels, threads) {
            NAME(plane_grad_sums)(grad_y + p * rows, x + p * rows, mean[p], rows, total + p, dot + p);
        }
    }
}

/* dx = A·dy + P·(x − m) + Q with m, Q per plane, P per channel and A per plane or per channel (scale_stride) */
TARGETS static void NAME(input_grad)(const T* grad_y, const T* x, int layout, int64_t samples, int64_t rows,
                             int64_t channels, const T* mean, const T* scale, int64_t scale_stride, const T* coef_x,
                             const T* coef_const, T* grad_x, int threads) {
    if (layout == LAYOUT_NHWC) {
        FOR_EACH_UNIT(samples, channels, threads) {
            NAME(nhwc_input_grad_unit)(grad_y + s * rows * channels + j0, x + s * rows * channels + j0,
                                       mean + s * channels + j0, scale + s * scale_stride + j0, coef_x + j0,
                                       coef_const + s * channels + j0, rows, channels, width,
                                       grad_x + s * rows * channels + j0);
        }
    } else {
        FOR_EACH_PLANE(samples * channels, threads) {
            int64_t n = p / channels, c = p % channels;
            T a = scale[n * scale_stride + c], m = mean[p], cx = coef_x[c], q = coef_const[p];
            const T* restrict g = grad_y + p * rows;
            const T* restrict in = x + p * rows;
            T* restrict out = grad_x + p * rows;
            for (int64_t i = 0; i < rows; ++i) out[i] = a * g[i] + cx * (in[i] - m) + q;
        }
    }
}

/* ---- the coefficient math: per channel, loops over the samples, for a range of channels [j0, j1); (N, C) arrays are
 * row-major, so every inner loop runs along a row. γ and β (weight, bias) are always given: ones and zeros for a
 * layer without affine parameters. */

/* in T's precision, as torch's rsqrt (vectorised: built with -fno-math-errno) */
INLINE T NAME(square_root)(T value) {
    return sizeof(T) == sizeof(float) ? (T)__builtin_sqrtf((float)value) : (T)__builtin_sqrt((double)value);
}

/* _CalibratedBase._batch_mean_var (local statistics): μ = mean_n(m'), σ² = mean_n(v + (m' − μ)²), for the
 * calibrated means m' = m + m·w_m (RBN's x + w_m·GAP(x)), or m' = m when w_m is NULL */
INLINE void NAME(batch_statistics)(const T* restrict mean_nc, const T* restrict var_nc,
                                          const T* restrict centering_weight, int64_t samples, int64_t channels,
                                          int64_t j0, int64_t j1, T* restrict mean, T* restrict var) {
    const T* restrict w_m = centering_weight;
    T inv_samples = (T)1 / (T)samples;
    for (int64_t j = j0; j < j1; ++j) mean[j] = var[j] = 0;
    for (int64_t n = 0; n < samples; ++n) {
        const T* restrict m = mean_nc + n * channels;
        if (w_m)
            for (int64_t j = j0; j < j1; ++j) mean[j] += m[j] + m[j] * w_m[j];
        else
            for (int64_t j = j0; j < j1; ++j) mean[j] += m[j];
    }
    for (int64_t j = j0; j < j1; ++j) mean[j] *= inv_samples;
    for (int64_t n = 0; n < samples; ++n) {
        const T* restrict m = mean_nc + n * channels;
        const T* restrict v = var_nc + n * channels;
        if (w_m)
            for (int64_t j = j0; j < j1; ++j) {
                T u = (m[j] + m[j] * w_m[j]) - mean[j];
                var[j] += v[j] + u * u;
            }
        else
            for (int64_t j = j0; j < j1; ++j) {
                T u = m[j] - mean[j];
                var[j] += v[j] + u * u;
            }
    }
    for (int64_t j = j0; j < j1; ++j) var[j] *= inv_samples;
}

/* _CalibratedBase._moments_backward (local statistics): grad_mean_nc holds ∂L/∂u on entry and ∂L/∂m' on return, for
 * u = m' − μ (w_m as in batch_statistics), given ∂L/∂σ² in grad_batch_var; `total` is per-channel scratch */
INLINE void NAME(moments_backward)(const T* restrict mean_nc, const T* restrict centering_weight,
                                          const T* restrict mean, const T* restrict grad_batch_var, int64_t samples,
                                          int64_t channels, int64_t j0, int64_t j1, T* restrict grad_mean_nc,
                                          T* restrict total) {
    const T* restrict w_m = centering_weight;
    T inv_samples = (T)1 / (T)samples;
    for (int64_t j = j0; j < j1; ++j) total[j] = 0;
    for (int64_t n = 0; n < samples; ++n) {
        const T* restrict m = mean_nc + n * channels;
        T* restrict g = grad_mean_nc + n * channels;
        if (w_m)
            for (int64_t j = j0; j < j1; ++j) {
                g[j] += ((m[j] + m[j] * w_m[j]) - mean[j]) * (grad_batch_var[j] * ((T)2 * inv_samples));
                total[j] += g[j];
            }
        else
            for (int64_t j = j0; j < j1; ++j) {
                g[j] += (m[j] - mean[j]) * (grad_batch_var[j] * ((T)2 * inv_samples));
                total[j] += g[j];
            }
    }
    for (int64_t j = j0; j < j1; ++j) total[j] *= inv_samples;
    for (int64_t n = 0; n < samples; ++n)
        for (int64_t j = j0; j < j1; ++j) grad_mean_nc[n * channels + j] -= total[j];
}

/* The input gradient's coefficients from ∂L/∂m (grad_mean_nc, replaced by Q) and ∂L/∂v (grad_var, replaced by P):
 * y depends on x directly (A·dy), through v (∂v/∂x = 2(x − m)/HW) and through m (∂m/∂x = 1/HW), which enters A, B
 * and x − m (the latter contributes −A·Σdy): P = 2·∂L/∂v / HW, Q = (∂L/∂m − A·Σdy) / HW. */
INLINE void NAME(input_grad_coefficients)(int64_t samples, int64_t channels, int64_t rows,
                                                 const T* restrict scale, int64_t scale_stride,
                                                 const T* restrict total, T* restrict grad_mean_nc,
                                                 T* restrict grad_var) {
    T inv_rows = (T)1 / (T)rows;
    for (int64_t n = 0; n < samples; ++n) {
        const T* restrict a = scale + n * scale_stride;
        const T* restrict sum = total + n * channels;
        T* restrict q = grad_mean_nc + n * channels;
        for (int64_t c = 0; c < channels; ++c) q[c] = (q[c] - a[c] * sum[c]) * inv_rows;
    }
    for (int64_t c = 0; c < channels; ++c) grad_var[c] *= (T)2 * inv_rows;
}

/* nn.BatchNorm2d's running-statistics update, in place: r ← r + w·(b − r) for the batch's μ and its unbiased σ²
 * (σ²·n/(n − 1), n values per channel), with torch.lerp's formula (the other form when w ≥ 0.5); running_mean NULL:
 * no update (evaluation, track_running_stats=False, or buffers the caller updates itself) */
INLINE void NAME(running_update_range)(const T* restrict mean, const T* restrict var, int64_t count, T momentum,
                                              int64_t j0, int64_t j1, T* restrict running_mean,
                                              T* restrict running_var) {
    if (!running_mean) return;
    T ratio = (T)((double)count / (double)(count > 1 ? count - 1 : 1)), rest = (T)1 - momentum;
    for (int64_t j = j0; j < j1; ++j) {
        T unbiased = var[j] * ratio;
        if (momentum < (T)0.5) {
            running_mean[j] = running_mean[j] + momentum * (mean[j] - running_mean[j]);
            running_var[j] = running_var[j] + momentum * (unbiased - running_var[j]);
        } else {
            running_mean[j] = mean[j] - (mean[j] - running_mean[j]) * rest;
            running_var[j] = unbiased - (unbiased - running_var[j]) * rest;
        }
    }
}

/* ---- RBN (_RBNBase): y = γ·s·x̂ + β, x̂ normalises x + w_m·GAP(x), s = k·σ(w_v·GAP(x̂) + w_b) ------------------ */
/* The math of each step runs in a *_range function over channels [j0, j1), whose `restrict` parameters tell the
 * compiler that no two arrays overlap (an OpenMP loop body alone loses that, and stays scalar). */

/* μ, σ², r = 1/sqrt(σ² + ε) of the calibrated input and the calibration s = σ(z), z = w_b + w_v·(u·r) (u = m' − μ) */
INLINE void NAME(rbn_sigmoid_range)(const T* restrict mean_nc, const T* restrict var_nc,
                                           const T* restrict w_m, const T* restrict w_v, const T* restrict w_b, T eps,
                                           int64_t samples, int64_t channels, int64_t j0, int64_t j1,
                                           T* restrict mean, T* restrict var, T* restrict inv_std,
                                           T* restrict sigmoid) {
    NAME(batch_statistics)(mean_nc, var_nc, w_m, samples, channels, j0, j1, mean, var);
    for (int64_t j = j0; j < j1; ++j) inv_std[j] = (T)1 / NAME(square_root)(var[j] + eps);
    for (int64_t n = 0; n < samples; ++n) {
        const T* restrict m = mean_nc + n * channels;
        T* restrict s = sigmoid + n * channels;
        for (int64_t j = j0; j < j1; ++j)
            s[j] = NAME(sigmoid_of)(w_b[j] + w_v[j] * (((m[j] + m[j] * w_m[j]) - mean[j]) * inv_std[j]));
    }
}

/* A = (k·s)·(γ·r) and B' = β − A·(m − u) per plane (k: the identity_init factor; w_m NULL: m − u = μ, IEBN) */
INLINE void NAME(calibrated_affine_range)(const T* restrict mean_nc, const T* restrict sigmoid,
                                                 const T* restrict mean, const T* restrict inv_std,
                                                 const T* restrict gamma, const T* restrict beta,
                                                 const T* restrict w_m, T factor, int64_t samples, int64_t channels,
                                                 int64_t j0, int64_t j1, T* restrict scale, T* restrict shift) {
    for (int64_t n = 0; n < samples; ++n) {
        int64_t row = n * channels;
        const T *restrict m = mean_nc + row, *restrict s = sigmoid + row;
        T *restrict a = scale + row, *restrict b = shift + row;
        if (w_m)
            for (int64_t j = j0; j < j1; ++j) {
                T u = (m[j] + m[j] * w_m[j]) - mean[j];
                a[j] = (s[j] * factor) * (gamma[j] * inv_std[j]);
                b[j] = beta[j] - a[j] * (m[j] - u);
            }
        else
            for (int64_t j = j0; j < j1; ++j) {
                a[j] = (s[j] * factor) * (gamma[j] * inv_std[j]);
                b[j] = beta[j] - a[j] * mean[j];
            }
    }
}

/* forward: m, v of every plane; μ, σ², r and s = σ(z); the running statistics; A, B' per plane; y = x·A + B' */
TARGETS void NAME(rbn_forward)(const T* x, int layout, int64_t samples, int64_t rows, int64_t channels,
                               const T* weight, const T* bias, const T* centering_weight, const T* scaling_weight,
                               const T* scaling_bias, T eps, T factor, T* mean_nc, T* var_nc, T* sigmoid, T* scale,
                               T* shift, T* mean, T* var, T* inv_std, T* y, T* running_mean, T* running_var,
                               T momentum, int threads) {
    NAME(moments)(x, layout, samples, rows, channels, mean_nc, var_nc, threads);
    FOR_EACH_CHANNEL_RANGE(channels, threads) {
        NAME(rbn_sigmoid_range)(mean_nc, var_nc, centering_weight, scaling_weight, scaling_bias, eps, samples,
                                channels, j0, j1, mean, var, inv_std, sigmoid);
        NAME(running_update_range)(mean, var, samples * rows, momentum, j0, j1, running_mean, running_var);
        NAME(calibrated_affine_range)(mean_nc, sigmoid, mean, inv_std, weight, bias, centering_weight, factor,
                                      samples, channels, j0, j1, scale, shift);
    }
    NAME(affine)(x, layout, samples, rows, channels, scale, channels, shift, channels, y, threads);
}

/* ∂L/∂m, ∂L/∂v and the gradients of γ, β, w_m, w_v, w_b from Σdy·(x − m) (grad_scale) and Σdy (grad_shift) per
 * plane; gap_dot and total: per-channel scratch */
INLINE void NAME(rbn_backward_range)(
        const T* restrict mean_nc, const T* restrict sigmoid, const T* restrict scale, const T* restrict mean,
        const T* restrict inv_std, const T* restrict gamma, const T* restrict w_m, const T* restrict w_v,
        const T* restrict grad_scale, const T* restrict grad_shift, T factor, int64_t samples, int64_t channels,
        int64_t j0, int64_t j1, T* restrict grad_mean_nc, T* restrict grad_var, T* restrict gain,
        T* restrict shift_sum, T* restrict centering_dot, T* restrict logit_dot, T* restrict logit_sum,
        T* restrict gap_dot, T* restrict total) {
    for (int64_t j = j0; j < j1; ++j) gain[j] = shift_sum[j] = logit_dot[j] = logit_sum[j] = gap_dot[j] = 0;
    for (int64_t n = 0; n < samples; ++n) {
        int64_t row = n * channels;
        const T *restrict m = mean_nc + row, *restrict s = sigmoid + row, *restrict a = scale + row;
        const T *restrict d = grad_scale + row, *restrict g_shift = grad_shift + row;
        T* restrict g_u = grad_mean_nc + row;
        for (int64_t j = j0; j < j1; ++j) {
            T u = (m[j] + m[j] * w_m[j]) - mean[j];
            T g_scale = d[j] + g_shift[j] * u; /* B = A·u + β depends on A too */
            gain[j] += g_scale * (s[j] * factor);
            T g_calibration = g_scale * a[j];
            T g_logit = g_calibration - g_calibration * s[j]; /* ∂s/∂z = s·(1 − σ(z)) */
            T g_gap = g_logit * w_v[j];
            gap_dot[j] += g_gap * u;
            logit_dot[j] += g_logit * (u * inv_std[j]);
            logit_sum[j] += g_logit;
            shift_sum[j] += g_shift[j];
            g_u[j] = g_shift[j] * a[j] + g_gap * inv_std[j]; /* ∂L/∂u */
        }
    }
    for (int64_t j = j0; j < j1; ++j) { /* ∂L/∂σ² through r = (σ² + ε)^(−1/2), into grad_var for now */
        T r = inv_std[j];
        grad_var[j] = (gap_dot[j] + gain[j] * gamma[j]) * (r * r * r) * (T)-0.5;
        gain[j] *= r;
    }
    NAME(moments_backward)(mean_nc, w_m, mean, grad_var, samples, channels, j0, j1, grad_mean_nc, total);
    for (int64_t j = j0; j < j1; ++j) centering_dot[j] = 0;
    for (int64_t n = 0; n < samples; ++n) { /* through m' = m + m·w_m */
        const T* restrict m = mean_nc + n * channels;
        T* restrict g = grad_mean_nc + n * channels;
        for (int64_t j = j0; j < j1; ++j) {
            centering_dot[j] += g[j] * m[j];
            g[j] = g[j] + g[j] * w_m[j];
        }
    }
    for (int64_t j = j0; j < j1; ++j) grad_var[j] /= (T)samples;
}

/* backward: the parameters' gradients and, unless grad_x is NULL, dx; scratch: 3·N·C + 3·C values */
TARGETS void NAME(rbn_backward)(const T* grad_y, const T* x, int layout, int64_t samples, int64_t rows,
                                int64_t channels, const T* mean_nc, const T* sigmoid, const T* scale, const T* mean,
                                const T* inv_std, const T* weight, const T* centering_weight,
                                const T* scaling_weight, T factor, T* grad_x, T* grad_weight, T* grad_bias,
                                T* grad_centering_weight, T* grad_scaling_weight, T* grad_scaling_bias, T* scratch,
                                int threads) {
    int64_t planes = samples * channels;
    T *total = scratch, *dot = scratch + planes, *grad_mean_nc = scratch + 2 * planes;
    T *grad_var = scratch + 3 * planes, *temp = grad_var + channels;
    NAME(grad_sums)(grad_y, x, layout, samples, rows, channels, mean_nc, total, dot, threads);
    FOR_EACH_CHANNEL_RANGE(channels, threads) {
        NAME(rbn_backward_range)(mean_nc, sigmoid, scale, mean, inv_std, weight, centering_weight, scaling_weight,
                                 dot, total, factor, samples, channels, j0, j1, grad_mean_nc, grad_var, grad_weight,
                                 grad_bias, grad_centering_weight, grad_scaling_weight, grad_scaling_bias, temp,
                                 temp + channels);
    }
    if (!grad_x) return;
    NAME(input_grad_coefficients)(samples, channels, rows, scale, channels, total, grad_mean_nc, grad_var);
    NAME(input_grad)(grad_y, x, layout, samples, rows, channels, mean_nc, scale, channels, grad_var, grad_mean_nc,
                     grad_x, threads);
}

/* ---- IEBN (_IEBNBase): y = x̂·(γ·a) + β, a = k·σ(γ̂·GAP(x) + β̂) --------------------------------------------------- */

/* the calibration s = σ(γ̂·m + β̂) per plane */
INLINE void NAME(iebn_sigmoid_range)(const T* restrict mean_nc, const T* restrict w_i, const T* restrict b_i,
                                            int64_t samples, int64_t channels, int64_t j0, int64_t j1,
                                            T* restrict sigmoid) {
    for (int64_t n = 0; n < samples; ++n) {
        const T* restrict m = mean_nc + n * channels;
        T* restrict s = sigmoid + n * channels;
        for (int64_t j = j0; j < j1; ++j) s[j] = NAME(sigmoid_of)(b_i[j] + w_i[j] * m[j]);
    }
}

INLINE void NAME(statistics_range)(const T* restrict mean_nc, const T* restrict var_nc, T eps,
                                          int64_t samples, int64_t channels, int64_t j0, int64_t j1,
                                          T* restrict mean, T* restrict var, T* restrict inv_std) {
    NAME(batch_statistics)(mean_nc, var_nc, 0, samples, channels, j0, j1, mean, var);
    for (int64_t j = j0; j < j1; ++j) inv_std[j] = (T)1 / NAME(square_root)(var[j] + eps);
}

/* forward: m, v of every plane; s = σ(γ̂·m + β̂); μ, σ², r; the running statistics; A = (k·s)·(γ·r),
 * B' = β − A·μ per plane; y = x·A + B' */
TARGETS void NAME(iebn_forward)(const T* x, int layout, int64_t samples, int64_t rows, int64_t channels,
                                const T* weight, const T* bias, const T* instance_weight, const T* instance_bias,
                                T eps, T factor, T* mean_nc, T* var_nc, T* sigmoid, T* scale, T* shift, T* mean,
                                T* var, T* inv_std, T* y, T* running_mean, T* running_var, T momentum,
                                int threads) {
    NAME(moments)(x, layout, samples, rows, channels, mean_nc, var_nc, threads);
    FOR_EACH_CHANNEL_RANGE(channels, threads) {
        NAME(iebn_sigmoid_range)(mean_nc, instance_weight, instance_bias, samples, channels, j0, j1, sigmoid);
        NAME(statistics_range)(mean_nc, var_nc, eps, samples, channels, j0, j1, mean, var, inv_std);
        NAME(running_update_range)(mean, var, samples * rows, momentum, j0, j1, running_mean, running_var);
        NAME(calibrated_affine_range)(mean_nc, sigmoid, mean, inv_std, weight, bias, 0, factor, samples, channels,
                                      j0, j1, scale, shift);
    }
    NAME(affine)(x, layout, samples, rows, channels, scale, channels, shift, channels, y, threads);
}

/* ∂L/∂m, ∂L/∂v and the gradients of γ, β, γ̂, β̂ from Σdy·(x − m) (grad_scale) and Σdy (grad_shift) per plane;
 * total: per-channel scratch */
INLINE void NAME(iebn_backward_range)(
        const T* restrict mean_nc, const T* restrict sigmoid, const T* restrict scale, const T* restrict mean,
        const T* restrict inv_std, const T* restrict gamma, const T* restrict w_i, const T* restrict grad_scale,
        const T* restrict grad_shift, T factor, int64_t samples, int64_t channels, int64_t j0, int64_t j1,
        T* restrict grad_mean_nc, T* restrict grad_var, T* restrict gain, T* restrict shift_sum,
        T* restrict logit_dot, T* restrict logit_sum, T* restrict total) {
    for (int64_t j = j0; j < j1; ++j) gain[j] = shift_sum[j] = logit_dot[j] = logit_sum[j] = 0;
    for (int64_t n = 0; n < samples; ++n) {
        int64_t row = n * channels;
        const T *restrict m = mean_nc + row, *restrict s = sigmoid + row, *restrict a = scale + row;
        const T *restrict d = grad_scale + row, *restrict g_shift = grad_shift + row;
        T* restrict g_u = grad_mean_nc + row;
        for (int64_t j = j0; j < j1; ++j) {
            T g_scale = d[j] + g_shift[j] * (m[j] - mean[j]); /* B = A·(m − μ) + β depends on A */
            gain[j] += g_scale * (s[j] * factor);
            T g_attention = g_scale * a[j];
            T g_logit = g_attention - g_attention * s[j]; /* ∂a/∂z = a·(1 − σ(z)) */
            logit_dot[j] += g_logit * m[j];
            logit_sum[j] += g_logit;
            shift_sum[j] += g_shift[j];
            g_u[j] = g_shift[j] * a[j]; /* ∂L/∂u */
        }
    }
    for (int64_t j = j0; j < j1; ++j) { /* ∂L/∂σ² through r = (σ² + ε)^(−1/2), into grad_var for now */
        T r = inv_std[j];
        grad_var[j] = (gain[j] * gamma[j]) * (r * r * r) * (T)-0.5;
        gain[j] *= r;
    }
    NAME(moments_backward)(mean_nc, 0, mean, grad_var, samples, channels, j0, j1, grad_mean_nc, total);
    for (int64_t n = 0; n < samples; ++n) { /* the logit γ̂·m + β̂ depends on m too */
        int64_t row = n * channels;
        const T *restrict m = mean_nc + row, *restrict s = sigmoid + row, *restrict a = scale + row;
        const T *restrict d = grad_scale + row, *restrict g_shift = grad_shift + row;
        T* restrict g = grad_mean_nc + row;
        for (int64_t j = j0; j < j1; ++j) {
            T g_attention = (d[j] + g_shift[j] * (m[j] - mean[j])) * a[j];
            g[j] += (g_attention - g_attention * s[j]) * w_i[j];
        }
    }
    for (int64_t j = j0; j < j1; ++j) grad_var[j] /= (T)samples;
}

/* backward: the parameters' gradients and, unless grad_x is NULL, dx; scratch: 3·N·C + 3·C values */
TARGETS void NAME(iebn_backward)(const T* grad_y, const T* x, int layout, int64_t samples, int64_t rows,
                                 int64_t channels, const T* mean_nc, const T* sigmoid, const T* scale, const T* mean,
                                 const T* inv_std, const T* weight, const T* instance_weight, T factor, T* grad_x,
                                 T* grad_weight, T* grad_bias, T* grad_instance_weight, T* grad_instance_bias,
                                 T* scratch, int threads) {
    int64_t planes = samples * channels;
    T *total = scratch, *dot = scratch + planes, *grad_mean_nc = scratch + 2 * planes;
    T *grad_var = scratch + 3 * planes, *temp = grad_var + channels;
    NAME(grad_sums)(grad_y, x, layout, samples, rows, channels, mean_nc, total, dot, threads);
    FOR_EACH_CHANNEL_RANGE(channels, threads) {
        NAME(iebn_backward_range)(mean_nc, sigmoid, scale, mean, inv_std, weight, instance_weight, dot, total, factor,
                                  samples, channels, j0, j1, grad_mean_nc, grad_var, grad_weight, grad_bias,
                                  grad_instance_weight, grad_instance_bias, temp);
    }
    if (!grad_x) return;
    NAME(input_grad_coefficients)(samples, channels, rows, scale, channels, total, grad_mean_nc, grad_var);
    NAME(input_grad)(grad_y, x, layout, samples, rows, channels, mean_nc, scale, channels, grad_var, grad_mean_nc,
                     grad_x, threads);
}

/* ---- blended σ (_BlendedStdBase): y = (x − μ)/σ + β, σ = α·σ_prev + (1 − α)·σ_B (σ_B alone where σ_prev = 0) --- */

INLINE void NAME(blend_range)(const T* restrict mean_nc, const T* restrict var_nc,
                                     const T* restrict previous, const T* restrict beta, T eps, T prev_weight,
                                     int64_t samples, int64_t channels, int64_t j0, int64_t j1, T* restrict mean,
                                     T* restrict var, T* restrict batch_std, T* restrict scale, T* restrict shift) {
    NAME(batch_statistics)(mean_nc, var_nc, 0, samples, channels, j0, j1, mean, var);
    for (int64_t j = j0; j < j1; ++j) {
        T sigma_b = NAME(square_root)(var[j] + eps);
        T blended = sigma_b + prev_weight * (previous[j] - sigma_b); /* torch.lerp(σ_B, σ_prev, α) */
        batch_std[j] = sigma_b;
        scale[j] = (T)1 / (previous[j] > 0 ? blended : sigma_b);
        shift[j] = beta[j] - scale[j] * mean[j];
    }
}

/* forward: m, v of every plane, μ, σ², σ_B = sqrt(σ² + ε), A = 1/σ and B' = β − A·μ per channel, the running
 * statistics, and y = x·A + B' (prev_std all 0: σ = σ_B, as in evaluation with batch statistics) */
TARGETS void NAME(blend_forward)(const T* x, int layout, int64_t samples, int64_t rows, int64_t channels,
                                 const T* prev_std, const T* bias, T eps, T prev_weight, T* mean_nc, T* var_nc,
                                 T* mean, T* var, T* batch_std, T* scale, T* shift, T* y, T* running_mean,
                                 T* running_var, T momentum, int threads) {
    NAME(moments)(x, layout, samples, rows, channels, mean_nc, var_nc, threads);
    FOR_EACH_CHANNEL_RANGE(channels, threads) {
        NAME(blend_range)(mean_nc, var_nc, prev_std, bias, eps, prev_weight, samples, channels, j0, j1, mean, var,
                          batch_std, scale, shift);
        NAME(running_update_range)(mean, var, samples * rows, momentum, j0, j1, running_mean, running_var);
    }
    NAME(affine)(x, layout, samples, rows, channels, scale, 0, shift, 0, y, threads);
}

INLINE void NAME(blend_backward_range)(
        const T* restrict mean_nc, const T* restrict mean, const T* restrict scale, const T* restrict batch_std,
        const T* restrict previous, T prev_weight, const T* restrict dot, const T* restrict total, int64_t samples,
        int64_t channels, int64_t j0, int64_t j1, T* restrict grad_mean_nc, T* restrict grad_var,
        T* restrict shift_sum, T* restrict grad_scale, T* restrict moments_total) {
    for (int64_t j = j0; j < j1; ++j) grad_scale[j] = shift_sum[j] = 0;
    for (int64_t n = 0; n < samples; ++n) {
        int64_t row = n * channels;
        const T *restrict m = mean_nc + row, *restrict d = dot + row, *restrict g_shift = total + row;
        T* restrict g_u = grad_mean_nc + row;
        for (int64_t j = j0; j < j1; ++j) {
            grad_scale[j] += d[j] + g_shift[j] * (m[j] - mean[j]); /* B = A·u + β depends on A */
            shift_sum[j] += g_shift[j];
            g_u[j] = g_shift[j] * scale[j];
        }
    }
    for (int64_t j = j0; j < j1; ++j) { /* A = 1/σ, σ = α·σ_prev + (1 − α)·σ_B, σ_B = sqrt(σ² + ε) */
        T std_grad_factor = (T)1 - (previous[j] > 0 ? prev_weight : (T)0);
        grad_var[j] = grad_scale[j] * (scale[j] * scale[j]) * std_grad_factor / batch_std[j] * (T)-0.5;
    }
    NAME(moments_backward)(mean_nc, 0, mean, grad_var, samples, channels, j0, j1, grad_mean_nc, moments_total);
    for (int64_t j = j0; j < j1; ++j) grad_var[j] /= (T)samples;
}

/* backward: β's gradient and, unless grad_x is NULL, dx, with σ_prev constant (∂σ/∂σ_B = 1 − α where blended);
 * scratch: 3·N·C + 3·C values */
TARGETS void NAME(blend_backward)(const T* grad_y, const T* x, int layout, int64_t samples, int64_t rows,
                                  int64_t channels, const T* mean_nc, const T* mean, const T* scale,
                                  const T* batch_std, const T* prev_std, T prev_weight, T* grad_x, T* grad_bias,
                                  T* scratch, int threads) {
    int64_t planes = samples * channels;
    T *total = scratch, *dot = scratch + planes, *grad_mean_nc = scratch + 2 * planes;
    T *grad_var = scratch + 3 * planes, *temp = grad_var + channels;
    NAME(grad_sums)(grad_y, x, layout, samples, rows, channels, mean_nc, total, dot, threads);
    FOR_EACH_CHANNEL_RANGE(channels, threads) {
        NAME(blend_backward_range)(mean_nc, mean, scale, batch_std, prev_std, prev_weight, dot, total, samples,
                                   channels, j0, j1, grad_mean_nc, grad_var, grad_bias, temp, temp + channels);
    }
    if (!grad_x) return;
    NAME(input_grad_coefficients)(samples, channels, rows, scale, 0, total, grad_mean_nc, grad_var);
    NAME(input_grad)(grad_y, x, layout, samples, rows, channels, mean_nc, scale, 0, grad_var, grad_mean_nc, grad_x,
                     threads);
}

#endif
