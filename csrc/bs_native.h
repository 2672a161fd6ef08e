/*
 * bs_native.h - the whole C ABI of blocksnap's native core.
 *
 * The block between BEGIN CDEF and END CDEF is read verbatim by csrc/build_native.py and
 * handed to cffi, so it must stay plain declarations and integer #defines.
 *
 * Rules for every function here: no allocation, no I/O, no global state, no Python
 * objects; one call covers a whole multi-MiB buffer; the return value is a BS_* status.
 */
#ifndef BS_NATIVE_H
#define BS_NATIVE_H

#include <stddef.h>
#include <stdint.h>

/* BEGIN CDEF */
#define BS_ABI_VERSION 1

#define BS_OK 0
#define BS_EINVAL 1

#define BS_DIGEST_SIZE 16

#define BS_FLAG_ZERO 1
#define BS_FLAG_CHANGED 2

int bs_abi_version(void);

/*
 * Scan buf[0:buf_size] as consecutive blocks of block_size bytes (the last one may be
 * short).  For block i it writes flags_out[i] and digests_out[16*i : 16*i+16]:
 *   - BS_FLAG_ZERO when every byte of the block is zero; its digest is then 16 zero
 *     bytes and no hash is computed;
 *   - otherwise the canonical (big-endian) XXH3-128 of the block, seeded with seed;
 *   - BS_FLAG_CHANGED when that digest differs from parent_digests[16*i : 16*i+16].
 *     Blocks at or past parent_count compare against the zero digest, which is also
 *     what a zero block of the parent holds.
 * block_size must be a power of two; out_count must hold ceil(buf_size / block_size).
 */
int bs_scan(const uint8_t *buf, size_t buf_size, size_t block_size, uint64_t seed,
            const uint8_t *parent_digests, size_t parent_count,
            uint8_t *flags_out, uint8_t *digests_out, size_t out_count);
/* END CDEF */

#endif /* BS_NATIVE_H */
