/*
 * bs_native.h - the whole C ABI of blocksnap's native core.
 *
 * The block between BEGIN CDEF and END CDEF is read verbatim by csrc/build_native.py and
 * handed to cffi, so it must stay plain declarations and integer #defines.
 *
 * Rules for every function here: no allocation, no global state, no Python objects; one
 * call covers a whole multi-MiB buffer; the return value is a BS_* status.  The only I/O
 * is bs_read_scan's pread on a descriptor the caller owns.
 */
#ifndef BS_NATIVE_H
#define BS_NATIVE_H

#include <stddef.h>
#include <stdint.h>

/* BEGIN CDEF */
#define BS_ABI_VERSION 2

#define BS_OK 0
#define BS_EINVAL 1
#define BS_EIO 2     /* pread failed; *errno_out says why */
#define BS_ESHORT 3  /* the file ended before len bytes; *got_out says where */

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

/*
 * Read len bytes of fd from offset into buf with pread, part_size bytes at a time, and
 * bs_scan each part right after reading it, while it is still in the core's cache:
 * the result is that of bs_scan(buf, len, ...) over the whole range.  part_size must be
 * a non-zero multiple of block_size.  *got_out is the number of bytes read; on BS_EIO
 * *errno_out holds errno; on BS_ESHORT the file ended early and nothing past *got_out
 * was scanned.  EINTR is retried.
 */
int bs_read_scan(int fd, uint64_t offset, uint8_t *buf, size_t len, size_t part_size,
                 size_t block_size, uint64_t seed,
                 const uint8_t *parent_digests, size_t parent_count,
                 uint8_t *flags_out, uint8_t *digests_out, size_t out_count,
                 size_t *got_out, int *errno_out);
/* END CDEF */

#endif /* BS_NATIVE_H */
