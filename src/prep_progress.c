/* prep_progress.c: the progress lines of `deltamla prep` on stderr. Rank 0 prints them;
 * the other ranks send it their byte and token counts (point-to-point, tag PROGRESS_TAG)
 * every min(--progress_interval, 1) seconds, so a line covers the whole job.
 */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "prep_internal.h"
#include "util.h"

#define PROGRESS_TAG 7177

typedef struct progress {
    const char *what;
    double interval, t0, last_print, last_send, last_poll;
    uint64_t total_bytes;
    uint64_t bytes, tokens; /* this rank's */
    uint64_t *peer;         /* rank 0: [prep_size][2], the latest report of each rank */
    int peers_done;         /* rank 0: ranks whose final report arrived */
} progress;

static progress g_progress;

void prep_progress_begin(const char *what, double interval, uint64_t total_bytes)
{
    progress *p = &g_progress;
    free(p->peer);
    memset(p, 0, sizeof *p);
    p->what = what;
    p->interval = interval;
    p->total_bytes = total_bytes;
    p->t0 = p->last_print = p->last_send = p->last_poll = wall_time();
    if (prep_rank == 0) p->peer = xcalloc((size_t)prep_size * 2, sizeof *p->peer);
}

/* Rank 0: take the reports that have arrived (blocking: wait for one). */
static void progress_recv(int blocking)
{
    progress *p = &g_progress;
    for (;;) {
        int flag = 1;
        MPI_Status st;
        if (!blocking) MPI_Iprobe(MPI_ANY_SOURCE, PROGRESS_TAG, MPI_COMM_WORLD, &flag, &st);
        if (!flag) return;
        uint64_t msg[3];
        MPI_Recv(msg, 3, MPI_UINT64_T, MPI_ANY_SOURCE, PROGRESS_TAG, MPI_COMM_WORLD, &st);
        p->peer[2 * st.MPI_SOURCE] = msg[0];
        p->peer[2 * st.MPI_SOURCE + 1] = msg[1];
        if (msg[2]) p->peers_done++;
        if (blocking) return;
    }
}

static void progress_print(double now)
{
    progress *p = &g_progress;
    p->peer[0] = p->bytes;
    p->peer[1] = p->tokens;
    uint64_t bytes = 0, tokens = 0;
    for (int r = 0; r < prep_size; r++) {
        bytes += p->peer[2 * r];
        tokens += p->peer[2 * r + 1];
    }
    double dt = now - p->t0 > 1e-9 ? now - p->t0 : 1e-9;
    fprintf(stderr, "prep: %s %.1f MB of %.1f MB, %.1f MB/s", p->what, bytes / 1e6, p->total_bytes / 1e6,
            bytes / 1e6 / dt);
    if (tokens) fprintf(stderr, ", %.2f M tokens/s", tokens / 1e6 / dt);
    fputc('\n', stderr);
    p->last_print = now;
}

/* Count work done by this rank; rank 0 prints a line every --progress_interval s. */
void prep_progress_add(uint64_t bytes, uint64_t tokens)
{
    progress *p = &g_progress;
    p->bytes += bytes;
    p->tokens += tokens;
    double now = wall_time();
    double beat = p->interval < 1.0 ? p->interval : 1.0;
    if (prep_rank != 0) {
        if (now - p->last_send >= beat) {
            uint64_t msg[3] = {p->bytes, p->tokens, 0};
            MPI_Send(msg, 3, MPI_UINT64_T, 0, PROGRESS_TAG, MPI_COMM_WORLD);
            p->last_send = now;
        }
        return;
    }
    if (now - p->last_poll >= beat / 4) {
        progress_recv(0);
        p->last_poll = now;
    }
    if (now - p->last_print >= p->interval) progress_print(now);
}

/* Every rank calls it when its part is done; rank 0 keeps printing until all are. */
void prep_progress_end(void)
{
    progress *p = &g_progress;
    if (prep_rank != 0) {
        uint64_t msg[3] = {p->bytes, p->tokens, 1};
        MPI_Send(msg, 3, MPI_UINT64_T, 0, PROGRESS_TAG, MPI_COMM_WORLD);
        return;
    }
    while (p->peers_done < prep_size - 1) {
        progress_recv(1);
        double now = wall_time();
        if (now - p->last_print >= p->interval) progress_print(now);
    }
}

void prep_bpe_progress(int done, int total)
{
    progress *p = &g_progress;
    double now = wall_time();
    if (prep_rank != 0 || (now - p->last_print < p->interval && done != total)) return;
    if (now - p->t0 < p->interval) return;
    double dt = now - p->t0;
    fprintf(stderr, "prep: bpe merge %d of %d, %.0f merges/s\n", done, total, done / dt);
    p->last_print = now;
}

void prep_progress_free(void)
{
    free(g_progress.peer);
    g_progress.peer = NULL;
}
