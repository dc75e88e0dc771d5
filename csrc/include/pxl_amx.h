/* What the AMX kernels (x86/ *_amx.c, built with the tile extensions) share: the tile
 * configuration and two compiler barriers GCC needs around the tile instructions. */
#ifndef PXL_AMX_H
#define PXL_AMX_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef struct { /* ldtilecfg's operand, palette 1 */
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} pxl_tile_config;

/* Loads `want` unless the calling thread's tiles already have it. The configuration is per
 * thread and other AMX code in the process (oneDNN under torch) may have changed or released
 * it, so it is read back rather than remembered. (GCC 12 does not treat ldtilecfg as reading
 * its operand and would drop the stores that fill it in: hence the barrier.) */
static inline void pxl_tile_configure(const pxl_tile_config *want) {
    pxl_tile_config have;
    _tile_storeconfig(&have);
    if (memcmp(want, &have, sizeof have)) {
        __asm__ volatile("" : : "r"(want) : "memory");
        _tile_loadconfig(want);
    }
}

/* Nor does it treat tileloadd as reading memory: a block written just before its tile load
 * needs this between the two, or its stores are dropped as dead. */
#define PXL_TILE_WRITTEN(p) __asm__ volatile("" : : "r"(p) : "memory")

#endif
