/*
 * bs_scan.c - per-block zero detection and XXH3-128 change-filter digests, with dispatch.
 *
 * xxHash comes from the system (Debian's libxxhash-dev) and is inlined so that the compiler
 * can specialise XXH3 for each instruction set; nothing of it is copied here.  The body is
 * in bs_scan_impl.h; this file builds the baseline variant and picks, once per call,
 * the widest variant the CPU and OS support (AVX-512 is ~15% faster than SSE2 here).
 */
#define XXH_INLINE_ALL
#include <xxhash.h>

#define BS_SCAN_FN bs_scan_baseline
#include "bs_scan_impl.h"

int bs_scan_avx2(const uint8_t *, size_t, size_t, uint64_t, const uint8_t *, size_t,
                 uint8_t *, uint8_t *, size_t);
int bs_scan_avx512(const uint8_t *, size_t, size_t, uint64_t, const uint8_t *, size_t,
                   uint8_t *, uint8_t *, size_t);

int bs_abi_version(void) { return BS_ABI_VERSION; }

int bs_scan(const uint8_t *buf, size_t buf_size, size_t block_size, uint64_t seed,
            const uint8_t *parent_digests, size_t parent_count,
            uint8_t *flags_out, uint8_t *digests_out, size_t out_count)
{
#if defined(__x86_64__) || defined(__i386__)
    /* __builtin_cpu_supports reads a table libgcc fills once; it also checks that the OS
       saves the wide registers (XCR0), so a CPU flag alone never selects a variant. */
    if (__builtin_cpu_supports("avx512f"))
        return bs_scan_avx512(buf, buf_size, block_size, seed, parent_digests, parent_count,
                              flags_out, digests_out, out_count);
    if (__builtin_cpu_supports("avx2"))
        return bs_scan_avx2(buf, buf_size, block_size, seed, parent_digests, parent_count,
                            flags_out, digests_out, out_count);
#endif
    return bs_scan_baseline(buf, buf_size, block_size, seed, parent_digests, parent_count,
                        flags_out, digests_out, out_count);
}
