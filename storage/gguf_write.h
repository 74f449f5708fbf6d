/* GGUF v3 writer: what `ebb pack` uses to store a packed variant.
 *
 * A writer collects metadata key/values and tensors in memory, then writes
 * the whole file in one go, atomically: the bytes go to PATH.tmp, which is
 * fsync'd and renamed over PATH (and the directory fsync'd), so a reader
 * sees either the old file or the complete new one, never half a file.
 *
 * Metadata can be copied verbatim from a file the reader opened
 * (gguf_writer_copy_kv: architecture, tokenizer, chat template...) and set
 * with typed setters; setting a key that exists replaces its value in place,
 * so key order stays that of first appearance. Tensors are copied into the
 * writer (the packer frees its buffers as it goes); data is aligned to 32
 * bytes, GGUF's default, so no general.alignment key is written.
 *
 * Errors: setters return 0 or -1 (out of memory, bad arguments); the first
 * failure is remembered and gguf_writer_write reports it, so a caller may
 * issue a run of setters and check once.
 */
#ifndef EBB_STORAGE_GGUF_WRITE_H
#define EBB_STORAGE_GGUF_WRITE_H
#include <stddef.h>
#include <stdint.h>

#include "storage/gguf.h"

#define GGUF_WRITE_ALIGNMENT 32

struct gguf_writer;

struct gguf_writer *gguf_writer_new(void);
void gguf_writer_free(struct gguf_writer *w);

/* Copies one key/value of an open file as it is (any type, arrays of
 * strings included). */
int gguf_writer_copy_kv(struct gguf_writer *w, const struct gguf_kv *kv);

int gguf_writer_set_str(struct gguf_writer *w, const char *key, const char *value);
int gguf_writer_set_u32(struct gguf_writer *w, const char *key, uint32_t value);
int gguf_writer_set_f32(struct gguf_writer *w, const char *key, float value);
int gguf_writer_set_arr_u32(struct gguf_writer *w, const char *key, const uint32_t *values, size_t n);
int gguf_writer_set_arr_u64(struct gguf_writer *w, const char *key, const uint64_t *values, size_t n);
int gguf_writer_set_arr_f32(struct gguf_writer *w, const char *key, const float *values, size_t n);

/* Adds a tensor of n_dims dimensions (ne[0] contiguous, as GGUF writes them)
 * of an ebb type; nbytes must be exactly the size the type's block geometry
 * gives for that shape. The data is copied. A duplicate name is an error. */
int gguf_writer_add_tensor(struct gguf_writer *w, const char *name, uint32_t type, uint32_t n_dims,
                           const uint64_t *ne, const void *data, size_t nbytes);

/* Bytes the file will have. */
uint64_t gguf_writer_size(const struct gguf_writer *w);

/* Writes PATH atomically (see above). 0, or -1 with "PATH: problem" in err
 * (including the first failure of an earlier setter). */
int gguf_writer_write(struct gguf_writer *w, const char *path, char *err, size_t errlen);
#endif
