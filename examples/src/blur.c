/* blur: a CPU-heavy WASI command for Flotilla: a 5x5 Gaussian blur of a greyscale image.
 *   blur [IMAGE [PASSES]]  reads IMAGE (default input.pgm), a binary PGM (P5, maxval
 *                          255), blurs it PASSES times (default 3) and writes
 *                          blurred.pgm to the current directory; prints
 *                          "blurred WxH in N passes". Bad input: a message on stderr
 *                          and exit status 1.
 *   blur --bench N         blurs a deterministic 1024x1024 image in memory N times and
 *                          prints "checksum XXXXXXXX" (FNV-1a of the pixels).
 * The kernel is the binomial [1 4 6 4 1] applied across then down (so 1/256 of the outer
 * product), in integer arithmetic with rounding and clamped edges: the same result on
 * every platform. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SIDE 16384
#define MAX_PIXELS (64u << 20)

static int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

/* One blur pass over img (w x h) in place; tmp holds w*h 16-bit sums. */
static void blur_pass(uint8_t *img, uint16_t *tmp, int w, int h) {
    for (int y = 0; y < h; y++) {
        const uint8_t *row = img + (size_t)y * w;
        uint16_t *out = tmp + (size_t)y * w;
        for (int x = 0; x < w; x++) {
            if (x >= 2 && x < w - 2) {
                out[x] = row[x - 2] + 4 * row[x - 1] + 6 * row[x] + 4 * row[x + 1] + row[x + 2];
            } else {
                out[x] = row[clampi(x - 2, 0, w - 1)] + 4 * row[clampi(x - 1, 0, w - 1)] +
                         6 * row[x] + 4 * row[clampi(x + 1, 0, w - 1)] +
                         row[clampi(x + 2, 0, w - 1)];
            }
        }
    }
    for (int y = 0; y < h; y++) {
        const uint16_t *r0 = tmp + (size_t)clampi(y - 2, 0, h - 1) * w;
        const uint16_t *r1 = tmp + (size_t)clampi(y - 1, 0, h - 1) * w;
        const uint16_t *r2 = tmp + (size_t)y * w;
        const uint16_t *r3 = tmp + (size_t)clampi(y + 1, 0, h - 1) * w;
        const uint16_t *r4 = tmp + (size_t)clampi(y + 2, 0, h - 1) * w;
        uint8_t *out = img + (size_t)y * w;
        for (int x = 0; x < w; x++) {
            uint32_t sum = r0[x] + 4u * r1[x] + 6u * r2[x] + 4u * r3[x] + r4[x];
            out[x] = (uint8_t)((sum + 128) >> 8);
        }
    }
}

static int fail(const char *message, const char *name) {
    fprintf(stderr, "blur: %s: %s\n", name, message);
    return 1;
}

/* Reads one unsigned header number of a PGM, skipping whitespace and # comments. */
static int header_number(const uint8_t *p, size_t n, size_t *at, long *value) {
    for (;;) {
        while (*at < n && (p[*at] == ' ' || p[*at] == '\t' || p[*at] == '\n' || p[*at] == '\r'))
            (*at)++;
        if (*at < n && p[*at] == '#') {
            while (*at < n && p[*at] != '\n') (*at)++;
            continue;
        }
        break;
    }
    if (*at >= n || p[*at] < '0' || p[*at] > '9') return 0;
    long v = 0;
    while (*at < n && p[*at] >= '0' && p[*at] <= '9') {
        v = v * 10 + (p[*at] - '0');
        if (v > 1000000) return 0;
        (*at)++;
    }
    *value = v;
    return 1;
}

static uint8_t *read_file(const char *name, size_t *size) {
    FILE *f = fopen(name, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    uint8_t *buf = malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) {
            if (cap > MAX_PIXELS + 4096) { free(buf); buf = NULL; break; }
            uint8_t *bigger = realloc(buf, cap * 2);
            if (!bigger) { free(buf); buf = NULL; break; }
            buf = bigger;
            cap *= 2;
        }
    }
    fclose(f);
    *size = n;
    return buf;
}

static int bench(int passes) {
    const int w = 1024, h = 1024;
    uint8_t *img = malloc((size_t)w * h);
    uint16_t *tmp = malloc((size_t)w * h * sizeof *tmp);
    if (!img || !tmp) return fail("out of memory", "bench");
    uint32_t x = 2463534242u;
    for (int y = 0; y < h; y++)
        for (int i = 0; i < w; i++) {
            x ^= x << 13; x ^= x >> 17; x ^= x << 5;
            img[(size_t)y * w + i] = (uint8_t)((((i / 64 + y / 64) & 1) ? 192 : 64) + (x & 31) - 16);
        }
    for (int p = 0; p < passes; p++) blur_pass(img, tmp, w, h);
    uint32_t hash = 2166136261u;
    for (size_t i = 0; i < (size_t)w * h; i++) hash = (hash ^ img[i]) * 16777619u;
    printf("checksum %08x\n", (unsigned)hash);
    free(img);
    free(tmp);
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--bench") == 0)
        return bench(argc > 2 ? atoi(argv[2]) : 10);
    const char *name = argc > 1 ? argv[1] : "input.pgm";
    int passes = argc > 2 ? atoi(argv[2]) : 3;
    if (passes < 0 || passes > 1000) return fail("passes must be in 0..1000", name);
    size_t n;
    uint8_t *file = read_file(name, &n);
    if (!file) return fail("cannot read the file (or it is too large)", name);
    long w, h, maxval;
    size_t at = 2;
    if (n < 2 || file[0] != 'P' || file[1] != '5')
        return fail("not a binary PGM (it does not start with P5)", name);
    if (!header_number(file, n, &at, &w) || !header_number(file, n, &at, &h) ||
        !header_number(file, n, &at, &maxval) || at >= n)
        return fail("bad PGM header", name);
    if (maxval != 255) return fail("only maxval 255 is supported", name);
    if (w < 1 || h < 1 || w > MAX_SIDE || h > MAX_SIDE || (uint64_t)w * h > MAX_PIXELS)
        return fail("bad image dimensions", name);
    at++; /* the single whitespace byte after maxval */
    if (n - at < (size_t)w * h) return fail("the image data is truncated", name);
    uint8_t *img = file + at;
    uint16_t *tmp = malloc((size_t)w * h * sizeof *tmp);
    if (!tmp) return fail("out of memory", name);
    for (int p = 0; p < passes; p++) blur_pass(img, tmp, (int)w, (int)h);
    FILE *out = fopen("blurred.pgm", "wb");
    if (!out) return fail("cannot create", "blurred.pgm");
    fprintf(out, "P5\n%ld %ld\n255\n", w, h);
    fwrite(img, 1, (size_t)w * h, out);
    if (fclose(out) != 0) return fail("cannot write", "blurred.pgm");
    printf("blurred %ldx%ld in %d passes\n", w, h, passes);
    free(tmp);
    free(file);
    return 0;
}
