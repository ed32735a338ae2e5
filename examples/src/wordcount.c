/* wordcount: a WASI command for Flotilla, like wc.
 *   wordcount             counts the lines, words and bytes of stdin;
 *   wordcount FILE...     counts each file (opened relative to the current directory,
 *                         the job directory in the sandbox) and, for more than one,
 *                         their total.
 * Prints "lines words bytes [name]" per line on stdout and writes the same report to
 * counts.txt in the current directory. A word is a maximal run of non-space bytes. A file
 * that cannot be read is reported on stderr, and the exit status is then 1. */
#include <ctype.h>
#include <stdio.h>
#include <string.h>

typedef struct { unsigned long long lines, words, bytes; } counts;

static counts count(FILE *f) {
    counts c = {0, 0, 0};
    unsigned char buf[65536];
    int in_word = 0;
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) {
        c.bytes += n;
        for (size_t i = 0; i < n; i++) {
            if (buf[i] == '\n') c.lines++;
            if (isspace(buf[i])) {
                in_word = 0;
            } else if (!in_word) {
                in_word = 1;
                c.words++;
            }
        }
    }
    return c;
}

static void report(FILE *out, FILE *copy, counts c, const char *name) {
    FILE *streams[2] = {out, copy};
    for (int i = 0; i < 2; i++) {
        if (!streams[i]) continue;
        fprintf(streams[i], "%llu %llu %llu", c.lines, c.words, c.bytes);
        if (name) fprintf(streams[i], " %s", name);
        fputc('\n', streams[i]);
    }
}

int main(int argc, char **argv) {
    FILE *copy = fopen("counts.txt", "w");
    if (!copy) perror("wordcount: counts.txt");
    int status = copy ? 0 : 1;
    if (argc < 2) {
        report(stdout, copy, count(stdin), NULL);
    } else {
        counts total = {0, 0, 0};
        for (int i = 1; i < argc; i++) {
            FILE *f = fopen(argv[i], "rb");
            if (!f) {
                fprintf(stderr, "wordcount: %s: cannot open\n", argv[i]);
                status = 1;
                continue;
            }
            counts c = count(f);
            if (ferror(f)) {
                fprintf(stderr, "wordcount: %s: read error\n", argv[i]);
                status = 1;
            }
            fclose(f);
            report(stdout, copy, c, argv[i]);
            total.lines += c.lines;
            total.words += c.words;
            total.bytes += c.bytes;
        }
        if (argc > 2) report(stdout, copy, total, "total");
    }
    if (copy && fclose(copy) != 0) {
        perror("wordcount: counts.txt");
        status = 1;
    }
    return status;
}
