/* AES-256-GCM's own cost on this machine, one core, 1 MiB records sealed in place (bench/relay_cpu.py
 * compiles and runs it): Debian's OpenSSL EVP (what the native core used first) against Intel's
 * ipsec-mb (what it uses now). Prints one JSON object: CPU seconds per GiB, median of 5. */
#include <intel-ipsec-mb.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RECORD (1 << 20)
#define RECORDS 1024 /* one GiB a sample */
#define SAMPLES 5

static double thread_cpu(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v) {
    qsort(v, SAMPLES, sizeof *v, by_value);
    return v[SAMPLES / 2];
}

int main(void) {
    static unsigned char buf[RECORD + 16];
    unsigned char key[32] = {1}, iv[12] = {2}, aad[8] = {3}, tag[16];
    double openssl[SAMPLES], ipsec_mb[SAMPLES];
    int len;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    IMB_MGR *mgr = alloc_mb_mgr(0);
    void *aligned = NULL; /* the expanded key wants 64-byte alignment; its size is no multiple of 64 */
    struct gcm_key_data *expanded = posix_memalign(&aligned, 64, sizeof *expanded) == 0 ? aligned : NULL;
    struct gcm_context_data state;
    if (ctx == NULL || mgr == NULL || expanded == NULL || EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, key, NULL) != 1)
        return 1;
    init_mb_mgr_auto(mgr, NULL);
    IMB_AES256_GCM_PRE(mgr, key, expanded);
    memset(buf, 7, sizeof buf);
    for (int s = 0; s < SAMPLES; s++) { /* interleaved: the same noise for both */
        double start = thread_cpu();
        for (int i = 0; i < RECORDS; i++)
            if (EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, iv) != 1 || EVP_EncryptUpdate(ctx, NULL, &len, aad, 8) != 1 ||
                EVP_EncryptUpdate(ctx, buf, &len, buf, RECORD) != 1 || EVP_EncryptFinal_ex(ctx, buf + len, &len) != 1 ||
                EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, 16, tag) != 1)
                return 1;
        openssl[s] = thread_cpu() - start;
        start = thread_cpu();
        for (int i = 0; i < RECORDS; i++)
            IMB_AES256_GCM_ENC(mgr, expanded, &state, buf, buf, RECORD, iv, aad, 8, tag, 16);
        ipsec_mb[s] = thread_cpu() - start;
        if (imb_get_errno(mgr) != 0)
            return 1;
    }
    printf("{\"openssl_cpu_s_per_gib\": %.4f, \"ipsec_mb_cpu_s_per_gib\": %.4f, \"ipsec_mb_arch\": \"%s\"}\n",
           median(openssl), median(ipsec_mb), mgr->features & IMB_FEATURE_VAES ? "vaes" : "no-vaes");
    EVP_CIPHER_CTX_free(ctx);
    free_mb_mgr(mgr);
    free(expanded);
    return 0;
}
