/* Per-channel sum and sum of squares of a contiguous (N, C, K) tensor, in one read, float64 sums.
 *
 * Each (example, channel) plane of K values is reduced by one thread into a float64 pair
 * (sum; sum of squares) kept in `pieces` (2 * N * C doubles); the pairs are then added per channel
 * in example order into `out` (sums in out[0..C), sums of squares in out[C..2C)). The plane-to-
 * thread split never changes what is added to what, so the result does not depend on `threads`.
 * A float32 value and its square are exact in float64: only the additions round.
 *
 * With AVX2 and FMA a plane is added into four independent 4-lane accumulators, so consecutive
 * additions do not wait on one another; a single accumulator would leave the loop bound by the
 * latency of each addition rather than by reading the plane.
 */
#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static double lane_total(__m256d a, __m256d b, __m256d c, __m256d d) {
  __m256d t = _mm256_add_pd(_mm256_add_pd(a, b), _mm256_add_pd(c, d));
  __m128d h = _mm_add_pd(_mm256_castpd256_pd128(t), _mm256_extractf128_pd(t, 1));
  return _mm_cvtsd_f64(h) + _mm_cvtsd_f64(_mm_unpackhi_pd(h, h));
}

/* Adds the row's first multiple of 16 values into s and q and leaves i after them.
 * LOAD4(row, i) gives four float64 values of the row starting at i as one __m256d. */
#define WIDE_PART(row, k, i, s, q, LOAD4)                                                         \
  {                                                                                               \
    __m256d s0 = _mm256_setzero_pd(), s1 = s0, s2 = s0, s3 = s0;                                  \
    __m256d q0 = s0, q1 = s0, q2 = s0, q3 = s0;                                                   \
    for (; i + 16 <= k; i += 16) {                                                                \
      __m256d v0 = LOAD4(row, i), v1 = LOAD4(row, i + 4);                                         \
      __m256d v2 = LOAD4(row, i + 8), v3 = LOAD4(row, i + 12);                                    \
      s0 = _mm256_add_pd(s0, v0), s1 = _mm256_add_pd(s1, v1);                                     \
      s2 = _mm256_add_pd(s2, v2), s3 = _mm256_add_pd(s3, v3);                                     \
      q0 = _mm256_fmadd_pd(v0, v0, q0), q1 = _mm256_fmadd_pd(v1, v1, q1);                         \
      q2 = _mm256_fmadd_pd(v2, v2, q2), q3 = _mm256_fmadd_pd(v3, v3, q3);                         \
    }                                                                                             \
    s = lane_total(s0, s1, s2, s3);                                                               \
    q = lane_total(q0, q1, q2, q3);                                                               \
  }
#define LOAD4_F32(row, i) _mm256_cvtps_pd(_mm_loadu_ps((row) + (i)))
#define LOAD4_F64(row, i) _mm256_loadu_pd((row) + (i))
#define REST_PRAGMA /* at most 15 values are left: a plain loop */

#else

#define WIDE_PART(row, k, i, s, q, LOAD4) /* no wide part: the loop below takes the whole row */
#define REST_PRAGMA _Pragma("omp simd reduction(+:s,q)")

#endif

/* Sum and sum of squares of one plane of k values: the wide part, where built, then the rest. */
#define PLANE_MOMENTS(NAME, T, LOAD4)                                                             \
  static void NAME(const T *row, int64_t k, double *sum, double *sumsq) {                        \
    double s = 0.0, q = 0.0;                                                                      \
    int64_t i = 0;                                                                                \
    WIDE_PART(row, k, i, s, q, LOAD4)                                                             \
    REST_PRAGMA                                                                                   \
    for (int64_t j = i; j < k; ++j) {                                                             \
      double v = row[j];                                                                          \
      s += v;                                                                                     \
      q += v * v;                                                                                 \
    }                                                                                             \
    *sum = s;                                                                                     \
    *sumsq = q;                                                                                   \
  }

PLANE_MOMENTS(plane_moments_f32, float, LOAD4_F32)
PLANE_MOMENTS(plane_moments_f64, double, LOAD4_F64)

#define CHANNEL_MOMENTS(NAME, T, PLANE)                                                           \
  void NAME(const T *x, int64_t n, int64_t c, int64_t k, double *pieces, double *out,             \
            int threads) {                                                                        \
    int64_t planes = n * c;                                                                       \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
    for (int64_t p = 0; p < planes; ++p)                                                          \
      PLANE(x + p * k, k, &pieces[2 * p], &pieces[2 * p + 1]);                                    \
    for (int64_t j = 0; j < c; ++j) {                                                             \
      out[j] = 0.0;                                                                               \
      out[c + j] = 0.0;                                                                           \
    }                                                                                             \
    for (int64_t i = 0; i < n; ++i)                                                               \
      for (int64_t j = 0; j < c; ++j) {                                                           \
        out[j] += pieces[2 * (i * c + j)];                                                        \
        out[c + j] += pieces[2 * (i * c + j) + 1];                                                \
      }                                                                                           \
  }

CHANNEL_MOMENTS(channel_moments_f32, float, plane_moments_f32)
CHANNEL_MOMENTS(channel_moments_f64, double, plane_moments_f64)
