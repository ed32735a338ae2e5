/* noop: a WASI command that does nothing and exits 0 (for latency benchmarks). */
int main(void) { return 0; }
