/* fft: a CPU-heavy WASI command for Flotilla: an iterative radix-2 complex FFT (double).
 *   fft             reads whitespace-separated real numbers from stdin (at most 2^20),
 *                   zero-pads them to a power of two, and prints the magnitude of each
 *                   bin of their spectrum, one per line ("%.6f").
 *   fft --bench N   runs N forward FFTs of size 65536 on deterministic data (one sample
 *                   changed per iteration) and prints "checksum S", S the sum of all
 *                   magnitudes. The twiddles come from our own Taylor series, not libm,
 *                   so native and wasm builds print the same digits. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PI 3.14159265358979323846
#define MAX_POINTS (1u << 20)

typedef struct { double re, im; } complex_t;

/* sin and cos of x in [0, pi] by their Taylor series (accurate to about 1e-15). */
static double series_sin(double x) {
    double x2 = x * x, term = x, sum = x;
    for (int k = 1; k <= 14; k++) {
        term *= -x2 / ((2.0 * k) * (2.0 * k + 1.0));
        sum += term;
    }
    return sum;
}

static double series_cos(double x) {
    double x2 = x * x, term = 1.0, sum = 1.0;
    for (int k = 1; k <= 14; k++) {
        term *= -x2 / ((2.0 * k - 1.0) * (2.0 * k));
        sum += term;
    }
    return sum;
}

/* Twiddles w[k] = exp(-2 pi i k / n) for k < n/2. */
static complex_t *twiddles(size_t n) {
    complex_t *w = malloc((n / 2 + 1) * sizeof *w);
    if (!w) return NULL;
    for (size_t k = 0; k < n / 2; k++) {
        double angle = 2.0 * PI * (double)k / (double)n;
        w[k].re = series_cos(angle);
        w[k].im = -series_sin(angle);
    }
    return w;
}

/* In-place forward FFT of x (n a power of two), with twiddles for n. */
static void fft(complex_t *x, size_t n, const complex_t *w) {
    for (size_t i = 1, j = 0; i < n; i++) {
        size_t bit = n >> 1;
        for (; j & bit; bit >>= 1) j ^= bit;
        j ^= bit;
        if (i < j) {
            complex_t t = x[i];
            x[i] = x[j];
            x[j] = t;
        }
    }
    for (size_t len = 2; len <= n; len <<= 1) {
        size_t half = len / 2, stride = n / len;
        for (size_t start = 0; start < n; start += len) {
            for (size_t k = 0; k < half; k++) {
                complex_t a = x[start + k], b = x[start + k + half], t;
                complex_t tw = w[k * stride];
                t.re = b.re * tw.re - b.im * tw.im;
                t.im = b.re * tw.im + b.im * tw.re;
                x[start + k].re = a.re + t.re;
                x[start + k].im = a.im + t.im;
                x[start + k + half].re = a.re - t.re;
                x[start + k + half].im = a.im - t.im;
            }
        }
    }
}

static int bench(long iterations) {
    const size_t n = 65536;
    complex_t *base = malloc(n * sizeof *base), *work = malloc(n * sizeof *work);
    complex_t *w = twiddles(n);
    if (!base || !work || !w) {
        fprintf(stderr, "fft: out of memory\n");
        return 1;
    }
    uint64_t s = 88172645463325252ull;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        base[i].re = (double)(s >> 11) / 9007199254740992.0 * 2.0 - 1.0;
        base[i].im = 0.0;
    }
    double checksum = 0.0;
    for (long it = 0; it < iterations; it++) {
        memcpy(work, base, n * sizeof *work);
        work[(size_t)it % n].re += 1.0;
        fft(work, n, w);
        for (size_t i = 0; i < n; i++)
            checksum += sqrt(work[i].re * work[i].re + work[i].im * work[i].im);
    }
    printf("checksum %.6f\n", checksum);
    free(base);
    free(work);
    free(w);
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--bench") == 0)
        return bench(argc > 2 ? atol(argv[2]) : 100);
    if (argc > 1) {
        fprintf(stderr, "usage: fft [--bench N] < numbers\n");
        return 2;
    }
    size_t count = 0, cap = 1024;
    complex_t *x = malloc(cap * sizeof *x);
    double v;
    int got;
    while (x && (got = scanf("%lf", &v)) == 1) {
        if (count == MAX_POINTS) {
            fprintf(stderr, "fft: more than %u numbers\n", MAX_POINTS);
            return 1;
        }
        if (count == cap) {
            complex_t *bigger = realloc(x, 2 * cap * sizeof *x);
            if (!bigger) break;
            x = bigger;
            cap *= 2;
        }
        x[count].re = v;
        x[count].im = 0.0;
        count++;
    }
    if (!x || (got != EOF && got != 1)) {
        fprintf(stderr, "fft: stdin must hold whitespace-separated numbers\n");
        return 1;
    }
    size_t n = 1;
    while (n < count) n <<= 1;
    if (n > cap) {
        complex_t *bigger = realloc(x, n * sizeof *x);
        if (!bigger) {
            fprintf(stderr, "fft: out of memory\n");
            return 1;
        }
        x = bigger;
    }
    for (size_t i = count; i < n; i++) x[i].re = x[i].im = 0.0;
    complex_t *w = twiddles(n);
    if (!w) {
        fprintf(stderr, "fft: out of memory\n");
        return 1;
    }
    fft(x, n, w);
    for (size_t i = 0; i < n; i++) printf("%.6f\n", sqrt(x[i].re * x[i].re + x[i].im * x[i].im));
    free(x);
    free(w);
    return 0;
}
