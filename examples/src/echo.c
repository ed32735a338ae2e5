/* echo: a WASI command for Flotilla.
 * With arguments, prints them joined by single spaces and a newline.
 * With none, copies stdin to stdout unchanged. */
#include <stdio.h>

int main(int argc, char **argv) {
    if (argc > 1) {
        for (int i = 1; i < argc; i++) {
            if (i > 1) putchar(' ');
            fputs(argv[i], stdout);
        }
        putchar('\n');
        return 0;
    }
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) {
        if (fwrite(buf, 1, n, stdout) != n) return 1;
    }
    return ferror(stdin) ? 1 : 0;
}
