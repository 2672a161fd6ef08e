/* bs_scan_avx512.c - the avx512 variant of bs_scan (see bs_scan_impl.h); bs_scan.c dispatches. */
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f")
#endif
#define XXH_INLINE_ALL
#include <xxhash.h>

#define BS_SCAN_FN bs_scan_avx512
#include "bs_scan_impl.h"
