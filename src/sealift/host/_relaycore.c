/* Long file: the record format, the cipher, the socket and splice I/O and the two loops are one data path, read as one. */
/* sealift's native relay core: moves one data stream between two sockets with the GIL released.
 *
 * It seals (seal_stream) or opens (open_stream) exactly the records of
 * sealift/wire/datastream.py with the AES-256-GCM of sealift/wire/records.py:
 *
 *   header  = type u8, flags u8 (0), reserved u16 (0), length u32   (network order; the AAD)
 *   payload = AES-256-GCM(key, nonce = iv XOR sequence, header) ciphertext || 16-byte tag
 *   END     = records_before_end u64, pages_total u64, payload_bytes_total u64 (little-endian)
 *
 * and the key step every `rekey_interval` records or `rekey_bytes` plaintext
 * bytes: key' = HKDF-Expand-SHA256(key, "sealift rekey key", 32),
 * iv' = HKDF-Expand-SHA256(key, "sealift rekey iv", 12). Without a key the
 * records travel unprotected (the `--insecure` baseline), framing unchanged.
 *
 * Python authenticates the peers, checks the order and derives the keys;
 * this file only moves bytes. It never allocates from a peer's value: a
 * record's length is checked against its type's bound before it is read.
 * Both calls return (status, message, plaintext bytes moved, records,
 * payload bytes, wire bytes, digest input): the digest input is the GCM
 * tags of the OPAQUE records in order (with a key) or their headers
 * (without), which Python hashes once at the end.
 */
#define _GNU_SOURCE /* splice, pipe2, F_SETPIPE_SZ */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* AES-256-GCM comes from Intel's ipsec-mb (Debian's libipsec-mb-dev): its VAES/AVX-512 code seals a
 * 1 MiB record four times faster on this machine kind than Debian 12's OpenSSL 3.0, whose EVP does not
 * run VAES code for GCM here (docs/benchmarks.md "The cipher"). OpenSSL still gives HMAC (the rekey's HKDF),
 * the constant-time tag comparison and cleansing. */
#include <intel-ipsec-mb.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#define HEADER_SIZE 8
#define TAG_SIZE 16
#define KEY_SIZE 32
#define IV_SIZE 12
#define MAX_OPAQUE (1u << 20)
#define END_SIZE 24
#define RECORD_END 5
#define RECORD_OPAQUE 6
#define MAX_RECORD_TYPE 6
#define MAX_SEQUENCE (UINT64_C(1) << 63)

/* What ended a stream; the Python wrapper (host/relaycore.py) turns each into the error Python code raises. */
enum status {
    ST_OK = 0,
    ST_OS = 1,       /* a system call failed: errno in the message's place */
    ST_TIMEOUT = 2,  /* a peer was silent for the whole timeout */
    ST_CLOSED = 3,   /* the data stream ended inside a record (truncation) */
    ST_PROTOCOL = 4, /* a record the reader rejects (type, flags, length, END totals) */
    ST_AUTH = 5,     /* a record failed authentication */
    ST_MEMORY = 6,
    ST_CRYPTO = 7,   /* the cipher library refused an operation it should not */
    ST_STOPPED = 8,  /* the caller's wake fd became readable: it asked the stream to stop */
};

/* How long each wait on one socket may last, and what else ends it. */
typedef struct {
    int timeout_ms; /* -1: wait forever */
    int wake_fd;    /* -1: none; else readable = stop (a pipe the caller writes to) */
} waiting;

typedef struct {
    int status;
    int err; /* errno for ST_OS */
    char message[256];
} outcome;

typedef struct {
    IMB_MGR *mgr;             /* NULL: no protection */
    struct gcm_key_data *gcm; /* the expanded key and GHASH tables (64-byte aligned) */
    unsigned char key[KEY_SIZE];
    unsigned char iv[IV_SIZE];
    uint64_t sequence, epoch_records, epoch_bytes, rekey_interval, rekey_bytes;
} protection;

typedef struct {
    unsigned char *data;
    size_t size, capacity;
} growbuf;

typedef struct {
    uint64_t plain_moved, records, payload_bytes, wire_bytes;
} counters;

static void fail(outcome *out, int status, int err, const char *fmt, ...) {
    va_list args;
    out->status = status;
    out->err = err;
    va_start(args, fmt);
    vsnprintf(out->message, sizeof out->message, fmt, args);
    va_end(args);
}

static int grow_append(growbuf *buf, const unsigned char *bytes, size_t n) {
    if (buf->size + n > buf->capacity) {
        size_t capacity = buf->capacity ? buf->capacity * 2 : 4096;
        while (capacity < buf->size + n)
            capacity *= 2;
        unsigned char *bigger = realloc(buf->data, capacity);
        if (bigger == NULL)
            return -1;
        buf->data = bigger;
        buf->capacity = capacity;
    }
    memcpy(buf->data + buf->size, bytes, n);
    buf->size += n;
    return 0;
}

/* -- I/O: sockets, with one timeout per wait as Python's socket timeouts ---------------------- */

static int wait_fd(int fd, short events, const waiting *w, outcome *out) {
    /* The wake fd (if any) is polled too: readable means "stop now", for a stream that may idle forever. */
    struct pollfd p[2] = {{.fd = fd, .events = events}, {.fd = w->wake_fd, .events = POLLIN}};
    for (;;) {
        int n = poll(p, w->wake_fd >= 0 ? 2 : 1, w->timeout_ms);
        if (n > 0 && w->wake_fd >= 0 && p[1].revents != 0) {
            fail(out, ST_STOPPED, 0, "stopped");
            return -1;
        }
        if (n > 0)
            return 0; /* ready, or an error/hang-up the next call reports */
        if (n == 0) {
            fail(out, ST_TIMEOUT, 0, "timed out");
            return -1;
        }
        if (errno != EINTR) {
            fail(out, ST_OS, errno, "poll failed");
            return -1;
        }
    }
}

/* Up to `n` bytes, at least one unless the peer closed (0): waits once, then takes what is there. */
static ssize_t recv_some(int fd, unsigned char *buf, size_t n, const waiting *w, outcome *out) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, buf + got, n - got, MSG_DONTWAIT);
        if (r > 0) {
            got += (size_t)r;
            continue;
        }
        if (r == 0)
            return (ssize_t)got;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            fail(out, ST_OS, errno, "recv failed");
            return -1;
        }
        if (got > 0)
            return (ssize_t)got; /* what is there now: sealed as one record */
        if (wait_fd(fd, POLLIN, w, out) < 0)
            return -1;
    }
    return (ssize_t)got;
}

/* Exactly `n` bytes; ST_CLOSED if the peer stops early (a truncated stream). */
static int recv_exactly(int fd, unsigned char *buf, size_t n, const waiting *w, outcome *out) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, buf + got, n - got, MSG_DONTWAIT);
        if (r > 0) {
            got += (size_t)r;
            continue;
        }
        if (r == 0) {
            fail(out, ST_CLOSED, 0, "peer closed the data stream after %zu of %zu bytes", got, n);
            return -1;
        }
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            fail(out, ST_OS, errno, "recv failed");
            return -1;
        }
        if (wait_fd(fd, POLLIN, w, out) < 0)
            return -1;
    }
    return 0;
}

static int send_all_flags(int fd, const unsigned char *buf, size_t n, int flags, const waiting *w, outcome *out) {
    size_t sent = 0;
    while (sent < n) {
        ssize_t r = send(fd, buf + sent, n - sent, MSG_DONTWAIT | MSG_NOSIGNAL | flags);
        if (r > 0) {
            sent += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            fail(out, ST_OS, errno, "send failed");
            return -1;
        }
        if (wait_fd(fd, POLLOUT, w, out) < 0)
            return -1;
    }
    return 0;
}

static int send_all(int fd, const unsigned char *buf, size_t n, const waiting *w, outcome *out) {
    return send_all_flags(fd, buf, n, 0, w, out);
}

/* -- splice: the unprotected path moves pages socket -> pipe -> socket, no byte through user space ---- */

typedef struct {
    int r, w; /* -1: no pipe (records are copied through the buffer) */
} pipe_pair;

/* A pipe that holds a whole record, or none (then the caller copies). */
static pipe_pair open_pipe(void) {
    int fds[2];
    pipe_pair none = {-1, -1};
    if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) < 0)
        return none;
    if (fcntl(fds[1], F_SETPIPE_SZ, (int)MAX_OPAQUE) < (int)MAX_OPAQUE) {
        close(fds[0]);
        close(fds[1]);
        return none;
    }
    pipe_pair pp = {fds[0], fds[1]};
    return pp;
}

static void close_pipe(pipe_pair *pp) {
    if (pp->r >= 0)
        close(pp->r);
    if (pp->w >= 0)
        close(pp->w);
}

/* Socket -> pipe: up to `n` bytes, at least one unless the peer closed (0); waits once, then takes what is there. */
static ssize_t splice_in(int fd, int pipe_w, size_t n, const waiting *w, outcome *out) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = splice(fd, NULL, pipe_w, NULL, n - got, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (r > 0) {
            got += (size_t)r;
            continue;
        }
        if (r == 0)
            return (ssize_t)got;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN) {
            fail(out, ST_OS, errno, "splice from the socket failed");
            return -1;
        }
        if (got > 0)
            return (ssize_t)got; /* the socket is empty, or the pipe full: move this much on */
        if (wait_fd(fd, POLLIN, w, out) < 0)
            return -1;
    }
    return (ssize_t)got;
}

/* Pipe -> socket: all `n` bytes the pipe holds. */
static int splice_out(int pipe_r, int fd, size_t n, const waiting *w, outcome *out) {
    size_t sent = 0;
    while (sent < n) {
        ssize_t r = splice(pipe_r, NULL, fd, NULL, n - sent, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (r > 0) {
            sent += (size_t)r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r == 0 || errno != EAGAIN) {
            fail(out, ST_OS, r == 0 ? EPIPE : errno, "splice to the socket failed");
            return -1;
        }
        if (wait_fd(fd, POLLOUT, w, out) < 0)
            return -1;
    }
    return 0;
}

/* -- records --------------------------------------------------------------------------- */

static void put_header(unsigned char *h, unsigned type, uint32_t length) {
    h[0] = (unsigned char)type;
    h[1] = 0;
    h[2] = 0;
    h[3] = 0;
    h[4] = (unsigned char)(length >> 24);
    h[5] = (unsigned char)(length >> 16);
    h[6] = (unsigned char)(length >> 8);
    h[7] = (unsigned char)length;
}

static void put_le64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t get_le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static const char *type_name(unsigned type) {
    static const char *names[] = {"?", "PAGES", "ZERO_PAGES", "ROUND_END", "DEVICE_STATE", "END", "OPAQUE"};
    return type <= MAX_RECORD_TYPE ? names[type] : "?";
}

/* -- AES-256-GCM as records.AeadProtection ---------------------------------------------- */

static int hkdf_expand_one(const unsigned char *prk, const char *info, unsigned char *out, size_t n) {
    /* HKDF-Expand with at most one block: T(1) = HMAC-SHA256(prk, info || 0x01). */
    unsigned char msg[64], block[32];
    unsigned int len = 0;
    size_t info_len = strlen(info);
    memcpy(msg, info, info_len);
    msg[info_len] = 1;
    if (HMAC(EVP_sha256(), prk, KEY_SIZE, msg, info_len + 1, block, &len) == NULL || len != 32)
        return -1;
    memcpy(out, block, n);
    OPENSSL_cleanse(block, sizeof block);
    return 0;
}

static int set_key(protection *p) {
    IMB_AES256_GCM_PRE(p->mgr, p->key, p->gcm);
    return imb_get_errno(p->mgr) == 0 ? 0 : -1;
}

static int rekey(protection *p) {
    unsigned char key[KEY_SIZE], iv[IV_SIZE];
    if (hkdf_expand_one(p->key, "sealift rekey key", key, KEY_SIZE) < 0 ||
        hkdf_expand_one(p->key, "sealift rekey iv", iv, IV_SIZE) < 0)
        return -1;
    memcpy(p->key, key, KEY_SIZE); /* the old key is gone: earlier records stay safe if a later key leaks */
    memcpy(p->iv, iv, IV_SIZE);
    OPENSSL_cleanse(key, sizeof key);
    p->epoch_records = 0;
    p->epoch_bytes = 0;
    return set_key(p);
}

static int next_nonce(protection *p, unsigned char nonce[IV_SIZE], outcome *out) {
    if (p->sequence >= MAX_SEQUENCE) {
        fail(out, ST_PROTOCOL, 0, "record sequence exhausted (2**63 records); open a new stream");
        return -1;
    }
    memcpy(nonce, p->iv, IV_SIZE);
    for (int i = 0; i < 8; i++)
        nonce[IV_SIZE - 1 - i] ^= (unsigned char)(p->sequence >> (8 * i));
    return 0;
}

static int advance(protection *p, uint64_t plain_bytes, outcome *out) {
    p->sequence++;
    p->epoch_records++;
    p->epoch_bytes += plain_bytes;
    /* Both ends count the same records and bytes, so they rekey in step. */
    if (p->epoch_records >= p->rekey_interval || p->epoch_bytes >= p->rekey_bytes) {
        if (rekey(p) < 0) {
            fail(out, ST_CRYPTO, 0, "rekeying failed (HKDF in OpenSSL or the key schedule)");
            return -1;
        }
    }
    return 0;
}

/* Seal `n` bytes at buf in place; the tag goes to buf + n. */
static int seal_record(protection *p, const unsigned char *header, unsigned char *buf, int n, outcome *out) {
    unsigned char nonce[IV_SIZE];
    struct gcm_context_data state;
    if (next_nonce(p, nonce, out) < 0)
        return -1;
    IMB_AES256_GCM_ENC(p->mgr, p->gcm, &state, buf, buf, (uint64_t)n, nonce, header, HEADER_SIZE, buf + n, TAG_SIZE);
    if (imb_get_errno(p->mgr) != 0) {
        fail(out, ST_CRYPTO, 0, "AES-GCM sealing failed in ipsec-mb: %s", imb_get_strerror(imb_get_errno(p->mgr)));
        return -1;
    }
    return advance(p, (uint64_t)n, out);
}

/* Open `n` ciphertext bytes at buf (tag at buf + n) in place. The plaintext is written before the tag is
 * checked (as with OpenSSL's EVP); the loops never pass a record on that fails. */
static int open_record(protection *p, const unsigned char *header, unsigned char *buf, int n, outcome *out) {
    unsigned char nonce[IV_SIZE], tag[TAG_SIZE];
    struct gcm_context_data state;
    if (next_nonce(p, nonce, out) < 0)
        return -1;
    IMB_AES256_GCM_DEC(p->mgr, p->gcm, &state, buf, buf, (uint64_t)n, nonce, header, HEADER_SIZE, tag, TAG_SIZE);
    if (imb_get_errno(p->mgr) != 0) {
        fail(out, ST_CRYPTO, 0, "AES-GCM opening failed in ipsec-mb: %s", imb_get_strerror(imb_get_errno(p->mgr)));
        return -1;
    }
    if (CRYPTO_memcmp(tag, buf + n, TAG_SIZE) != 0) {
        /* The same words as records.RecordAuthError: the stream is dead from here on. */
        fail(out, ST_AUTH, 0, "record failed authentication");
        return -1;
    }
    return advance(p, (uint64_t)n, out);
}

/* -- the two loops ---------------------------------------------------------------------- */

typedef struct {
    int in_fd, out_fd;
    waiting in_wait, out_wait;
    size_t max_record;
    uint64_t pages; /* END's pages_total: what the Python writer had counted (0 on QEMU streams) */
    uint64_t *progress; /* NULL, or [plaintext moved, wire bytes], stored after each record for Python to read live */
} stream_args;

/* Python reads these from another thread while the stream runs (the agent's progress events and metrics). */
static void publish(const stream_args *a, const counters *c) {
    if (a->progress != NULL) {
        __atomic_store_n(&a->progress[0], c->plain_moved, __ATOMIC_RELAXED);
        __atomic_store_n(&a->progress[1], c->wire_bytes, __ATOMIC_RELAXED);
    }
}

static int note_record(growbuf *digest, const unsigned char *mark, size_t n, outcome *out) {
    if (grow_append(digest, mark, n) < 0) {
        fail(out, ST_MEMORY, 0, "out of memory for the stream digest");
        return -1;
    }
    return 0;
}

/* Without protection: QEMU's bytes go socket -> pipe -> TCP; only each record's header passes through here. */
static void seal_spliced(const stream_args *a, pipe_pair *pp, unsigned char *buf, counters *c, growbuf *digest,
                         outcome *out) {
    for (;;) {
        ssize_t n = splice_in(a->in_fd, pp->w, a->max_record, &a->in_wait, out);
        if (n < 0)
            return;
        if (n == 0) {
            put_header(buf, RECORD_END, END_SIZE);
            put_le64(buf + HEADER_SIZE, c->records);
            put_le64(buf + HEADER_SIZE + 8, a->pages);
            put_le64(buf + HEADER_SIZE + 16, c->payload_bytes);
            if (send_all(a->out_fd, buf, HEADER_SIZE + END_SIZE, &a->out_wait, out) == 0)
                c->wire_bytes += HEADER_SIZE + END_SIZE;
            return;
        }
        put_header(buf, RECORD_OPAQUE, (uint32_t)n);
        if (note_record(digest, buf, HEADER_SIZE, out) < 0 ||
            send_all_flags(a->out_fd, buf, HEADER_SIZE, MSG_MORE, &a->out_wait, out) < 0 ||
            splice_out(pp->r, a->out_fd, (size_t)n, &a->out_wait, out) < 0)
            return;
        c->wire_bytes += HEADER_SIZE + (size_t)n;
        c->plain_moved += (size_t)n;
        c->records++;
        c->payload_bytes += (size_t)n;
        publish(a, c);
    }
}

/* QEMU's bytes -> OPAQUE records until QEMU closes, then END. */
static void seal_loop(const stream_args *a, protection *p, unsigned char *buf, counters *c, growbuf *digest,
                      outcome *out) {
    size_t overhead = p->mgr ? TAG_SIZE : 0;
    if (!p->mgr) {
        pipe_pair pp = open_pipe();
        if (pp.r >= 0) {
            seal_spliced(a, &pp, buf, c, digest, out);
            close_pipe(&pp);
            return;
        }
    }
    for (;;) {
        /* Read straight into the record, after its header; seal in place; one send. */
        ssize_t n = recv_some(a->in_fd, buf + HEADER_SIZE, a->max_record, &a->in_wait, out);
        if (n < 0)
            return;
        unsigned type = n > 0 ? RECORD_OPAQUE : RECORD_END;
        size_t plain = (size_t)n;
        if (type == RECORD_END) {
            put_le64(buf + HEADER_SIZE, c->records);
            put_le64(buf + HEADER_SIZE + 8, a->pages);
            put_le64(buf + HEADER_SIZE + 16, c->payload_bytes);
            plain = END_SIZE;
        }
        put_header(buf, type, (uint32_t)(plain + overhead));
        if (p->mgr && seal_record(p, buf, buf + HEADER_SIZE, (int)plain, out) < 0)
            return;
        if (type == RECORD_OPAQUE) {
            const unsigned char *mark = p->mgr ? buf + HEADER_SIZE + plain : buf;
            if (grow_append(digest, mark, p->mgr ? TAG_SIZE : HEADER_SIZE) < 0) {
                fail(out, ST_MEMORY, 0, "out of memory for the stream digest");
                return;
            }
        }
        if (send_all(a->out_fd, buf, HEADER_SIZE + plain + overhead, &a->out_wait, out) < 0)
            return;
        c->wire_bytes += HEADER_SIZE + plain + overhead;
        if (type == RECORD_END)
            return;
        c->plain_moved += plain;
        c->records++;
        c->payload_bytes += plain;
        publish(a, c);
    }
}

/* Check a header as DataStreamReader._read_header does, and that a QEMU stream holds only OPAQUE and END. */
static int check_header(const unsigned char *h, size_t overhead, uint32_t *length, outcome *out) {
    unsigned type = h[0], flags = h[1], reserved = ((unsigned)h[2] << 8) | h[3];
    *length = ((uint32_t)h[4] << 24) | ((uint32_t)h[5] << 16) | ((uint32_t)h[6] << 8) | h[7];
    if (type < 1 || type > MAX_RECORD_TYPE) {
        fail(out, ST_PROTOCOL, 0, "unknown record type %u", type);
        return -1;
    }
    if (flags != 0) {
        fail(out, ST_PROTOCOL, 0, "record flags 0x%02x are not supported (must be 0)", flags);
        return -1;
    }
    if (reserved != 0) {
        fail(out, ST_PROTOCOL, 0, "record reserved field is %u, must be 0", reserved);
        return -1;
    }
    if (type != RECORD_OPAQUE && type != RECORD_END) {
        fail(out, ST_PROTOCOL, 0, "unexpected %s record in a QEMU migration stream", type_name(type));
        return -1;
    }
    size_t low = (type == RECORD_END ? END_SIZE : 1) + overhead;
    size_t high = (type == RECORD_END ? END_SIZE : MAX_OPAQUE) + overhead;
    if (*length > high) {
        fail(out, ST_PROTOCOL, 0, "%s record length %u exceeds limit %zu", type_name(type), *length, high);
        return -1;
    }
    if (*length < low) {
        fail(out, ST_PROTOCOL, 0, "%s record length %u is below minimum %zu", type_name(type), *length, low);
        return -1;
    }
    return 0;
}

/* END states what came before it: a dropped or added record shows here. */
static void check_end(const stream_args *a, const unsigned char *end, const counters *c, outcome *out) {
    uint64_t records = get_le64(end), pages = get_le64(end + 8), bytes = get_le64(end + 16);
    if (records != c->records || pages != a->pages || bytes != c->payload_bytes)
        fail(out, ST_PROTOCOL, 0,
             "stream END totals mismatch: sender says %llu records / %llu pages / %llu bytes, received "
             "%llu / %llu / %llu",
             (unsigned long long)records, (unsigned long long)pages, (unsigned long long)bytes,
             (unsigned long long)c->records, (unsigned long long)a->pages, (unsigned long long)c->payload_bytes);
}

/* Without protection: each OPAQUE payload goes TCP -> pipe -> QEMU's socket; headers and END are read here. */
static void open_spliced(const stream_args *a, pipe_pair *pp, unsigned char *buf, counters *c, growbuf *digest,
                         outcome *out) {
    for (;;) {
        uint32_t length = 0;
        if (recv_exactly(a->in_fd, buf, HEADER_SIZE, &a->in_wait, out) < 0 ||
            check_header(buf, 0, &length, out) < 0)
            return;
        c->wire_bytes += HEADER_SIZE + length;
        if (buf[0] == RECORD_END) {
            if (recv_exactly(a->in_fd, buf + HEADER_SIZE, length, &a->in_wait, out) == 0)
                check_end(a, buf + HEADER_SIZE, c, out);
            return;
        }
        if (note_record(digest, buf, HEADER_SIZE, out) < 0)
            return;
        /* In pieces: a pipe counts pages, not bytes, and small socket buffers can fill it before a record. */
        for (size_t left = length; left > 0;) {
            ssize_t n = splice_in(a->in_fd, pp->w, left, &a->in_wait, out);
            if (n < 0)
                return;
            if (n == 0) {
                fail(out, ST_CLOSED, 0, "peer closed the data stream after %zu of %u bytes", length - left, length);
                return;
            }
            if (splice_out(pp->r, a->out_fd, (size_t)n, &a->out_wait, out) < 0)
                return;
            left -= (size_t)n;
        }
        c->plain_moved += length;
        c->records++;
        c->payload_bytes += length;
        publish(a, c);
    }
}

/* OPAQUE records -> their plaintext into QEMU's socket, until a valid END. */
static void open_loop(const stream_args *a, protection *p, unsigned char *buf, counters *c, growbuf *digest,
                      outcome *out) {
    size_t overhead = p->mgr ? TAG_SIZE : 0;
    if (!p->mgr) {
        pipe_pair pp = open_pipe();
        if (pp.r >= 0) {
            open_spliced(a, &pp, buf, c, digest, out);
            close_pipe(&pp);
            return;
        }
    }
    for (;;) {
        uint32_t length = 0;
        if (recv_exactly(a->in_fd, buf, HEADER_SIZE, &a->in_wait, out) < 0)
            return;
        if (check_header(buf, overhead, &length, out) < 0)
            return;
        if (recv_exactly(a->in_fd, buf + HEADER_SIZE, length, &a->in_wait, out) < 0)
            return;
        c->wire_bytes += HEADER_SIZE + length;
        size_t plain = length - overhead;
        /* Nothing reaches QEMU before its record is authenticated. */
        if (p->mgr && open_record(p, buf, buf + HEADER_SIZE, (int)plain, out) < 0)
            return;
        if (buf[0] == RECORD_END) {
            check_end(a, buf + HEADER_SIZE, c, out);
            return;
        }
        const unsigned char *mark = p->mgr ? buf + HEADER_SIZE + plain : buf;
        if (grow_append(digest, mark, p->mgr ? TAG_SIZE : HEADER_SIZE) < 0) {
            fail(out, ST_MEMORY, 0, "out of memory for the stream digest");
            return;
        }
        if (send_all(a->out_fd, buf + HEADER_SIZE, plain, &a->out_wait, out) < 0)
            return;
        c->plain_moved += plain;
        c->records++;
        c->payload_bytes += plain;
        publish(a, c);
    }
}

/* -- Python entry points ------------------------------------------------------------------ */

typedef void (*loop_fn)(const stream_args *, protection *, unsigned char *, counters *, growbuf *, outcome *);

static PyObject *run_stream(PyObject *args, loop_fn loop) {
    stream_args a = {0};
    Py_buffer key = {0}, iv = {0}, progress = {0};
    unsigned long long sequence, epoch_records, epoch_bytes, rekey_interval, rekey_bytes, records, pages, payload;
    Py_ssize_t max_record;
    int wake_fd = -1;
    if (!PyArg_ParseTuple(args, "iiz*z*KKKKKKKKnii|w*i", &a.in_fd, &a.out_fd, &key, &iv, &sequence, &epoch_records,
                          &epoch_bytes, &rekey_interval, &rekey_bytes, &records, &pages, &payload, &max_record,
                          &a.in_wait.timeout_ms, &a.out_wait.timeout_ms, &progress, &wake_fd))
        return NULL;
    a.in_wait.wake_fd = a.out_wait.wake_fd = wake_fd;
    protection p = {0};
    PyObject *result = NULL;
    unsigned char *buf = NULL;
    counters c = {.records = records, .payload_bytes = payload};
    growbuf digest = {0};
    outcome out = {.status = ST_OK};
    int keyed = key.buf != NULL;
    if (keyed != (iv.buf != NULL) || (keyed && (key.len != KEY_SIZE || iv.len != IV_SIZE))) {
        PyErr_SetString(PyExc_ValueError, "key and iv must both be given (32 and 12 bytes) or both be None");
        goto done;
    }
    if (max_record < 1 || (size_t)max_record > MAX_OPAQUE || rekey_interval < 1 || rekey_bytes < 1) {
        PyErr_SetString(PyExc_ValueError, "max_record must be in 1..2**20, rekey bounds positive");
        goto done;
    }
    if (progress.buf != NULL) {
        if (progress.len < (Py_ssize_t)(2 * sizeof(uint64_t)) || ((uintptr_t)progress.buf % sizeof(uint64_t)) != 0) {
            PyErr_SetString(PyExc_ValueError, "progress must be a writable, aligned buffer of two uint64");
            goto done;
        }
        a.progress = progress.buf;
    }
    a.max_record = (size_t)max_record;
    a.pages = pages;
    if (keyed) {
        memcpy(p.key, key.buf, KEY_SIZE);
        memcpy(p.iv, iv.buf, IV_SIZE);
        p.sequence = sequence;
        p.epoch_records = epoch_records;
        p.epoch_bytes = epoch_bytes;
        p.rekey_interval = rekey_interval;
        p.rekey_bytes = rekey_bytes;
        /* alloc_mb_mgr(0) and init_mb_mgr_auto pick the fastest code this CPU runs (SSE to AVX-512). */
        p.mgr = alloc_mb_mgr(0);
        void *gcm = NULL; /* posix_memalign: the struct's size (1008) is no multiple of 64, as aligned_alloc wants */
        if (posix_memalign(&gcm, 64, sizeof *p.gcm) == 0)
            p.gcm = gcm;
        if (p.mgr == NULL || p.gcm == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        init_mb_mgr_auto(p.mgr, NULL);
        if (imb_get_errno(p.mgr) != 0 || set_key(&p) < 0) {
            PyErr_Format(PyExc_RuntimeError, "ipsec-mb could not set up AES-256-GCM: %s",
                         imb_get_strerror(imb_get_errno(p.mgr)));
            goto done;
        }
    }
    /* One record buffer: header, the largest payload either side accepts, the tag. */
    buf = PyMem_RawMalloc(HEADER_SIZE + MAX_OPAQUE + TAG_SIZE);
    if (buf == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS;
    loop(&a, &p, buf, &c, &digest, &out);
    publish(&a, &c); /* the END record too */
    Py_END_ALLOW_THREADS;
    result = Py_BuildValue("iisKKKKy#", out.status, out.err, out.message, (unsigned long long)c.plain_moved,
                           (unsigned long long)(c.records - records), (unsigned long long)(c.payload_bytes - payload),
                           (unsigned long long)c.wire_bytes, digest.data ? (const char *)digest.data : "",
                           (Py_ssize_t)digest.size);
done:
    PyMem_RawFree(buf);
    free(digest.data);
    if (p.gcm != NULL) {
        OPENSSL_cleanse(p.gcm, sizeof *p.gcm); /* the expanded key */
        free(p.gcm);
    }
    if (p.mgr != NULL)
        free_mb_mgr(p.mgr);
    OPENSSL_cleanse(&p, sizeof p);
    if (key.buf != NULL)
        PyBuffer_Release(&key);
    if (iv.buf != NULL)
        PyBuffer_Release(&iv);
    if (progress.buf != NULL)
        PyBuffer_Release(&progress);
    return result;
}

static PyObject *seal_stream(PyObject *self, PyObject *args) {
    (void)self;
    return run_stream(args, seal_loop);
}

static PyObject *open_stream(PyObject *self, PyObject *args) {
    (void)self;
    return run_stream(args, open_loop);
}

static PyMethodDef methods[] = {
    {"seal_stream", seal_stream, METH_VARARGS,
     "seal_stream(in_fd, out_fd, key, iv, sequence, epoch_records, epoch_bytes, rekey_interval, rekey_bytes, "
     "records, pages, payload_bytes, max_record, in_timeout_ms, out_timeout_ms[, progress[, wake_fd]]) -> (status, errno, message, plaintext moved, "
     "records, payload bytes, wire bytes, digest input)"},
    {"open_stream", open_stream, METH_VARARGS, "open_stream(...) -> the same, reading records and writing plaintext"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_relaycore", .m_doc = "sealift's native relay core", .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__relaycore(void) { return PyModule_Create(&module); }
