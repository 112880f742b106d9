/*
 * sealift guest workload: the program a sealift test guest runs as its job.
 *
 * It does five things a live-migration harness can observe:
 *   - dirties memory at a chosen rate (the load that pre-copy must chase);
 *   - holds a known secret line in memory (what an eavesdropper must not see);
 *   - prints a monotonically increasing counter on the serial console
 *     ("sealift-counter N"), so progress can be read from the console log;
 *   - answers every UDP datagram on a fixed port at once with the current
 *     counter, so a prober outside the guest measures downtime like ping;
 *   - obeys control datagrams on that port (if given a token), so a host
 *     can drive it into abnormal behaviour at run time: a write storm, or a
 *     bounded outbound UDP flood (what sealift's monitors must catch).
 *
 * Settings come from the kernel command line (or from a file named as the
 * first argument, for running it on a host):
 *   sealift.mem_mib=64      memory to allocate and keep dirtying
 *   sealift.rate_mib=16     dirty rate in MiB/s (0: only count and answer)
 *   sealift.port=7777       UDP port of the probe service
 *   sealift.secret="..."    the secret line (default below)
 *   sealift.ctl=HEX         control token, 16-64 hex digits (absent: control disabled)
 *
 * Control datagrams (one line of ASCII words):
 *   sealift-ctl TOKEN ID rate MIB          dirty MIB MiB/s from now on (storm off)
 *   sealift-ctl TOKEN ID storm             write storm: dirty pages as fast as the guest can
 *   sealift-ctl TOKEN ID flood A.B.C.D PORT PPS SECONDS [BYTES]
 *                                          UDP datagrams to A.B.C.D:PORT, PPS per second, for
 *                                          SECONDS (capped: MAX_FLOOD_PPS, MAX_FLOOD_S, MAX_FLOOD_BYTES)
 *   sealift-ctl TOKEN ID stop              stop the flood
 *   sealift-ctl TOKEN ID restore           stop the flood, storm off, the boot dirty rate again
 *   sealift-ctl TOKEN ID status            change nothing
 * Each is answered "sealift-ack ID STATE" or "sealift-nak ID REASON"; ID
 * (1-32 characters chosen by the sender) matches the answer to the request,
 * and a repeat of the last ID is answered again without acting twice (UDP retries).
 * The token keeps other hosts on the VM network from driving the guest; it
 * travels in clear, so a host that can sniff the VM network could replay it
 * (within the caps above: the test guest holds no other power).
 *
 * Single-threaded on purpose: one poll() loop does the ticks and the
 * answers, so an answer is never delayed by more than one tick of work and
 * there is no locking around the counter.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <arpa/inet.h>
#include <ctype.h>
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
#define MAX_DATAGRAM 256            /* longest datagram read (a control line fits) */
#define RESERVE_MIB 16              /* left to the kernel, init and busybox when clamping */
#define CTL_WORD "sealift-ctl"
#define MIN_TOKEN 16
#define MAX_TOKEN 64
#define MAX_ID 32
#define MAX_RATE_MIB 4096
#define STORM_BUDGET_NS 9000000LL   /* a storming tick writes for 9 of its 10 ms */
#define MAX_FLOOD_PPS 20000u
#define MAX_FLOOD_S 30u
#define MIN_FLOOD_BYTES 16u
#define MAX_FLOOD_BYTES 1400u
#define DEFAULT_FLOOD_BYTES 1000u

struct config {
    unsigned long mem_mib;
    unsigned long rate_mib;
    unsigned port;
    char secret[1024];
    char token[MAX_TOKEN + 1]; /* empty: control disabled */
};

/* What the guest does now; control datagrams change it between ticks. */
struct behaviour {
    unsigned long rate_mib; /* paced dirty rate (ignored while storming) */
    int storm;              /* write storm: dirty as fast as possible */
    int flood_fd;           /* -1: no flood */
    struct sockaddr_in flood_to;
    unsigned flood_pps;
    unsigned flood_bytes;
    long long flood_until_ns;
    unsigned long long flood_sent;
    unsigned long long flood_dropped; /* sendto refused (send buffer full) */
    unsigned long long flood_carry;
    char last_id[MAX_ID + 1]; /* the last control request done, and its answer */
    char last_answer[MAX_DATAGRAM];
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
    } else if (strncmp(word, "sealift.ctl=", 12) == 0) {
        size_t n = strlen(word + 12);
        int hex = n >= MIN_TOKEN && n <= MAX_TOKEN;
        for (size_t i = 0; hex && i < n; i++)
            hex = isxdigit((unsigned char)word[12 + i]) != 0;
        if (hex)
            memcpy(cfg->token, word + 12, n + 1);
        else
            say("sealift-workload: sealift.ctl must be %d-%d hex digits: control disabled", MIN_TOKEN, MAX_TOKEN);
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
    cfg->token[0] = '\0';
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

/* Compare without an early exit, so the time taken does not tell how much of a guess was right. */
static int same_token(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    unsigned char diff = (unsigned char)(la != lb);
    for (size_t i = 0; i < la && i < lb; i++)
        diff |= (unsigned char)(a[i] ^ b[i]);
    return diff == 0;
}

/* A decimal number of at most 9 digits (so it fits any unsigned long), or -1. */
static long number(const char *word)
{
    size_t n = strlen(word);
    if (n == 0 || n > 9 || strspn(word, "0123456789") != n)
        return -1;
    return strtol(word, NULL, 10);
}

static void stop_flood(struct behaviour *b)
{
    if (b->flood_fd < 0)
        return;
    close(b->flood_fd);
    b->flood_fd = -1;
    say("sealift-flood end sent=%llu dropped=%llu", b->flood_sent, b->flood_dropped);
}

/* Flood targets: unicast IPv4 only (not 0.0.0.0/8, multicast or broadcast). */
static int flood_target_ok(struct in_addr address)
{
    unsigned first = ntohl(address.s_addr) >> 24;
    return first != 0 && first < 224;
}

/* Start a flood from the words "A.B.C.D PORT PPS SECONDS [BYTES]"; NULL if done, else why not. */
static const char *start_flood(struct behaviour *b, char **args, int nargs, long long now)
{
    if (nargs != 4 && nargs != 5)
        return "usage: flood A.B.C.D PORT PPS SECONDS [BYTES]";
    struct in_addr address;
    if (inet_pton(AF_INET, args[0], &address) != 1 || !flood_target_ok(address))
        return "the target must be a unicast IPv4 address";
    long port = number(args[1]), pps = number(args[2]), seconds = number(args[3]);
    long bytes = nargs == 5 ? number(args[4]) : (long)DEFAULT_FLOOD_BYTES;
    if (port < 1 || port > 65535)
        return "the port must be within 1..65535";
    if (pps < 1 || pps > (long)MAX_FLOOD_PPS || seconds < 1 || seconds > (long)MAX_FLOOD_S)
        return "pps must be within 1..20000 and seconds within 1..30";
    if (bytes < (long)MIN_FLOOD_BYTES || bytes > (long)MAX_FLOOD_BYTES)
        return "bytes must be within 16..1400";
    stop_flood(b);
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return "cannot open a socket";
    memset(&b->flood_to, 0, sizeof b->flood_to);
    b->flood_to.sin_family = AF_INET;
    b->flood_to.sin_port = htons((uint16_t)port);
    b->flood_to.sin_addr = address;
    b->flood_fd = fd;
    b->flood_pps = (unsigned)pps;
    b->flood_bytes = (unsigned)bytes;
    b->flood_until_ns = now + (long long)seconds * 1000000000LL;
    b->flood_sent = b->flood_dropped = b->flood_carry = 0;
    say("sealift-flood start to=%s:%ld pps=%ld seconds=%ld bytes=%ld", args[0], port, pps, seconds, bytes);
    return NULL;
}

/* One tick's share of the flood; ends it when its time is up. */
static void flood_tick(struct behaviour *b, long long now, unsigned long long ticks_per_second)
{
    if (b->flood_fd < 0)
        return;
    if (now >= b->flood_until_ns) {
        stop_flood(b);
        return;
    }
    static const unsigned char payload[MAX_FLOOD_BYTES]; /* zeros: the content does not matter */
    b->flood_carry += b->flood_pps;
    unsigned long long todo = b->flood_carry / ticks_per_second;
    b->flood_carry %= ticks_per_second;
    for (unsigned long long k = 0; k < todo; k++) {
        if (sendto(b->flood_fd, payload, b->flood_bytes, 0, (struct sockaddr *)&b->flood_to, sizeof b->flood_to) < 0)
            b->flood_dropped++;
        else
            b->flood_sent++;
    }
}

static void describe(const struct behaviour *b, unsigned long long counter, long long now, char *out, size_t size)
{
    long long left_ms = b->flood_fd >= 0 ? (b->flood_until_ns - now) / 1000000 : 0;
    snprintf(out, size, "counter=%llu rate_mib=%lu storm=%d flood_pps=%u flood_left_ms=%lld flood_sent=%llu",
             counter, b->rate_mib, b->storm, b->flood_fd >= 0 ? b->flood_pps : 0u, left_ms > 0 ? left_ms : 0,
             b->flood_sent);
}

/* Act on one control line (already known to start with CTL_WORD); writes the answer into `answer`. */
static void control(struct behaviour *b, const struct config *cfg, char *line, unsigned long long counter,
                    char *answer, size_t size)
{
    char *words[10];
    int n = 0;
    char *save = NULL;
    for (char *w = strtok_r(line, " \t\r\n", &save); w != NULL && n < 10; w = strtok_r(NULL, " \t\r\n", &save))
        words[n++] = w;
    const char *id = n >= 3 && strlen(words[2]) <= MAX_ID ? words[2] : "-";
    if (cfg->token[0] == '\0') {
        snprintf(answer, size, "sealift-nak %s control is disabled (no sealift.ctl= on the kernel command line)", id);
        return;
    }
    if (n < 4 || !same_token(words[1], cfg->token) || strcmp(id, "-") == 0) {
        snprintf(answer, size, "sealift-nak %s bad token or request", id);
        return;
    }
    if (strcmp(id, b->last_id) == 0) { /* a retry of what was just done */
        snprintf(answer, size, "%s", b->last_answer);
        return;
    }
    long long now = now_ns();
    const char *command = words[3], *refused = NULL;
    if (strcmp(command, "rate") == 0 && n == 5) {
        long rate = number(words[4]);
        if (rate < 0 || rate > MAX_RATE_MIB)
            refused = "rate must be within 0..4096 MiB/s";
        else
            b->rate_mib = (unsigned long)rate, b->storm = 0;
    } else if (strcmp(command, "storm") == 0 && n == 4) {
        b->storm = 1;
    } else if (strcmp(command, "flood") == 0) {
        refused = start_flood(b, words + 4, n - 4, now);
    } else if (strcmp(command, "stop") == 0 && n == 4) {
        stop_flood(b);
    } else if (strcmp(command, "restore") == 0 && n == 4) {
        stop_flood(b);
        b->rate_mib = cfg->rate_mib, b->storm = 0;
    } else if (strcmp(command, "status") != 0 || n != 4) {
        refused = "unknown command (rate, storm, flood, stop, restore, status)";
    }
    if (refused != NULL) {
        snprintf(answer, size, "sealift-nak %s %s", id, refused);
        return;
    }
    char state[160];
    describe(b, counter, now, state, sizeof state);
    snprintf(answer, size, "sealift-ack %s %s %s", id, command, state);
    if (strcmp(command, "status") != 0)
        say("sealift-ctl %s %s", command, state);
    snprintf(b->last_id, sizeof b->last_id, "%s", id);
    snprintf(b->last_answer, sizeof b->last_answer, "%s", answer);
}

/* Answer every waiting datagram: a control line with its acknowledgement,
 * anything else (a probe) with "COUNTER REQUEST": the echoed request lets
 * the prober match an answer to its question. */
static void answer_datagrams(int fd, struct behaviour *b, const struct config *cfg, unsigned long long counter)
{
    for (;;) {
        char request[MAX_DATAGRAM];
        struct sockaddr_storage peer;
        socklen_t peer_len = sizeof peer;
        ssize_t n = recvfrom(fd, request, sizeof request - 1, 0, (struct sockaddr *)&peer, &peer_len);
        if (n < 0)
            return; /* EAGAIN: nothing more waiting (or a transient error) */
        char reply[MAX_DATAGRAM];
        size_t len;
        if ((size_t)n > strlen(CTL_WORD) && memcmp(request, CTL_WORD " ", strlen(CTL_WORD) + 1) == 0) {
            request[n] = '\0';
            control(b, cfg, request, counter, reply, sizeof reply);
            len = strlen(reply);
        } else {
            size_t echoed = (size_t)n < MAX_REQUEST ? (size_t)n : MAX_REQUEST;
            int head = snprintf(reply, 32, "%llu ", counter);
            memcpy(reply + head, request, echoed);
            len = (size_t)head + echoed;
        }
        sendto(fd, reply, len, 0, (struct sockaddr *)&peer, peer_len);
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

    struct behaviour now_doing = {.rate_mib = cfg.rate_mib, .flood_fd = -1};
    unsigned long long ticks_per_second = 1000000000LL / TICK_NS;
    unsigned long long carry = 0; /* pages owed: the rate is exact on average */
    size_t cursor = 0;
    unsigned long long counter = 0;

    say("sealift-workload ready mem_mib=%lu rate_mib=%lu port=%u secret_bytes=%zu control=%s",
        cfg.mem_mib, cfg.rate_mib, cfg.port, strlen(secret), cfg.token[0] ? "on" : "off");

    long long next_tick = now_ns();
    for (;;) {
        long long now = now_ns();
        if (now >= next_tick) {
            if (now_doing.storm) {
                /* As many pages as fit in the tick's budget; the clock is read every 64 pages. */
                for (unsigned k = 0; npages > 0; k++) {
                    if (k % 64 == 0 && now_ns() - now >= STORM_BUDGET_NS)
                        break;
                    stamp_page(mem + cursor * PAGE_SIZE, cursor, counter + 1);
                    cursor = (cursor + 1) % npages;
                }
                carry = 0;
            } else {
                carry += (unsigned long long)now_doing.rate_mib * (1024 * 1024 / PAGE_SIZE);
                unsigned long long todo = carry / ticks_per_second;
                carry %= ticks_per_second;
                for (unsigned long long k = 0; k < todo && npages > 0; k++) {
                    stamp_page(mem + cursor * PAGE_SIZE, cursor, counter + 1);
                    cursor = (cursor + 1) % npages;
                }
            }
            flood_tick(&now_doing, now, ticks_per_second);
            counter++;
            if (counter % TICKS_PER_PRINT == 0)
                say("sealift-counter %llu", counter);
            next_tick += TICK_NS;
            /* A guest starved of CPU (TCG on a busy host) must not burst to catch up. */
            if (now - next_tick > MAX_RESYNC_NS)
                next_tick = now;
            if (service >= 0)
                answer_datagrams(service, &now_doing, &cfg, counter);
            continue;
        }
        long long wait_ms = (next_tick - now + 999999) / 1000000;
        struct pollfd pfd = {.fd = service, .events = POLLIN};
        if (poll(&pfd, service >= 0 ? 1 : 0, (int)wait_ms) > 0)
            answer_datagrams(service, &now_doing, &cfg, counter);
    }
}
