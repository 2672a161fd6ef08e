/*
 * bs_scan_impl.h - the body of bs_scan, compiled once per instruction set.
 *
 * Each including file sets its target ISA (a #pragma before including xxhash.h, so that
 * XXH3 picks its vector path from the predefined __AVX2__ / __AVX512F__ macros) and
 * defines BS_SCAN_FN to the name its variant exports to the dispatcher in bs_scan.c.
 */
#include <string.h>

#include "bs_native.h"

static int is_zero(const uint8_t *p, size_t n)
{
    /* Compare the block with itself shifted by one byte: libc's vectorised memcmp makes
       this run at memory speed, with no second buffer of zeros. */
    if (n == 0)
        return 1;
    return p[0] == 0 && memcmp(p, p + 1, n - 1) == 0;
}

static const uint8_t zero_digest[BS_DIGEST_SIZE];

int BS_SCAN_FN(const uint8_t *buf, size_t buf_size, size_t block_size, uint64_t seed,
            const uint8_t *parent_digests, size_t parent_count,
            uint8_t *flags_out, uint8_t *digests_out, size_t out_count)
{
    if (block_size == 0 || (block_size & (block_size - 1)) != 0)
        return BS_EINVAL;
    if (buf_size > 0 && buf == NULL)
        return BS_EINVAL;
    if (parent_count > 0 && parent_digests == NULL)
        return BS_EINVAL;
    /* Written this way so that the block count cannot overflow for any buf_size. */
    size_t count = buf_size / block_size + (buf_size % block_size != 0);
    if (count > out_count)
        return BS_EINVAL;
    if (count > 0 && (flags_out == NULL || digests_out == NULL))
        return BS_EINVAL;

    for (size_t i = 0; i < count; i++) {
        size_t offset = i * block_size;
        size_t len = buf_size - offset < block_size ? buf_size - offset : block_size;
        const uint8_t *block = buf + offset;
        uint8_t *digest = digests_out + i * BS_DIGEST_SIZE;
        uint8_t flags = 0;

        if (is_zero(block, len)) {
            flags = BS_FLAG_ZERO;
            memset(digest, 0, BS_DIGEST_SIZE);
        } else {
            XXH128_hash_t h = XXH3_128bits_withSeed(block, len, seed);
            XXH128_canonical_t canon;
            XXH128_canonicalFromHash(&canon, h);
            memcpy(digest, canon.digest, BS_DIGEST_SIZE);
        }
        const uint8_t *parent =
            i < parent_count ? parent_digests + i * BS_DIGEST_SIZE : zero_digest;
        if (memcmp(digest, parent, BS_DIGEST_SIZE) != 0)
            flags |= BS_FLAG_CHANGED;
        flags_out[i] = flags;
    }
    return BS_OK;
}
