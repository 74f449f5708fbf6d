/* GGUF reader: the file is memory-mapped read-only and validated completely
 * before anything else sees it.
 *
 * gguf_open walks the header, every key/value pair and every tensor record,
 * bounds-checking each length and offset against the file size, and checks
 * that every tensor's type is known and its bytes lie inside the data section.
 * Only then does it return; afterwards the accessors can trust the structure
 * and hand out pointers straight into the mapping (strings are NOT
 * NUL-terminated in the file, so they are exposed as pointer + length).
 * A bad file yields an error message naming the file and the problem.
 */
#ifndef EBB_STORAGE_GGUF_H
#define EBB_STORAGE_GGUF_H
#include <stddef.h>
#include <stdint.h>

enum gguf_value_type {
    GGUF_UINT8 = 0, GGUF_INT8 = 1, GGUF_UINT16 = 2, GGUF_INT16 = 3,
    GGUF_UINT32 = 4, GGUF_INT32 = 5, GGUF_FLOAT32 = 6, GGUF_BOOL = 7,
    GGUF_STRING = 8, GGUF_ARRAY = 9, GGUF_UINT64 = 10, GGUF_INT64 = 11,
    GGUF_FLOAT64 = 12, GGUF_VALUE_TYPE_COUNT_
};

struct gguf_str { const char *ptr; uint64_t len; };

struct gguf_kv {
    struct gguf_str key;
    uint32_t type;             /* enum gguf_value_type */
    const uint8_t *value;      /* scalar value, or first array element */
    uint32_t arr_type;         /* element type when type == GGUF_ARRAY */
    uint64_t arr_n;            /* element count when type == GGUF_ARRAY */
};

#define GGUF_MAX_DIMS 4
struct gguf_tensor {
    struct gguf_str name;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS]; /* ne[0] is the contiguous dimension; unused = 1 */
    uint32_t type;              /* enum ebb_type */
    uint64_t n_elems;
    uint64_t nbytes;
    const void *data;           /* inside the mapping */
};

struct gguf_file {
    char *path;
    const uint8_t *map;
    size_t size;
    uint32_t version;
    uint32_t alignment;
    uint64_t n_kv;
    struct gguf_kv *kv;
    uint64_t n_tensors;
    struct gguf_tensor *tensors;
    int owns_map;              /* opened by path: gguf_close unmaps */
};

/* 0 on success; on failure -1 with a message "PATH: problem" in err. */
int gguf_open(struct gguf_file *f, const char *path, char *err, size_t errlen);
/* Same checks over a buffer the caller owns (kept alive while f is used). */
int gguf_open_buffer(struct gguf_file *f, const void *buf, size_t size, const char *name,
                     char *err, size_t errlen);
void gguf_close(struct gguf_file *f);

const struct gguf_kv *gguf_find(const struct gguf_file *f, const char *key);
const struct gguf_tensor *gguf_find_tensor(const struct gguf_file *f, const char *name);

/* Typed getters: 0 on success, -1 if the key is absent or has another type.
 * Integer getters accept any integer type whose value fits. */
int gguf_get_u32(const struct gguf_file *f, const char *key, uint32_t *out);
int gguf_get_f32(const struct gguf_file *f, const char *key, float *out);
int gguf_get_bool(const struct gguf_file *f, const char *key, int *out);
int gguf_get_str(const struct gguf_file *f, const char *key, struct gguf_str *out);

/* Array element access for arrays of strings and numbers (i < arr_n). */
struct gguf_str gguf_arr_str(const struct gguf_kv *kv, uint64_t i);
double gguf_arr_num(const struct gguf_kv *kv, uint64_t i);
/* Bytes of one value of a scalar GGUF type (1, 2, 4 or 8); 0 for strings,
 * arrays and unknown types. The writer uses it too. */
size_t gguf_scalar_size(uint32_t type);

/* Dequantizes a whole tensor into dst (n_elems floats). -1 if the type has
 * no f32 conversion. */
int gguf_tensor_to_f32(const struct gguf_tensor *t, float *dst);

/* 1 if s equals the NUL-terminated c. */
int gguf_str_eq(struct gguf_str s, const char *c);
#endif
