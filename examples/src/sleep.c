/* sleep: holds its memory for a while without using the CPU, for load simulations.
 *
 * Usage: sleep [MS]  (default 1000, at most 600000). Sleeps MS milliseconds through WASI
 * (poll_oneoff on the monotonic clock) and prints "slept MS ms". A bad MS exits 2. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv) {
    long ms = 1000;
    if (argc > 1) {
        char *end = NULL;
        ms = strtol(argv[1], &end, 10);
        if (end == argv[1] || *end != '\0' || ms < 0 || ms > 600000) {
            fprintf(stderr, "sleep: MS must be 0..600000, got '%s'\n", argv[1]);
            return 2;
        }
    }
    struct timespec want = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&want, &want) != 0) {
    }
    printf("slept %ld ms\n", ms);
    return 0;
}
