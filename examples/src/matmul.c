/* matmul: a CPU-heavy WASI command for Flotilla (benchmarks).
 *   matmul --bench [N]  multiplies two deterministic N x N double matrices (N default
 *                       256, at most 4096) with the i-k-j loop and prints
 *                       "checksum S", S the sum of the product's entries ("%.6f").
 * The entries are small fractions computed from their indices, so native and wasm
 * builds print the same digits. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "--bench") != 0) {
        fprintf(stderr, "usage: matmul --bench [N]\n");
        return 2;
    }
    long n = argc > 2 ? atol(argv[2]) : 256;
    if (n < 1 || n > 4096) {
        fprintf(stderr, "matmul: N must be in 1..4096\n");
        return 2;
    }
    size_t count = (size_t)n * (size_t)n;
    double *a = malloc(count * sizeof *a), *b = malloc(count * sizeof *b);
    double *c = calloc(count, sizeof *c);
    if (!a || !b || !c) {
        fprintf(stderr, "matmul: out of memory\n");
        return 1;
    }
    for (long i = 0; i < n; i++)
        for (long j = 0; j < n; j++) {
            a[i * n + j] = (double)((i * 31 + j * 17) % 101) / 50.0 - 1.0;
            b[i * n + j] = (double)((i * 13 + j * 7) % 97) / 48.0 - 1.0;
        }
    for (long i = 0; i < n; i++)
        for (long k = 0; k < n; k++) {
            double aik = a[i * n + k];
            double *ci = c + i * n;
            const double *bk = b + k * n;
            for (long j = 0; j < n; j++) ci[j] += aik * bk[j];
        }
    double checksum = 0.0;
    for (size_t i = 0; i < count; i++) checksum += c[i];
    printf("checksum %.6f\n", checksum);
    free(a);
    free(b);
    free(c);
    return 0;
}
