/* What the AMX kernels (x86/ *_amx.c, built with the tile extensions) share: the tile
 * configuration and two compiler barriers GCC needs around the tile instructions. */
#ifndef PXL_AMX_H
#define PXL_AMX_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "pxl_kernels.h"

typedef struct { /* ldtilecfg's operand, palette 1 */
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} pxl_tile_config;

/* The configuration this thread loaded last, and in which entry (pxl_entries; 0: none). */
extern __thread pxl_tile_config pxl_tile_loaded;
extern __thread uint64_t pxl_tile_loaded_in;

/* Loads `want` unless the calling thread's tiles already have it. Within one entry into the
 * library (pxl_kernels.h) only its own kernels run on the thread, so what it loaded last is
 * still there and a match needs no read-back: reading the configuration back (sttilecfg) waits
 * for the tile unit to drain. An entry's first call does read it back, since other AMX code in
 * the process (oneDNN under torch) may have changed or released it since. (GCC 12 does not
 * treat ldtilecfg as reading its operand and would drop the stores that fill it in: hence the
 * barrier.) */
static inline void pxl_tile_configure(const pxl_tile_config *want) {
    const uint64_t entry = __atomic_load_n(&pxl_entries, __ATOMIC_RELAXED);
    if (pxl_tile_loaded_in == entry && !memcmp(want, &pxl_tile_loaded, sizeof *want)) return;
    pxl_tile_config have;
    _tile_storeconfig(&have);
    if (memcmp(want, &have, sizeof have)) {
        __asm__ volatile("" : : "r"(want) : "memory");
        _tile_loadconfig(want);
    }
    pxl_tile_loaded = *want, pxl_tile_loaded_in = entry;
}

/* Releases the thread's tiles, and forgets their configuration. */
static inline void pxl_tile_release(void) {
    _tile_release();
    pxl_tile_loaded_in = 0;
}

/* Nor does it treat tileloadd as reading memory: a block written just before its tile load
 * needs this between the two, or its stores are dropped as dead. */
#define PXL_TILE_WRITTEN(p) __asm__ volatile("" : : "r"(p) : "memory")

#endif
