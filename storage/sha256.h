/* SHA-256 (FIPS 180-4), for the catalog's file checksums. Small and
 * dependency-free: hashing a model file once at registration does not
 * justify linking a crypto library. */
#ifndef EBB_STORAGE_SHA256_H
#define EBB_STORAGE_SHA256_H
#include <stddef.h>
#include <stdint.h>

struct sha256 {
    uint32_t state[8];
    uint64_t n_bytes;
    uint8_t block[64];
    size_t n_block;
};

void sha256_init(struct sha256 *h);
void sha256_update(struct sha256 *h, const void *data, size_t len);
void sha256_final(struct sha256 *h, uint8_t digest[32]);
/* Lower-case hex of the digest of len bytes; hex must hold 65 bytes. */
void sha256_hex(const void *data, size_t len, char hex[65]);
/* Lower-case hex of the digest of the file at path, read in pieces (so any
 * size works without mapping it). 0, or -1 when it cannot be opened or read;
 * hex is then left as it was. */
int sha256_file(const char *path, char hex[65]);
#endif
