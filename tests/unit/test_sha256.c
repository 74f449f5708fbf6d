/* SHA-256 against the FIPS 180-4 example vectors and a split-update check. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "storage/sha256.h"

int main(void) {
    char hex[65];
    sha256_hex("", 0, hex);
    CHECK(!strcmp(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
    sha256_hex("abc", 3, hex);
    CHECK(!strcmp(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));
    const char *two = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    sha256_hex(two, strlen(two), hex);
    CHECK(!strcmp(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"));
    /* One million 'a', fed in uneven pieces: exercises block carry-over. */
    static char a[1000000];
    memset(a, 'a', sizeof a);
    struct sha256 h;
    sha256_init(&h);
    for (size_t off = 0, step = 1; off < sizeof a; off += step, step = step * 3 % 1017 + 1)
        sha256_update(&h, a + off, off + step > sizeof a ? sizeof a - off : step);
    uint8_t d[32];
    sha256_final(&h, d);
    static const uint8_t want[32] = {0xcd, 0xc7, 0x6e, 0x5c, 0x99, 0x14, 0xfb, 0x92, 0x81, 0xa1, 0xc7,
                                     0xe2, 0x84, 0xd7, 0x3e, 0x67, 0xf1, 0x80, 0x9a, 0x48, 0xa4, 0x97,
                                     0x20, 0x0e, 0x04, 0x6d, 0x39, 0xcc, 0xc7, 0x11, 0x2c, 0xd0};
    CHECK(!memcmp(d, want, 32));

    /* A file read in pieces hashes as its bytes do; a missing one fails. */
    char path[] = "/tmp/ebb_test_sha256_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    FILE *f = fd >= 0 ? fdopen(fd, "wb") : NULL;
    CHECK(f && fwrite(a, 1, 100000, f) == 100000);
    if (f) fclose(f);
    char from_file[65], from_bytes[65];
    sha256_hex(a, 100000, from_bytes);
    CHECK(sha256_file(path, from_file) == 0 && !strcmp(from_file, from_bytes));
    unlink(path);
    CHECK(sha256_file(path, from_file) == -1);
    return check_report("test_sha256");
}
