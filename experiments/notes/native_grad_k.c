/* A hand-written CPU loop for the per-pixel filter's gradient in its weights, to measure what a
 * native kernel could reach against svconv's XLA path (see xla-cpu.md; not part of svconv).
 *
 *   dk[n, i, j, a, b] = sum_c x[n, i + a - ph, j + b - pw, c] * dy[n, i, j, c]
 *
 * stride 1, dilation 1, zero padding, one group, float32, NHWC. Each pixel's dy is loaded once;
 * each tap is a dot product over the channels (16 at a time with AVX-512 when C % 16 == 0, two accumulators when C % 32 == 0),
 * then a horizontal sum. Rows of output pixels are spread over OpenMP threads. */
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static float dot(const float *restrict v, const float *restrict g, int c) {
#ifdef __AVX512F__
  if (c % 32 == 0) { /* two independent accumulators */
    __m512 s = _mm512_setzero_ps(), t = _mm512_setzero_ps();
    for (int k = 0; k < c; k += 32) {
      s = _mm512_fmadd_ps(_mm512_loadu_ps(v + k), _mm512_loadu_ps(g + k), s);
      t = _mm512_fmadd_ps(_mm512_loadu_ps(v + k + 16), _mm512_loadu_ps(g + k + 16), t);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s, t));
  }
  if (c % 16 == 0) {
    __m512 s = _mm512_setzero_ps();
    for (int k = 0; k < c; k += 16)
      s = _mm512_fmadd_ps(_mm512_loadu_ps(v + k), _mm512_loadu_ps(g + k), s);
    return _mm512_reduce_add_ps(s);
  }
#endif
  float s = 0.f;
  for (int k = 0; k < c; k++) s += v[k] * g[k];
  return s;
}

void grad_k(const float *restrict x, const float *restrict dy, float *restrict dk, int n_images,
            int h, int w, int c, int kh, int kw, int ph, int pw) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int n = 0; n < n_images; n++)
    for (int i = 0; i < h; i++)
      for (int j = 0; j < w; j++) {
        const float *g = dy + (((long)n * h + i) * w + j) * c;
        float *out = dk + (((long)n * h + i) * w + j) * kh * kw;
        /* the taps b in [b0, b1) read inside the row */
        int b0 = pw > j ? pw - j : 0, b1 = w - j + pw < kw ? w - j + pw : kw;
        for (int a = 0; a < kh; a++) {
          int r = i + a - ph;
          float *o = out + a * kw;
          for (int b = 0; b < kw; b++) o[b] = 0.f;
          if (r < 0 || r >= h) continue;
          const float *v = x + (((long)n * h + r) * w + (j - pw)) * c;
          for (int b = b0; b < b1; b++) o[b] = dot(v + (long)b * c, g, c);
        }
      }
}
