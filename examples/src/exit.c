/* exit: writes "exiting with N" on stderr and exits with status N, the first argument
 * (0 if none). WASI hosts accept statuses 0..125; wasmtime traps on larger ones. */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    int status = argc > 1 ? atoi(argv[1]) : 0;
    fprintf(stderr, "exiting with %d\n", status);
    return status;
}
