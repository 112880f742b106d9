/*
 * sealift guest workload: the program a sealift test guest runs as its job.
 *
 * It does four things a live-migration harness can observe:
 *   - dirties memory at a chosen rate (the load that pre-copy must chase);
 *   - holds a known secret line in memory (what an eavesdropper must not see);
 *   - prints a monotonically increasing counter on the serial console
 *     ("sealift-counter N"), so progress can be read from the console log;
 *   - answers every UDP datagram on a fixed port at once with the current
 *     counter, so a prober outside the guest measures downtime like ping.
 *
 * Settings come from the kernel command line (or from a file named as the
 * first argument, for running it on a host):
 *   sealift.mem_mib=64      memory to allocate and keep dirtying
 *   sealift.rate_mib=16     dirty rate in MiB/s (0: only count and answer)
 *   sealift.port=7777       UDP port of the probe service
 *   sealift.secret="..."    the secret line (default below)
 *
 * Single-threaded on purpose: one poll() loop does the ticks and the
 * answers, so an answer is never delayed by more than one tick of work and
 * there is no locking around the counter.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_SECRET \
    "The bank amount transferred to account 4471-0093-2210 is USD 1,250,000.00 (sealift test secret)"
#define PAGE_SIZE 4096u
#define TICK_NS 10000000LL          /* 10 ms of work per tick */
#define TICKS_PER_PRINT 10          /* print the counter every 100 ms */
#define MAX_RESYNC_NS 1000000000LL  /* further behind than this: stop catching up */
#define STAMP_BYTES 64u             /* bytes written per dirtied page */
#define MAX_REQUEST 64              /* request bytes echoed back in an answer */
#define RESERVE_MIB 16              /* left to the kernel, init and busybox when clamping */

struct config {
    unsigned long mem_mib;
    unsigned long rate_mib;
    unsigned port;
    char secret[1024];
};

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void say(const char *fmt, ...)
{
    /* One write() per line: the console is shared with the kernel and init. */
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    ssize_t ignored = write(STDOUT_FILENO, line, (size_t)n);
    (void)ignored;
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Apply one "key=value" word of the command line (quotes already removed). */
static void apply_setting(struct config *cfg, const char *word)
{
    if (strncmp(word, "sealift.mem_mib=", 16) == 0)
        cfg->mem_mib = strtoul(word + 16, NULL, 10);
    else if (strncmp(word, "sealift.rate_mib=", 17) == 0)
        cfg->rate_mib = strtoul(word + 17, NULL, 10);
    else if (strncmp(word, "sealift.port=", 13) == 0)
        cfg->port = (unsigned)strtoul(word + 13, NULL, 10);
    else if (strncmp(word, "sealift.secret=", 15) == 0) {
        size_t n = strnlen(word + 15, sizeof cfg->secret - 1);
        memcpy(cfg->secret, word + 15, n);
        cfg->secret[n] = '\0';
    }
}

/* Split a kernel command line into words, honouring double quotes as the kernel does. */
static void parse_cmdline(struct config *cfg, const char *text)
{
    char word[1100];
    size_t len = 0;
    int quoted = 0;
    for (const char *p = text;; p++) {
        char c = *p;
        if (c == '"') {
            quoted = !quoted;
            continue;
        }
        if (c == '\0' || c == '\n' || (c == ' ' && !quoted)) {
            word[len] = '\0';
            if (len > 0)
                apply_setting(cfg, word);
            len = 0;
            if (c == '\0')
                return;
            continue;
        }
        if (len < sizeof word - 1)
            word[len++] = c;
    }
}

static void load_config(struct config *cfg, const char *path)
{
    cfg->mem_mib = 64;
    cfg->rate_mib = 16;
    cfg->port = 7777;
    snprintf(cfg->secret, sizeof cfg->secret, "%s", DEFAULT_SECRET);

    FILE *f = fopen(path, "r");
    if (f == NULL) {
        say("sealift-workload: cannot read %s (%s), using defaults", path, strerror(errno));
        return;
    }
    char text[4096];
    size_t n = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[n] = '\0';
    parse_cmdline(cfg, text);
}

/* MemAvailable in MiB, or -1 if unknown (e.g. no /proc). */
static long available_mib(void)
{
    FILE *f = fopen("/proc/meminfo", "r");
    if (f == NULL)
        return -1;
    char line[128];
    long kib = -1;
    while (fgets(line, sizeof line, f) != NULL)
        if (sscanf(line, "MemAvailable: %ld kB", &kib) == 1)
            break;
    fclose(f);
    return kib < 0 ? -1 : kib / 1024;
}

/* Asking for more memory than the guest has would only get the workload
 * OOM-killed: take what there is and say so on the console. */
static void clamp_memory(struct config *cfg)
{
    long available = available_mib();
    if (available < 0)
        return;
    long usable = available > RESERVE_MIB ? available - RESERVE_MIB : 0;
    if ((long)cfg->mem_mib > usable) {
        say("sealift-workload: asked for %lu MiB but only %ld MiB are available: using %ld MiB",
            cfg->mem_mib, available, usable);
        cfg->mem_mib = (unsigned long)usable;
    }
}

static int open_service(unsigned port)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in addr = {0};
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Answer every waiting datagram with "COUNTER REQUEST": the echoed request
 * lets the prober match an answer to its question. */
static void answer_probes(int fd, unsigned long long counter)
{
    for (;;) {
        char request[MAX_REQUEST];
        struct sockaddr_storage peer;
        socklen_t peer_len = sizeof peer;
        ssize_t n = recvfrom(fd, request, sizeof request, 0, (struct sockaddr *)&peer, &peer_len);
        if (n < 0)
            return; /* EAGAIN: nothing more waiting (or a transient error) */
        char reply[32 + MAX_REQUEST];
        int head = snprintf(reply, 32, "%llu ", counter);
        memcpy(reply + head, request, (size_t)n);
        sendto(fd, reply, (size_t)head + (size_t)n, 0, (struct sockaddr *)&peer, peer_len);
    }
}

/* Stamp one page: its index and the counter, so the write is real work and
 * the page content changes every time (the hypervisor tracks dirt per page). */
static void stamp_page(unsigned char *page, size_t index, unsigned long long counter)
{
    uint64_t words[STAMP_BYTES / 8];
    for (size_t i = 0; i < STAMP_BYTES / 8; i++)
        words[i] = ((uint64_t)index << 32) ^ (counter * 0x9E3779B97F4A7C15ull) ^ i;
    memcpy(page, words, sizeof words);
}

int main(int argc, char **argv)
{
    struct config cfg;
    load_config(&cfg, argc > 1 ? argv[1] : "/proc/cmdline");
    clamp_memory(&cfg);

    /* The secret gets a page of its own, which the workload never writes again. */
    char *secret = mmap(NULL, PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    size_t npages = (size_t)cfg.mem_mib * (1024 * 1024 / PAGE_SIZE);
    unsigned char *mem = npages == 0 ? NULL
        : mmap(NULL, npages * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (secret == MAP_FAILED || mem == MAP_FAILED) {
        say("sealift-workload: cannot allocate %lu MiB: %s", cfg.mem_mib, strerror(errno));
        return 1;
    }
    snprintf(secret, PAGE_SIZE, "%s", cfg.secret);

    /* Fill every page once, so the whole region is real (non-zero) guest memory. */
    for (size_t i = 0; i < npages; i++)
        stamp_page(mem + i * PAGE_SIZE, i, 0);

    int service = open_service(cfg.port);
    if (service < 0)
        say("sealift-workload: cannot open UDP port %u: %s (continuing without it)", cfg.port, strerror(errno));

    /* Pages to dirty per tick; the remainder is carried so the rate is exact on average. */
    unsigned long long pages_per_second = (unsigned long long)cfg.rate_mib * (1024 * 1024 / PAGE_SIZE);
    unsigned long long ticks_per_second = 1000000000LL / TICK_NS;
    unsigned long long carry = 0;
    size_t cursor = 0;
    unsigned long long counter = 0;

    say("sealift-workload ready mem_mib=%lu rate_mib=%lu port=%u secret_bytes=%zu",
        cfg.mem_mib, cfg.rate_mib, cfg.port, strlen(secret));

    long long next_tick = now_ns();
    for (;;) {
        long long now = now_ns();
        if (now >= next_tick) {
            carry += pages_per_second;
            unsigned long long todo = carry / ticks_per_second;
            carry %= ticks_per_second;
            for (unsigned long long k = 0; k < todo && npages > 0; k++) {
                stamp_page(mem + cursor * PAGE_SIZE, cursor, counter + 1);
                cursor = (cursor + 1) % npages;
            }
            counter++;
            if (counter % TICKS_PER_PRINT == 0)
                say("sealift-counter %llu", counter);
            next_tick += TICK_NS;
            /* A guest starved of CPU (TCG on a busy host) must not burst to catch up. */
            if (now - next_tick > MAX_RESYNC_NS)
                next_tick = now;
            if (service >= 0)
                answer_probes(service, counter);
            continue;
        }
        long long wait_ms = (next_tick - now + 999999) / 1000000;
        struct pollfd pfd = {.fd = service, .events = POLLIN};
        if (poll(&pfd, service >= 0 ? 1 : 0, (int)wait_ms) > 0)
            answer_probes(service, counter);
    }
}
