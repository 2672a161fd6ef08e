/*
 * bs_read.c - bs_read_scan: pread a range of a volume part by part, scanning each part.
 *
 * Reading and scanning in one native call keeps the GIL released for a whole buffer and
 * scans every part while it is still in the core's cache, so the page-cache copy and the
 * hashing run on all cores without Python in between.
 */
#define _XOPEN_SOURCE 700
#include <errno.h>
#include <stdint.h>
#include <unistd.h>

#include "bs_native.h"

/* Fill buf[0:len] from fd at offset; returns bytes read (short only at end of file). */
static int read_full(int fd, uint64_t offset, uint8_t *buf, size_t len, size_t *got,
                     int *err)
{
    *got = 0;
    while (*got < len) {
        size_t want = len - *got;
        if (want > (size_t)1 << 30)
            want = (size_t)1 << 30; /* pread caps one call near 2 GiB anyway */
        ssize_t n = pread(fd, buf + *got, want, (off_t)(offset + *got));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            *err = errno;
            return BS_EIO;
        }
        if (n == 0)
            break;
        *got += (size_t)n;
    }
    return BS_OK;
}

int bs_read_scan(int fd, uint64_t offset, uint8_t *buf, size_t len, size_t part_size,
                 size_t block_size, uint64_t seed,
                 const uint8_t *parent_digests, size_t parent_count,
                 uint8_t *flags_out, uint8_t *digests_out, size_t out_count,
                 size_t *got_out, int *errno_out)
{
    if (got_out == NULL || errno_out == NULL)
        return BS_EINVAL;
    *got_out = 0;
    *errno_out = 0;
    if (fd < 0 || block_size == 0 || (block_size & (block_size - 1)) != 0)
        return BS_EINVAL;
    if (part_size == 0 || part_size % block_size != 0)
        return BS_EINVAL;
    if (len > 0 && buf == NULL)
        return BS_EINVAL;
    if (parent_count > 0 && parent_digests == NULL)
        return BS_EINVAL;
    if (offset > (uint64_t)INT64_MAX || len > (uint64_t)INT64_MAX - offset)
        return BS_EINVAL;
    size_t count = len / block_size + (len % block_size != 0);
    if (count > out_count)
        return BS_EINVAL;

    for (size_t lo = 0; lo < len; lo += part_size) {
        size_t n = len - lo < part_size ? len - lo : part_size;
        size_t got = 0;
        int status = read_full(fd, offset + lo, buf + lo, n, &got, errno_out);
        *got_out = lo + got;
        if (status != BS_OK)
            return status;
        if (got < n)
            return BS_ESHORT;
        size_t first = lo / block_size;
        size_t parents = parent_count > first ? parent_count - first : 0;
        status = bs_scan(buf + lo, n, block_size, seed,
                         parents ? parent_digests + first * BS_DIGEST_SIZE : NULL, parents,
                         flags_out + first, digests_out + first * BS_DIGEST_SIZE,
                         out_count - first);
        if (status != BS_OK)
            return status;
    }
    return BS_OK;
}
