/* tokenizer_train.c: the BPE trainer that `deltamla prep` runs over MPI ranks (see
 * tokenizer.h). Training counts the distinct chunks of the corpus (tokenizer.c cuts
 * them), then repeatedly merges the most frequent adjacent pair of tokens (ties: the
 * smallest pair (a, b)), each merge adding token 256 + its index.
 *
 * Training is spread over the ranks: each rank holds the chunks of its own part of the
 * corpus, and the pair counts are combined across ranks (summed at rank 0 once, then
 * every merge's count changes are exchanged with MPI_Allgatherv), so every rank keeps
 * the same global counts and picks the same merge. The merges depend only on the
 * combined counts, so they are the same for any rank count.
 */
#define _POSIX_C_SOURCE 200809L
#include "tokenizer.h"

#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer_internal.h"
#include "util.h"

struct bpe_trainer {
    str_map chunks; /* chunk bytes -> occurrences in this rank's text */
    int64_t bytes;
};

bpe_trainer *bpe_trainer_new(void)
{
    bpe_trainer *b = xcalloc(1, sizeof *b);
    str_map_init(&b->chunks);
    return b;
}

void bpe_trainer_add(bpe_trainer *b, const unsigned char *text, size_t len)
{
    for (size_t pos = 0; pos < len;) {
        size_t cl = tokenizer_chunk_len(text + pos, len - pos);
        str_map_get(&b->chunks, text + pos, cl, 0)->val++;
        pos += cl;
    }
    b->bytes += (int64_t)len;
}

typedef struct heap_item {
    int64_t count;
    uint64_t pair;
} heap_item;

typedef struct pair_heap {
    heap_item *items;
    size_t n, cap;
} pair_heap;

/* The merge order: most frequent first, then the smallest pair (a, then b). */
static int heap_before(heap_item x, heap_item y)
{
    return x.count > y.count || (x.count == y.count && x.pair < y.pair);
}

static void heap_push(pair_heap *h, int64_t count, uint64_t pair)
{
    if (h->n == h->cap) {
        h->cap = h->cap ? 2 * h->cap : 1024;
        h->items = realloc(h->items, h->cap * sizeof *h->items);
        if (!h->items) die("out of host memory growing the BPE pair heap to %zu entries", h->cap);
    }
    size_t i = h->n++;
    heap_item it = {count, pair};
    while (i > 0 && heap_before(it, h->items[(i - 1) / 2])) {
        h->items[i] = h->items[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h->items[i] = it;
}

static heap_item heap_pop(pair_heap *h)
{
    heap_item top = h->items[0], last = h->items[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && heap_before(h->items[c + 1], h->items[c])) c++;
        if (!heap_before(h->items[c], last)) break;
        h->items[i] = h->items[c];
        i = c;
    }
    if (h->n) h->items[i] = last;
    return top;
}

/* Word ids that hold (or once held) a pair; duplicates and stale entries are allowed
 * and skipped when the pair is merged. */
typedef struct word_list {
    int32_t *w;
    int32_t n, cap;
} word_list;

typedef struct bpe_state {
    int32_t *ids;      /* every word's tokens, word w at ids[start[w] .. start[w] + len[w]) */
    size_t *start;
    int32_t *len;
    int64_t *count;    /* occurrences of each word in this rank's text */
    int32_t *stamp;    /* the last merge that rewrote each word + 1 */
    int32_t n_words;
    u64_map where;     /* pair -> index in lists */
    word_list *lists;
    size_t n_lists, cap_lists;
    u64_map delta;     /* pair -> this merge's change to this rank's count of it */
    uint64_t *touched; /* the pairs in delta, in insertion order */
    size_t n_touched, cap_touched;
    u64_map global;    /* pair -> count over all ranks (the same on every rank) */
    pair_heap heap;
} bpe_state;

static void where_add(bpe_state *s, uint64_t pair, int32_t w)
{
    int64_t *li = u64_map_get(&s->where, pair, -1);
    if (*li < 0) {
        if (s->n_lists == s->cap_lists) {
            s->cap_lists = s->cap_lists ? 2 * s->cap_lists : 1024;
            s->lists = realloc(s->lists, s->cap_lists * sizeof *s->lists);
            if (!s->lists) die("out of host memory growing the BPE pair index");
        }
        *li = (int64_t)s->n_lists;
        s->lists[s->n_lists++] = (word_list){NULL, 0, 0};
    }
    word_list *l = &s->lists[*li];
    if (l->n == l->cap) {
        l->cap = l->cap ? 2 * l->cap : 4;
        l->w = realloc(l->w, (size_t)l->cap * sizeof *l->w);
        if (!l->w) die("out of host memory growing the BPE pair index");
    }
    l->w[l->n++] = w;
}

static void delta_add(bpe_state *s, uint64_t pair, int64_t change)
{
    size_t before = s->delta.count;
    *u64_map_get(&s->delta, pair, 0) += change;
    if (s->delta.count == before) return;
    if (s->n_touched == s->cap_touched) {
        s->cap_touched = s->cap_touched ? 2 * s->cap_touched : 4096;
        s->touched = realloc(s->touched, s->cap_touched * sizeof *s->touched);
        if (!s->touched) die("out of host memory growing the BPE count changes");
    }
    s->touched[s->n_touched++] = pair;
}

/* This rank's nonzero changes as malloc'd (pair, change) entries, *n int64 words; the
 * change map is left empty. Only the touched slots are cleared: a merge touches few
 * pairs, and clearing the whole table every merge would cost more than the merge. */
static int64_t *take_deltas(bpe_state *s, size_t *n)
{
    int64_t *e = xmalloc((2 * s->n_touched + 1) * sizeof *e);
    size_t *slot = xmalloc((s->n_touched + 1) * sizeof *slot), o = 0;
    for (size_t k = 0; k < s->n_touched; k++) {
        size_t i = u64_map_slot(&s->delta, s->touched[k]);
        slot[k] = i;
        if (s->delta.vals[i] == 0) continue;
        e[o++] = (int64_t)s->touched[k];
        e[o++] = s->delta.vals[i];
    }
    for (size_t k = 0; k < s->n_touched; k++) s->delta.keys[slot[k]] = 0;
    s->delta.count = 0;
    s->n_touched = 0;
    free(slot);
    *n = o;
    return e;
}

static int cmp_entry(const void *x, const void *y)
{
    uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
    return a < b ? -1 : a > b;
}

/* Sort (pair, value) entries by pair and sum equal pairs; returns the new count of
 * int64 words. */
static size_t combine_entries(int64_t *e, size_t n)
{
    qsort(e, n / 2, 2 * sizeof *e, cmp_entry);
    size_t o = 0;
    for (size_t i = 0; i < n; i += 2) {
        if (o && e[o - 2] == e[i]) {
            e[o - 1] += e[i + 1];
        } else {
            e[o++] = e[i];
            e[o++] = e[i + 1];
        }
    }
    return o;
}

/* Combine the (pair, value) entries of every rank (n int64 words, each pair once).
 * With root >= 0 they are summed there and the sums sent back to every rank (once, for
 * the initial counts, which can be large); with root < 0 every rank receives every
 * rank's entries (the small changes of one merge). Returns the malloc'd entries every
 * rank received, *n_out int64 words. */
static int64_t *exchange_counts(int64_t *mine, size_t n, int root, MPI_Comm comm, int64_t *n_out)
{
    int rank, size;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    if (n > INT_MAX) die("the BPE pair table of one rank is too large to exchange (%zu entries)", n / 2);
    int my_n = (int)n;
    int *counts = xmalloc((size_t)size * sizeof *counts), *displs = xmalloc((size_t)size * sizeof *displs);
    if (root < 0) MPI_Allgather(&my_n, 1, MPI_INT, counts, 1, MPI_INT, comm);
    else MPI_Gather(&my_n, 1, MPI_INT, counts, 1, MPI_INT, root, comm);
    int64_t total = 0;
    if (root < 0 || rank == root) {
        for (int r = 0; r < size; r++) {
            displs[r] = (int)total;
            total += counts[r];
            if (total > INT_MAX) die("the combined BPE pair table is too large to exchange");
        }
    }
    int64_t *all = xmalloc((size_t)(total + 1) * sizeof *all);
    if (root < 0) {
        MPI_Allgatherv(mine, my_n, MPI_INT64_T, all, counts, displs, MPI_INT64_T, comm);
    } else {
        MPI_Gatherv(mine, my_n, MPI_INT64_T, all, counts, displs, MPI_INT64_T, root, comm);
        int64_t n_sum = rank == root ? (int64_t)combine_entries(all, (size_t)total) : 0;
        MPI_Bcast(&n_sum, 1, MPI_INT64_T, root, comm);
        if (rank != root) {
            free(all);
            all = xmalloc((size_t)(n_sum + 1) * sizeof *all);
        }
        MPI_Bcast(all, (int)n_sum, MPI_INT64_T, root, comm);
        total = n_sum;
    }
    free(counts);
    free(displs);
    *n_out = total;
    return all;
}

static void apply_counts(bpe_state *s, const int64_t *e, int64_t n)
{
    for (int64_t i = 0; i < n; i += 2) {
        int64_t *c = u64_map_get(&s->global, (uint64_t)e[i], 0);
        *c += e[i + 1];
        if (*c > 0) heap_push(&s->heap, *c, (uint64_t)e[i]);
    }
}

/* Rewrite this rank's words holding (a, b) with token m, recording the pair count
 * changes in s->delta. */
static void merge_local(bpe_state *s, int32_t a, int32_t b, int32_t m, int32_t merge_index)
{
    int64_t *li = u64_map_find(&s->where, pair_key(a, b));
    if (!li) return;
    size_t list = (size_t)*li;
    for (int32_t k = 0; k < s->lists[list].n; k++) {
        int32_t w = s->lists[list].w[k];
        if (s->stamp[w] == merge_index + 1) continue;
        s->stamp[w] = merge_index + 1;
        int32_t *ids = s->ids + s->start[w];
        int32_t n = s->len[w];
        int found = 0;
        for (int32_t i = 0; i + 1 < n && !found; i++) found = ids[i] == a && ids[i + 1] == b;
        if (!found) continue;
        /* Only pairs touching a merge site change: the old pairs touching a merged
         * position go, the new pairs holding m (a new id) come; every other pair of
         * the old word is still a pair of the new one. */
        int64_t c = s->count[w];
        unsigned char merged[CHUNK_MAX_BYTES];
        fatal_check(n <= CHUNK_MAX_BYTES);
        memset(merged, 0, (size_t)n);
        for (int32_t i = 0; i + 1 < n; i++)
            if (ids[i] == a && ids[i + 1] == b) {
                merged[i] = merged[i + 1] = 1;
                i++;
            }
        for (int32_t i = 0; i + 1 < n; i++)
            if (merged[i] || merged[i + 1]) delta_add(s, pair_key(ids[i], ids[i + 1]), -c);
        int32_t o = 0;
        for (int32_t i = 0; i < n; i++) {
            if (i + 1 < n && ids[i] == a && ids[i + 1] == b) {
                ids[o++] = m;
                i++;
            } else {
                ids[o++] = ids[i];
            }
        }
        s->len[w] = o;
        for (int32_t i = 0; i + 1 < o; i++) {
            if (ids[i] != m && ids[i + 1] != m) continue;
            uint64_t p = pair_key(ids[i], ids[i + 1]);
            delta_add(s, p, c);
            where_add(s, p, w); /* may move s->lists */
        }
    }
    /* (a, b) cannot occur again: every new neighbour pair involves m */
    free(s->lists[list].w);
    s->lists[list] = (word_list){NULL, 0, 0};
}

tokenizer *bpe_trainer_finish(bpe_trainer *b, int vocab_size, MPI_Comm comm, void (*progress)(int done, int total))
{
    fatal_check(vocab_size >= 257);
    int target = vocab_size - 257;
    bpe_state s;
    memset(&s, 0, sizeof s);

    /* the distinct chunks of this rank become its words */
    size_t total_len = 0;
    for (size_t i = 0; i < b->chunks.cap; i++)
        if (b->chunks.slots[i].hash) total_len += b->chunks.slots[i].len;
    if (b->chunks.count > INT32_MAX) die("too many distinct chunks on one rank for BPE training (%zu)", b->chunks.count);
    s.n_words = (int32_t)b->chunks.count;
    s.ids = xmalloc((total_len + 1) * sizeof *s.ids);
    s.start = xmalloc(((size_t)s.n_words + 1) * sizeof *s.start);
    s.len = xmalloc(((size_t)s.n_words + 1) * sizeof *s.len);
    s.count = xmalloc(((size_t)s.n_words + 1) * sizeof *s.count);
    s.stamp = xcalloc((size_t)s.n_words + 1, sizeof *s.stamp);
    u64_map_init(&s.where, 4096);
    u64_map_init(&s.delta, 4096);
    u64_map_init(&s.global, 4096);
    size_t off = 0;
    int32_t w = 0;
    for (size_t i = 0; i < b->chunks.cap; i++) {
        const str_entry *e = &b->chunks.slots[i];
        if (!e->hash) continue;
        s.start[w] = off;
        s.len[w] = (int32_t)e->len;
        s.count[w] = e->val;
        for (uint32_t k = 0; k < e->len; k++) s.ids[off + k] = b->chunks.arena[e->off + k];
        for (uint32_t k = 0; k + 1 < e->len; k++) {
            uint64_t p = pair_key(s.ids[off + k], s.ids[off + k + 1]);
            delta_add(&s, p, e->val);
            where_add(&s, p, w);
        }
        off += e->len;
        w++;
    }
    str_map_free(&b->chunks);
    free(b);

    int64_t n;
    size_t n_mine;
    int64_t *mine = take_deltas(&s, &n_mine);
    int64_t *all = exchange_counts(mine, n_mine, 0, comm, &n);
    free(mine);
    apply_counts(&s, all, n);
    free(all);

    int32_t *merges = xmalloc((size_t)(2 * target + 1) * sizeof *merges);
    int done = 0;
    while (done < target) {
        heap_item best = {0, 0};
        int have = 0;
        while (s.heap.n) {
            best = heap_pop(&s.heap);
            int64_t *c = u64_map_find(&s.global, best.pair);
            if (c && *c == best.count && best.count > 0) { have = 1; break; }
        }
        if (!have) break; /* every chunk is a single token: nothing left to merge */
        int32_t a = (int32_t)(best.pair >> 32), bb = (int32_t)(best.pair & 0xffffffffu);
        int32_t m = 256 + done;
        merges[2 * done] = a;
        merges[2 * done + 1] = bb;
        merge_local(&s, a, bb, m, done);
        mine = take_deltas(&s, &n_mine);
        int64_t *changes = exchange_counts(mine, n_mine, -1, comm, &n);
        free(mine);
        apply_counts(&s, changes, n);
        free(changes);
        done++;
        if (progress) progress(done, target);
    }

    for (size_t i = 0; i < s.n_lists; i++) free(s.lists[i].w);
    free(s.lists);
    u64_map_free(&s.where);
    u64_map_free(&s.delta);
    free(s.touched);
    u64_map_free(&s.global);
    free(s.heap.items);
    free(s.ids);
    free(s.start);
    free(s.len);
    free(s.count);
    free(s.stamp);
    tokenizer *t = tokenizer_bpe_from_merges(merges, done);
    free(merges);
    return t;
}
