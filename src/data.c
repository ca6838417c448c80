/* data.c: what every data source shares (see data.h): opening a path with the right
 * source, the row arithmetic of the train/validation split, and the seeded per-epoch
 * row order. */
#define _POSIX_C_SOURCE 200809L
#include "data.h"

#include <string.h>
#include <sys/stat.h>

#include "rng.h"
#include "util.h"

int64_t data_rows(int64_t n_tokens, int T) { return n_tokens > T ? (n_tokens - 1) / T : 0; }

int64_t data_train_rows(int64_t rows, double val_fraction)
{
    return rows - (int64_t)((double)rows * val_fraction);
}

data_source *data_open(const char *path, int T, uint64_t seed, double val_fraction, enum data_split split,
                       int rank, int nranks)
{
    if (split == DATA_VAL && val_fraction <= 0) die("internal: a validation split needs val_fraction > 0");
    size_t len = strlen(path);
    struct stat st;
    int is_dir = stat(path, &st) == 0 && S_ISDIR(st.st_mode);
    if (is_dir || (len > 3 && strcmp(path + len - 3, ".h5") == 0))
        return data_shards_open(path, T, seed, val_fraction, split, rank, nranks);
    return data_text_open(path, T, seed, val_fraction, split, rank, nranks);
}

int64_t data_permute(int64_t i, int64_t n, uint64_t seed, int64_t epoch)
{
    if (n <= 1) return 0;
    int bits = 2;
    while (bits < 62 && ((int64_t)1 << bits) < n) bits++;
    if (bits & 1) bits++;
    int half = bits / 2;
    uint64_t mask = ((uint64_t)1 << half) - 1;
    uint64_t key = rng_key(seed, "data-order") ^ rng_bits((uint64_t)epoch, 0x5eed);
    uint64_t x = (uint64_t)i;
    do { /* cycle walking: re-encrypt until the value falls inside [0, n) */
        uint64_t l = x >> half, r = x & mask;
        for (int round = 0; round < 4; round++) {
            uint64_t f = rng_bits(key + (uint64_t)round, r) & mask;
            uint64_t nl = r;
            r = l ^ f;
            l = nl;
        }
        x = (l << half) | r;
    } while (x >= (uint64_t)n);
    return (int64_t)x;
}

