/* randio DEVICE MODE OPS SPAN_MIB SEED, with O_DIRECT on DEVICE's first SPAN_MIB MiB:
 *   MODE randread|randwrite: OPS 4 KiB reads or writes at random 4 KiB-aligned offsets;
 *   MODE read|write: the span once in 1 MiB requests (OPS is ignored).
 * Prints "randio MODE ops=N bytes=B us=T".
 * For bench/volume: busybox has no random-I/O tool, so this is typed into the guest (base64 on
 * its serial console). No libc (-nostdlib, raw x86-64 syscalls) keeps it a few KiB. */
typedef unsigned long u64;
static long sys(long n, long a, long b, long c, long d) {
    register long r10 __asm__("r10") = d;
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
    return r;
}
enum { SYS_WRITE = 1, SYS_OPEN = 2, SYS_PREAD = 17, SYS_PWRITE = 18, SYS_CLOCK = 228, SYS_EXIT = 60 };
static char buf[1 << 20] __attribute__((aligned(4096)));
static int same(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}
static u64 num(const char *s) {
    u64 n = 0;
    while (*s >= '0' && *s <= '9') n = n * 10 + (u64)(*s++ - '0');
    return n;
}
static void say(const char *s) {
    long n = 0;
    while (s[n]) n++;
    sys(SYS_WRITE, 1, (long)s, n, 0);
}
static void saynum(u64 v) {
    char t[24];
    int i = 23;
    t[i] = 0;
    do { t[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    say(t + i);
}
static u64 now_us(void) {
    long ts[2];
    sys(SYS_CLOCK, 1 /* CLOCK_MONOTONIC */, (long)ts, 0, 0);
    return (u64)ts[0] * 1000000 + (u64)ts[1] / 1000;
}
static void fail(const char *what, long e) {
    say("randio: "); say(what); say(" failed: errno "); saynum((u64)-e); say("\n");
    sys(SYS_EXIT, 1, 0, 0, 0);
}
void cmain(long *sp) {
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    if (argc != 6) { say("usage: randio DEVICE randread|randwrite|read|write OPS SPAN_MIB SEED\n"); sys(SYS_EXIT, 2, 0, 0, 0); }
    const char *mode = argv[2];
    int writing = same(mode, "randwrite") || same(mode, "write"), seq = same(mode, "read") || same(mode, "write");
    if (!seq && !same(mode, "randread") && !writing) { say("randio: unknown mode\n"); sys(SYS_EXIT, 2, 0, 0, 0); }
    u64 ops = num(argv[3]), blocks = num(argv[4]) * 256, x = num(argv[5]) * 2654435761u + 88172645463325252ull;
    long size = seq ? (long)sizeof buf : 4096;
    if (seq) ops = num(argv[4]);
    long fd = sys(SYS_OPEN, (long)argv[1], (writing ? 2 : 0) | 040000 /* O_DIRECT */, 0, 0);
    if (fd < 0) fail("open", fd);
    for (long i = 0; i < size; i++) buf[i] = (char)(i * 7 + 1);
    u64 t0 = now_us();
    for (u64 i = 0; i < ops; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        long off = seq ? (long)i * size : (long)((x % blocks) * 4096);
        buf[0] = (char)i;
        long r = sys(writing ? SYS_PWRITE : SYS_PREAD, fd, (long)buf, size, off);
        if (r != size) fail(writing ? "pwrite" : "pread", r < 0 ? r : -5);
    }
    u64 t1 = now_us();
    say("randio "); say(mode); say(" ops="); saynum(ops); say(" bytes="); saynum(ops * (u64)size); say(" us="); saynum(t1 - t0); say("\n");
    sys(SYS_EXIT, 0, 0, 0, 0);
}
__asm__(".globl _start\n_start:\n xor %rbp,%rbp\n mov %rsp,%rdi\n and $-16,%rsp\n call cmain\n hlt\n");
