/* Tests for server/auth.c's pure parts: the secret comparison, the loopback
 * rule, and reading keys from the config and a key file. The routes' use
 * of them (401s, preflights, the start-up refusal) is tested end to end in
 * tests/integration/test_openai_surface.py. */
#include "server/auth.h"
#include "server/config.h"
#include "tests/unit/check.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void test_secret_equal(void) {
    CHECK(secret_equal("abc", "abc"));
    CHECK(!secret_equal("abc", "abd"));
    CHECK(!secret_equal("ab", "abc"));
    CHECK(!secret_equal("abcd", "abc"));
    CHECK(!secret_equal("abcabc", "abc"));   /* a repeat of the secret is not the secret */
    CHECK(!secret_equal("", "abc"));
    CHECK(!secret_equal("abc", ""));
    CHECK(secret_equal("", ""));
}

static void test_loopback(void) {
    const char *yes[] = {"127.0.0.1", "127.1.2.3", "::1", "localhost", "LOCALHOST", "0:0:0:0:0:0:0:1"};
    const char *no[] = {"0.0.0.0", "::", "10.0.0.1", "192.168.1.2", "::ffff:127.0.0.1", "example.com", "128.0.0.1"};
    for (size_t i = 0; i < sizeof yes / sizeof *yes; i++) CHECK_MSG(auth_is_loopback(yes[i]), "%s", yes[i]);
    for (size_t i = 0; i < sizeof no / sizeof *no; i++) CHECK_MSG(!auth_is_loopback(no[i]), "%s", no[i]);
    struct ebb_config c;
    config_defaults(&c);
    char err[512];
    CHECK(auth_check_listen(&c, 0, err, sizeof err) == 0);
    snprintf(c.host, sizeof c.host, "0.0.0.0");
    CHECK(auth_check_listen(&c, 0, err, sizeof err) == -1 && strstr(err, "--insecure-no-auth"));
    CHECK(auth_check_listen(&c, 1, err, sizeof err) == 0);
    c.insecure_no_auth = 1;
    CHECK(auth_check_listen(&c, 0, err, sizeof err) == 0);
}

static void test_load(void) {
    struct ebb_config c;
    config_defaults(&c);
    struct api_keys k;
    char err[512];
    CHECK(auth_load(&k, &c, err, sizeof err) == 0 && k.n == 0);
    auth_free(&k);
    snprintf(c.api_keys, sizeof c.api_keys, "  one ,two,three  ");
    CHECK(auth_load(&k, &c, err, sizeof err) == 0 && k.n == 3);
    if (k.n == 3) CHECK(!strcmp(k.keys[0], "one") && !strcmp(k.keys[1], "two") && !strcmp(k.keys[2], "three"));
    auth_free(&k);
    const char *bad[] = {"one,", ",one", "a b", "tab\there", "caf\xc3\xa9"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        snprintf(c.api_keys, sizeof c.api_keys, "%s", bad[i]);
        CHECK_MSG(auth_load(&k, &c, err, sizeof err) == -1 && k.n == 0, "'%s' accepted", bad[i]);
    }
    memset(c.api_keys, 'x', 300);
    c.api_keys[300] = 0;
    CHECK(auth_load(&k, &c, err, sizeof err) == -1 && strstr(err, "longer than 256"));

    char path[] = "/tmp/ebb-test-keys-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    if (fd < 0) return;
    const char text[] = "# comment\n\nfile-a\r\n   file-b   \n#file-c\nfile-d";
    CHECK(write(fd, text, sizeof text - 1) == (ssize_t)(sizeof text - 1));
    close(fd);
    snprintf(c.api_keys, sizeof c.api_keys, "list-key");
    snprintf(c.api_key_file, sizeof c.api_key_file, "%s", path);
    CHECK_MSG(auth_load(&k, &c, err, sizeof err) == 0, "%s", err);
    CHECK(k.n == 4);
    if (k.n == 4) CHECK(!strcmp(k.keys[1], "file-a") && !strcmp(k.keys[2], "file-b") && !strcmp(k.keys[3], "file-d"));
    auth_free(&k);
    FILE *f = fopen(path, "w");
    if (f) { fputs("# only comments\n\n", f); fclose(f); }
    CHECK(auth_load(&k, &c, err, sizeof err) == -1 && strstr(err, "holds no key"));
    unlink(path);
    CHECK(auth_load(&k, &c, err, sizeof err) == -1 && strstr(err, path));
}

int main(void) {
    test_secret_equal();
    test_loopback();
    test_load();
    return check_report("test_auth");
}
