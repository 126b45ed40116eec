/* Per-channel sum and sum of squares of a contiguous (N, C, K) tensor, in one read, float64 sums.
 *
 * Each (example, channel) plane of K values is reduced by one thread into a float64 pair
 * (sum; sum of squares) kept in `pieces` (2 * N * C doubles); the pairs are then added per channel
 * in example order into `out` (sums in out[0..C), sums of squares in out[C..2C)). The plane-to-
 * thread split never changes what is added to what, so the result does not depend on `threads`.
 * A float32 value and its square are exact in float64: only the additions round.
 */
#include <stdint.h>

#define CHANNEL_MOMENTS(NAME, T)                                                                  \
  void NAME(const T *x, int64_t n, int64_t c, int64_t k, double *pieces, double *out,             \
            int threads) {                                                                        \
    int64_t planes = n * c;                                                                       \
    _Pragma("omp parallel for schedule(static) num_threads(threads)")                             \
    for (int64_t p = 0; p < planes; ++p) {                                                        \
      const T *row = x + p * k;                                                                   \
      double s = 0.0, q = 0.0;                                                                    \
      _Pragma("omp simd reduction(+:s,q)")                                                        \
      for (int64_t i = 0; i < k; ++i) {                                                           \
        double v = row[i];                                                                        \
        s += v;                                                                                   \
        q += v * v;                                                                               \
      }                                                                                           \
      pieces[2 * p] = s;                                                                          \
      pieces[2 * p + 1] = q;                                                                      \
    }                                                                                             \
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

CHANNEL_MOMENTS(channel_moments_f32, float)
CHANNEL_MOMENTS(channel_moments_f64, double)
