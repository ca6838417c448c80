/* test_config.c: checks of the command line and configuration (src/config.c).
 *
 * Covers the seed's defaults, every --size preset, flag forms and their order, the
 * derived MoE and GDN shapes (including MODEL.md's acceptance configuration), the per-
 * layer kv rank and block pattern, the JSON and printed forms, and the refusals. A
 * refusal ends the process through die(), so each bad command line is parsed in a
 * fork()ed child whose stderr comes back through a pipe: the test checks a non-zero
 * exit and exactly one line naming the problem. Prints "ok - ..." or "not ok - ..." per
 * check and exits non-zero if any failed.
 */
#define _POSIX_C_SOURCE 200809L
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "check.h"

#define MAX_ARGS 32

/* args: a NULL-terminated list of flags, as after the subcommand. */
static int count_args(const char *const *args)
{
    int n = 0;
    while (args[n]) n++;
    return n;
}

static void parse(config *c, const char *const *args)
{
    char *argv[MAX_ARGS];
    int argc = count_args(args);
    for (int i = 0; i < argc; i++) argv[i] = (char *)args[i];
    config_parse(c, argc, argv);
}

#define ARGS(...) ((const char *const[]){__VA_ARGS__, NULL})
#define NO_ARGS ((const char *const[]){NULL})

/* ---- child processes for the cases that end the program ---- */

typedef struct child_result {
    int exited;       /* 1 if it ended through exit(), 0 if killed */
    int code;         /* its exit status */
    char out[16384];  /* its stdout */
    char err[4096];   /* its stderr */
} child_result;

static void read_all(int fd, char *buf, size_t n)
{
    size_t len = 0;
    ssize_t got;
    while ((got = read(fd, buf + len, n - 1 - len)) > 0) {
        len += (size_t)got;
        if (len == n - 1) { /* keep draining so the child never blocks on a full pipe */
            char sink[256];
            while (read(fd, sink, sizeof sink) > 0) {}
            break;
        }
    }
    buf[len] = '\0';
}

/* Parse args in a child. After a successful parse the child prints
 * "batch_size=<n>" to stdout and exits 0, so a case that should fail but did not
 * shows up as exit 0. */
static void run_child(const char *const *args, child_result *r)
{
    int out_pipe[2], err_pipe[2];
    if (pipe(out_pipe) != 0 || pipe(err_pipe) != 0) {
        perror("pipe");
        exit(2);
    }
    fflush(stdout); /* or the child's exit() would write our buffered lines again */
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        exit(2);
    }
    if (pid == 0) {
        dup2(out_pipe[1], STDOUT_FILENO);
        dup2(err_pipe[1], STDERR_FILENO);
        close(out_pipe[0]);
        close(out_pipe[1]);
        close(err_pipe[0]);
        close(err_pipe[1]);
        config c;
        parse(&c, args);
        printf("batch_size=%d\n", c.batch_size);
        fflush(stdout);
        fflush(stderr);
        _exit(0);
    }
    close(out_pipe[1]);
    close(err_pipe[1]);
    /* The outputs here are far below a pipe's capacity, so reading one pipe to its end
     * before the other cannot deadlock. */
    read_all(out_pipe[0], r->out, sizeof r->out);
    read_all(err_pipe[0], r->err, sizeof r->err);
    close(out_pipe[0]);
    close(err_pipe[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    r->exited = WIFEXITED(status);
    r->code = r->exited ? WEXITSTATUS(status) : -1;
}

static int count_lines(const char *s)
{
    int n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

/* A bad command line: non-zero exit, exactly one line on stderr, containing each of the
 * NULL-terminated `words`. */
static void expect_refusal(const char *what, const char *const *args, const char *const *words)
{
    child_result r;
    run_child(args, &r);
    int ok = r.exited && r.code != 0 && count_lines(r.err) == 1;
    for (int i = 0; words[i]; i++) ok = ok && strstr(r.err, words[i]) != NULL;
    check(ok, "refuses %s (exit %d, stderr: %.*s)", what, r.code,
          (int)strcspn(r.err, "\n"), r.err);
    if (!ok && count_lines(r.err) != 1) printf("#   full stderr:\n%s", r.err);
}

#define WORDS(...) ((const char *const[]){__VA_ARGS__, NULL})

/* ---- checks ---- */

static void test_defaults(void)
{
    config c;
    config_defaults(&c);
    config_finish(&c);
    int ok = strcmp(c.size, "moe-1b") == 0 && c.n_layer == 12 && c.n_embd == 1024 &&
             c.n_head == 12 && c.vocab_size == 50304 && c.block_size == 2048 &&
             c.swa_layers_per_cycle == 2 && c.mla_layers_per_cycle == 1 &&
             c.deltanet_latent_dim == 0 && c.deltanet_share_qk == 0 && c.mla_q_lora_rank == 0 &&
             c.mla_kv_lora_rank == 256 && c.mla_qk_nope_head_dim == 128 &&
             c.mla_qk_rope_head_dim == 64 && c.mla_v_head_dim == 128 && c.rope_theta == 10000.0f;
    check(ok, "defaults: model shape is the seed's moe-1b");
    ok = c.use_moe == 1 && c.use_latent_moe == 1 && c.latent_ratio == 4 && c.latent_dim == 0 &&
         c.n_experts == 32 && c.n_activated == 3 && c.n_routed_experts == 0 &&
         c.n_activated_experts == 0 && c.n_shared_experts == 1 && c.expert_dim == 1024 &&
         c.latent_preserve_expert_dim == 0 && c.router_z_loss_coef == 0.001f &&
         c.router_bias_update_rate == 0.001f;
    check(ok, "defaults: LatentMoE settings");
    ok = c.batch_size == 8 && c.gradient_accumulation_steps == 1 && c.max_iters == 100000 &&
         c.warmup_iters == 400 && c.learning_rate == 1e-4f && c.min_lr == 1e-5f &&
         c.weight_decay == 0.1f && c.grad_clip == 1.0f && strcmp(c.optimizer_type, "muon") == 0 &&
         c.log_interval == 10 && c.seed == 1337 && c.data[0] == '\0' &&
         strcmp(c.output_dir, "out") == 0 && strcmp(c.device, "auto") == 0 &&
         c.gradient_checkpointing == 0 && c.skip_nonfinite == 0 && c.threads == 0;
    check(ok, "defaults: training settings");
    check(c.head_dim == 85 && c.gdn_proj_dim == 1020 && c.moe_E == 128 && c.moe_k == 12 &&
              c.moe_latent == 256 && c.moe_hidden == 256 && c.moe_in == 256,
          "defaults: derived head_dim 85, P 1020, E 128, k 12, l 256, h 256");

    config p;
    parse(&p, NO_ARGS);
    check(memcmp(&p, &c, sizeof c) == 0, "an empty command line gives the defaults");
}

static void test_presets(void)
{
    static const struct {
        const char *size;
        int n_layer, n_embd, n_head, moe, expert_dim, head_dim;
    } want[] = {
        {"small", 12, 1024, 16, 0, 1024, 64},  {"base", 24, 1536, 16, 0, 1024, 96},
        {"large", 28, 2048, 16, 0, 1024, 128}, {"moe-1b", 12, 1024, 12, 1, 1024, 85},
        {"moe-2b", 18, 1024, 16, 1, 3072, 64},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        config c;
        parse(&c, ARGS("--size", want[i].size));
        int ok = strcmp(c.size, want[i].size) == 0 && c.n_layer == want[i].n_layer &&
                 c.n_embd == want[i].n_embd && c.n_head == want[i].n_head &&
                 c.use_moe == want[i].moe && c.use_latent_moe == 1 &&
                 c.expert_dim == want[i].expert_dim && c.head_dim == want[i].head_dim &&
                 c.n_activated == 3 && c.n_experts == 32 && c.vocab_size == 50304;
        if (want[i].moe)
            ok = ok && c.moe_E == 128 && c.moe_k == 12 && c.moe_latent == 256 &&
                 c.moe_hidden == want[i].expert_dim / 4 && c.moe_in == 256;
        else
            ok = ok && c.moe_E == 0 && c.moe_k == 0 && c.moe_latent == 0 && c.moe_hidden == 0 &&
                 c.moe_in == 0;
        check(ok, "preset %s: %d layers, d %d, H %d, %s", want[i].size, want[i].n_layer,
              want[i].n_embd, want[i].n_head, want[i].moe ? "LatentMoE, k 3 x 4" : "dense");
    }

    config t;
    parse(&t, ARGS("--size", "tiny"));
    int ok = t.n_layer == 3 && t.n_embd == 64 && t.n_head == 4 && t.vocab_size == 512 &&
             t.block_size == 64 && t.use_moe && t.use_latent_moe && t.latent_ratio == 2 &&
             t.n_experts == 4 && t.n_activated == 1 && t.n_shared_experts == 1 &&
             t.expert_dim == 64 && t.mla_kv_lora_rank == 32 && t.mla_qk_nope_head_dim == 16 &&
             t.mla_qk_rope_head_dim == 8 && t.mla_v_head_dim == 16 && t.batch_size == 8;
    check(ok, "preset tiny: its settings");
    check(t.head_dim == 16 && t.moe_E == 8 && t.moe_k == 2 && t.moe_latent == 32 &&
              t.moe_hidden == 32 && t.moe_in == 32,
          "preset tiny: derived head_dim 16, E 8, k 2, l 32, h 32");
    check(config_is_gdn(&t, 0) && config_is_gdn(&t, 1) && !config_is_gdn(&t, 2) &&
              config_kv_rank(&t, 2) == 64,
          "preset tiny: G G M, the MLA layer's kv rank 64");
}

static void test_order(void)
{
    config c;
    parse(&c, ARGS("--n_layer", "6", "--size", "moe-2b"));
    check(c.n_layer == 6 && c.n_embd == 1024 && c.n_head == 16 && c.expert_dim == 3072,
          "a flag before --size overrides the preset");
    parse(&c, ARGS("--size", "moe-2b", "--n_layer", "6"));
    check(c.n_layer == 6 && c.n_head == 16, "a flag after --size overrides the preset");
    parse(&c, ARGS("--n_activated", "2", "--expert_dim", "512", "--size=moe-1b"));
    check(c.n_activated == 2 && c.expert_dim == 512 && c.moe_k == 8 && c.moe_hidden == 128,
          "--size=value form, with earlier overrides of the MoE shape");
    parse(&c, ARGS("--vocab_size", "1000", "--size", "tiny", "--batch_size", "3"));
    check(c.vocab_size == 1000 && c.batch_size == 3 && c.n_embd == 64,
          "overrides of the tiny preset's extra settings on both sides of --size");
    parse(&c, ARGS("--size", "small", "--use_moe", "--size", "tiny"));
    check(strcmp(c.size, "tiny") == 0 && c.n_layer == 3, "the last --size wins");
    parse(&c, ARGS("--batch_size", "4", "--batch_size", "5"));
    check(c.batch_size == 5, "a repeated flag: the last value wins");
}

static void test_forms(void)
{
    config c;
    parse(&c, ARGS("--batch_size=4", "--learning_rate=3e-4", "--optimizer_type=adamw",
                   "--seed=18446744073709551615", "--data=/tmp/a b=c", "--device", "cuda",
                   "--rope_theta", "500000", "--min_lr", "0", "--grad_clip", "0"));
    check(c.batch_size == 4 && c.learning_rate == 3e-4f && strcmp(c.optimizer_type, "adamw") == 0 &&
              c.seed == UINT64_MAX && strcmp(c.data, "/tmp/a b=c") == 0 &&
              strcmp(c.device, "cuda") == 0 && c.rope_theta == 500000.0f && c.min_lr == 0 &&
              c.grad_clip == 0,
          "--name=value and --name value for int, float, string and uint64");
    parse(&c, ARGS("--warmup_iters", "-0", "--threads", "+3"));
    check(c.warmup_iters == 0 && c.threads == 3, "signed integers");

    const struct {
        const char *const *args;
        int want;
        const char *what;
    } bools[] = {
        {ARGS("--deltanet_share_qk"), 1, "bare --flag"},
        {ARGS("--deltanet_share_qk=true"), 1, "--flag=true"},
        {ARGS("--deltanet_share_qk=True"), 1, "--flag=True"},
        {ARGS("--deltanet_share_qk=1"), 1, "--flag=1"},
        {ARGS("--deltanet_share_qk=false"), 0, "--flag=false"},
        {ARGS("--deltanet_share_qk=0"), 0, "--flag=0"},
        {ARGS("--deltanet_share_qk", "true"), 1, "--flag true"},
        {ARGS("--deltanet_share_qk", "1"), 1, "--flag 1"},
        {ARGS("--deltanet_share_qk", "false"), 0, "--flag false"},
        {ARGS("--deltanet_share_qk", "0"), 0, "--flag 0"},
        {ARGS("--deltanet_share_qk", "--no_deltanet_share_qk"), 0, "--no_flag after --flag"},
        {ARGS("--no_deltanet_share_qk", "--deltanet_share_qk"), 1, "--flag after --no_flag"},
    };
    for (size_t i = 0; i < sizeof bools / sizeof bools[0]; i++) {
        parse(&c, bools[i].args);
        check(c.deltanet_share_qk == bools[i].want, "bool form %s gives %d", bools[i].what,
              bools[i].want);
    }
    parse(&c, ARGS("--deltanet_share_qk", "--mla_q_lora_rank", "256"));
    check(c.deltanet_share_qk == 1 && c.mla_q_lora_rank == 256,
          "a bare bool flag does not consume the next flag");
    /* "8" is not a bool word, so it is left for the next round and refused there. */
    child_result r;
    run_child(ARGS("--gradient_checkpointing", "8"), &r);
    check(r.exited && r.code == 1 && strstr(r.err, "unexpected argument '8'"),
          "a bool flag consumes only true/false/1/0: '8' stays a positional and is refused");
}

static void test_moe_shapes(void)
{
    config c;
    parse(&c, ARGS("--size", "moe-1b", "--deltanet_latent_dim", "256", "--deltanet_share_qk",
                   "--mla_q_lora_rank", "256"));
    check(c.deltanet_latent_dim == 256 && c.deltanet_share_qk == 1 && c.mla_q_lora_rank == 256,
          "acceptance config: flags read");
    check(c.moe_E == 128 && c.moe_k == 12 && c.moe_latent == 256 && c.moe_hidden == 256 &&
              c.moe_in == 256 && c.head_dim == 85 && c.gdn_proj_dim == 1020,
          "acceptance config: E 128, k 12, l 256, h 256, head_dim 85");
    static const int mla_layers[] = {2, 5, 8, 11}, ranks[] = {197, 302, 407, 512};
    int ok = 1;
    for (int i = 0; i < 4; i++) ok = ok && config_kv_rank(&c, mla_layers[i]) == ranks[i];
    check(ok, "acceptance config: MLA layers 2 5 8 11 get kv ranks 197 302 407 512");
    check(config_kv_rank(&c, 0) == 128, "kv rank of layer 0 is half the base rank");
    char pattern[13];
    for (int i = 0; i < 12; i++) pattern[i] = config_is_gdn(&c, i) ? 'G' : 'M';
    pattern[12] = '\0';
    check(strcmp(pattern, "GGMGGMGGMGGM") == 0, "layer pattern G G M x 4 (got %s)", pattern);

    parse(&c, ARGS("--n_layer", "1", "--mla_kv_lora_rank", "100"));
    check(config_kv_rank(&c, 0) == 100, "one layer: kv rank factor 1");
    parse(&c, ARGS("--n_layer", "4", "--mla_kv_lora_rank", "1"));
    check(config_kv_rank(&c, 0) == 1, "kv rank is at least 1");
    parse(&c, ARGS("--swa_layers_per_cycle", "1", "--mla_layers_per_cycle", "2", "--n_layer", "6"));
    for (int i = 0; i < 6; i++) pattern[i] = config_is_gdn(&c, i) ? 'G' : 'M';
    pattern[6] = '\0';
    check(strcmp(pattern, "GMMGMM") == 0, "1 GDN + 2 MLA per cycle: G M M G M M (got %s)", pattern);
    parse(&c, ARGS("--swa_layers_per_cycle", "0", "--n_layer", "3"));
    check(!config_is_gdn(&c, 0) && !config_is_gdn(&c, 2), "0 GDN per cycle: all MLA");

    parse(&c, ARGS("--size", "moe-2b", "--no_use_latent_moe"));
    check(c.moe_E == 32 && c.moe_k == 3 && c.moe_hidden == 3072 && c.moe_in == 1024 &&
              c.moe_latent == 0,
          "standard MoE: E 32, k 3, h 3072, in 1024, no latent");
    parse(&c, ARGS("--use_latent_moe", "false", "--n_routed_experts", "64", "--n_activated_experts", "6"));
    check(c.moe_E == 64 && c.moe_k == 6 && c.moe_hidden == 1024 && c.moe_in == 1024,
          "standard MoE with explicit E 64 and k 6");
    parse(&c, ARGS("--latent_dim", "128", "--n_routed_experts", "100", "--n_activated_experts", "5",
                   "--latent_preserve_expert_dim", "--latent_ratio", "3", "--expert_dim", "1000"));
    check(c.moe_E == 100 && c.moe_k == 5 && c.moe_latent == 128 && c.moe_hidden == 1000 &&
              c.moe_in == 128,
          "LatentMoE with explicit latent, E, k and preserved expert_dim (no divisibility needed)");
    parse(&c, ARGS("--size", "moe-1b", "--no_use_moe"));
    check(c.moe_E == 0 && c.moe_k == 0 && c.moe_latent == 0 && c.moe_hidden == 0 && c.moe_in == 0,
          "--no_use_moe: dense, all moe_* 0");
    parse(&c, ARGS("--size", "small"));
    check(c.head_dim == 64 && c.gdn_proj_dim == 1024 && c.moe_E == 0 && c.moe_in == 0,
          "dense small: head_dim 64, P 1024, no MoE");
    parse(&c, ARGS("--size", "small", "--use_moe"));
    check(c.moe_E == 128 && c.moe_k == 12 && c.moe_hidden == 256 && c.moe_in == 256,
          "small with --use_moe: LatentMoE, the seed's default (--use_latent_moe defaults to true)");
}

static void test_refusals(void)
{
    expect_refusal("an unknown flag", ARGS("--foo", "1"),
                   WORDS("unknown flag --foo", "--help"));
    expect_refusal("an unknown --no_ flag", ARGS("--no_batch_size"),
                   WORDS("unknown flag --no_batch_size"));
    expect_refusal("a malformed integer", ARGS("--batch_size", "abc"),
                   WORDS("--batch_size", "'abc' is not an integer"));
    expect_refusal("an integer with trailing garbage", ARGS("--batch_size", "8x"),
                   WORDS("--batch_size", "'8x' is not an integer"));
    expect_refusal("a float for an integer", ARGS("--max_iters", "1e3"),
                   WORDS("--max_iters", "'1e3' is not an integer"));
    expect_refusal("an integer overflow", ARGS("--batch_size", "99999999999"),
                   WORDS("--batch_size", "99999999999", "range"));
    expect_refusal("an empty integer", ARGS("--batch_size="),
                   WORDS("--batch_size", "'' is not an integer"));
    expect_refusal("a negative uint64", ARGS("--seed", "-1"),
                   WORDS("--seed", "'-1' is not a non-negative integer"));
    expect_refusal("a uint64 overflow", ARGS("--seed", "18446744073709551616"),
                   WORDS("--seed", "range"));
    expect_refusal("a malformed float", ARGS("--learning_rate", "1e-4x"),
                   WORDS("--learning_rate", "'1e-4x' is not a number"));
    expect_refusal("an empty float", ARGS("--learning_rate="),
                   WORDS("--learning_rate", "'' is not a number"));
    expect_refusal("a non-finite float", ARGS("--learning_rate", "inf"),
                   WORDS("--learning_rate", "finite"));
    expect_refusal("a float overflow", ARGS("--weight_decay", "1e39"),
                   WORDS("--weight_decay", "finite"));
    expect_refusal("a missing value at the end", ARGS("--batch_size"),
                   WORDS("--batch_size needs a value"));
    expect_refusal("a missing value before a flag", ARGS("--data", "--size", "tiny"),
                   WORDS("--data needs a value"));
    expect_refusal("a bad bool value", ARGS("--use_moe=maybe"),
                   WORDS("--use_moe", "'maybe'", "true, false, 1 or 0"));
    expect_refusal("a value on a --no_ flag", ARGS("--no_use_moe=1"),
                   WORDS("--no_use_moe takes no value"));
    expect_refusal("a positional argument", ARGS("--size", "tiny", "data.h5"),
                   WORDS("unexpected argument 'data.h5'"));
    expect_refusal("a single-dash flag", ARGS("-x"), WORDS("unexpected argument '-x'"));
    expect_refusal("an unknown size", ARGS("--size", "huge"),
                   WORDS("unknown --size 'huge'", "small", "moe-1b", "moe-2b", "tiny"));
    expect_refusal("latent divisibility of n_embd",
                   ARGS("--n_embd", "1000", "--n_head", "10", "--latent_ratio", "3"),
                   WORDS("--n_embd 1000 is not divisible by --latent_ratio 3"));
    expect_refusal("latent divisibility of expert_dim", ARGS("--expert_dim", "1001"),
                   WORDS("--expert_dim 1001 is not divisible by --latent_ratio 4"));
    expect_refusal("top-k larger than E", ARGS("--n_experts", "2"),
                   WORDS("top-k 12 is larger than the 8 routed experts (--n_activated 3 x "
                         "--latent_ratio 4 > --n_experts 2 x 4)"));
    expect_refusal("explicit top-k larger than explicit E",
                   ARGS("--n_routed_experts", "4", "--n_activated_experts", "5"),
                   WORDS("top-k 5", "4 routed experts", "--n_activated_experts 5",
                         "--n_routed_experts 4"));
    expect_refusal("standard MoE top-k larger than E",
                   ARGS("--no_use_latent_moe", "--n_experts", "2"),
                   WORDS("top-k 3 is larger than the 2 routed experts (--n_activated 3 > "
                         "--n_experts 2)"));
    expect_refusal("an odd rope dim", ARGS("--mla_qk_rope_head_dim", "63"),
                   WORDS("--mla_qk_rope_head_dim 63", "even"));
    expect_refusal("a bad optimizer", ARGS("--optimizer_type", "sgd"),
                   WORDS("--optimizer_type 'sgd'", "muon", "adamw"));
    expect_refusal("a bad device", ARGS("--device", "tpu"), WORDS("--device 'tpu'", "cpu", "cuda"));
    expect_refusal("zero layers", ARGS("--n_layer", "0"), WORDS("--n_layer", "at least 1"));
    expect_refusal("vocab_size 1", ARGS("--vocab_size", "1"), WORDS("--vocab_size", "at least 2"));
    expect_refusal("more heads than width", ARGS("--size", "tiny", "--n_head", "65"),
                   WORDS("--n_head 65", "--n_embd 64"));
    expect_refusal("an empty layer cycle",
                   ARGS("--swa_layers_per_cycle", "0", "--mla_layers_per_cycle", "0"),
                   WORDS("--swa_layers_per_cycle", "--mla_layers_per_cycle"));
    expect_refusal("a zero learning rate", ARGS("--learning_rate", "0"),
                   WORDS("--learning_rate", "greater than 0"));
    expect_refusal("a negative grad_clip", ARGS("--grad_clip", "-1"), WORDS("--grad_clip"));
    expect_refusal("log_interval 0", ARGS("--log_interval", "0"), WORDS("--log_interval"));
    expect_refusal("a derived field as a flag", ARGS("--moe_E", "4"), WORDS("unknown flag --moe_E"));
}

static void test_help_and_ignored(void)
{
    child_result r;
    run_child(ARGS("--batch_size", "abc", "--help"), &r);
    int ok = r.exited && r.code == 0 && strstr(r.out, "usage: deltamla train|info [flags]") &&
             r.err[0] == '\0';
    static const char *const flags[] = {
        "--size", "--n_layer", "--batch_size", "--deltanet_share_qk", "--mla_q_lora_rank",
        "--latent_preserve_expert_dim", "--router_bias_update_rate", "--skip_nonfinite",
        "--threads", "--compile ", "--compile_mode", "--num_workers", "moe-2b", "adamw",
    };
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        ok = ok && strstr(r.out, flags[i]) != NULL;
    ok = ok && strstr(r.out, "moe_E") == NULL;
    check(ok, "--help prints usage and every flag (seed's ignored ones too) and exits 0");
    run_child(ARGS("-h"), &r);
    check(r.exited && r.code == 0 && strstr(r.out, "usage:"), "-h is --help");

    /* The README's advanced example, verbatim. */
    run_child(ARGS("--size", "moe-1b", "--batch_size", "8", "--block_size", "2048",
                   "--optimizer_type", "muon", "--learning_rate", "1e-4", "--compile",
                   "--compile_mode", "max-autotune", "--gradient_checkpointing",
                   "--deltanet_latent_dim", "256", "--deltanet_share_qk", "--mla_q_lora_rank",
                   "256", "--num_workers", "8"),
              &r);
    ok = r.exited && r.code == 0 && strstr(r.out, "batch_size=8") && count_lines(r.err) == 1 &&
         strstr(r.err, "--compile") && strstr(r.err, "--compile_mode") &&
         strstr(r.err, "--num_workers") && strstr(r.err, "no effect in deltamla");
    check(ok, "the seed README's command runs, with one note on the ignored flags (%.*s)",
          (int)strcspn(r.err, "\n"), r.err);
    run_child(ARGS("--num_workers", "x"), &r);
    check(r.exited && r.code == 1 && strstr(r.err, "--num_workers: 'x' is not an integer"),
          "an ignored flag's value is still checked");
    run_child(ARGS("--batch_size", "2"), &r);
    check(r.exited && r.code == 0 && r.err[0] == '\0', "no note without ignored flags");
}

/* ---- JSON: a minimal reader for the flat object config_json writes ---- */

typedef struct json_pair {
    char key[64];
    char value[CONFIG_PATH_MAX + 64]; /* raw text: a number, true/false, or a quoted string */
} json_pair;

static const char *skip_ws(const char *p)
{
    while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++;
    return p;
}

/* Returns the number of pairs, or -1 if the text is not one flat object of
 * "key": value pairs. */
static int json_read_flat(const char *p, json_pair *pairs, int max)
{
    int n = 0;
    p = skip_ws(p);
    if (*p++ != '{') return -1;
    for (;;) {
        p = skip_ws(p);
        if (*p == '}' && n == 0) return skip_ws(p + 1)[0] ? -1 : 0;
        if (*p++ != '"' || n == max) return -1;
        size_t k = 0;
        while (*p && *p != '"' && k + 1 < sizeof pairs[n].key) pairs[n].key[k++] = *p++;
        pairs[n].key[k] = '\0';
        if (*p++ != '"') return -1;
        p = skip_ws(p);
        if (*p++ != ':') return -1;
        p = skip_ws(p);
        const char *start = p;
        if (*p == '"') {
            for (p++; *p && *p != '"'; p++)
                if (*p == '\\' && p[1]) p++;
            if (*p++ != '"') return -1;
        } else if (strncmp(p, "true", 4) == 0) {
            p += 4;
        } else if (strncmp(p, "false", 5) == 0) {
            p += 5;
        } else {
            char *end;
            strtod(p, &end);
            if (end == p) return -1;
            p = end;
        }
        size_t len = (size_t)(p - start);
        if (len >= sizeof pairs[n].value) return -1;
        memcpy(pairs[n].value, start, len);
        pairs[n].value[len] = '\0';
        n++;
        p = skip_ws(p);
        if (*p == ',') {
            p++;
            continue;
        }
        if (*p != '}') return -1;
        return skip_ws(p + 1)[0] ? -1 : n;
    }
}

static const char *json_get(const json_pair *pairs, int n, const char *key)
{
    for (int i = 0; i < n; i++)
        if (strcmp(pairs[i].key, key) == 0) return pairs[i].value;
    return NULL;
}

/* Every field of struct config, options and derived, as config.h declares them. */
static const char *const all_fields[] = {
    "size", "n_layer", "n_embd", "n_head", "vocab_size", "block_size", "swa_layers_per_cycle",
    "mla_layers_per_cycle", "deltanet_latent_dim", "deltanet_share_qk", "mla_q_lora_rank",
    "mla_kv_lora_rank", "mla_qk_nope_head_dim", "mla_qk_rope_head_dim", "mla_v_head_dim",
    "rope_theta", "use_moe", "use_latent_moe", "latent_ratio", "latent_dim", "n_experts",
    "n_activated", "n_routed_experts", "n_activated_experts", "n_shared_experts", "expert_dim",
    "latent_preserve_expert_dim", "router_z_loss_coef", "router_bias_update_rate", "batch_size",
    "gradient_accumulation_steps", "max_iters", "warmup_iters", "learning_rate", "min_lr",
    "weight_decay", "grad_clip", "optimizer_type", "log_interval", "seed", "data", "output_dir",
    "device", "gradient_checkpointing", "skip_nonfinite", "threads", "ep", "zero", "bucket_mb", "comm_timing",
    "cuda_graph",
    "doc_mask", "val_data", "val_fraction",
    "eval_interval", "eval_iters", "resume", "checkpoint_interval", "keep_checkpoints", "head_dim", "gdn_proj_dim",
    "moe_E", "moe_k", "moe_latent", "moe_hidden", "moe_in",
};
#define N_FIELDS ((int)(sizeof all_fields / sizeof all_fields[0]))

static char *capture(const config *c, void (*write)(const config *, FILE *))
{
    FILE *f = tmpfile();
    if (!f) {
        perror("tmpfile");
        exit(2);
    }
    write(c, f);
    long len = ftell(f);
    rewind(f);
    char *buf = malloc((size_t)len + 1);
    size_t got = fread(buf, 1, (size_t)len, f);
    buf[got] = '\0';
    fclose(f);
    return buf;
}

static void test_json_and_print(void)
{
    config c;
    parse(&c, ARGS("--size", "moe-1b", "--deltanet_latent_dim", "256", "--deltanet_share_qk",
                   "--mla_q_lora_rank", "256", "--learning_rate", "3e-4", "--min_lr", "1.2345678e-7",
                   "--data", "dir \"quoted\"\\tab\there", "--seed", "18446744073709551615"));
    char *text = capture(&c, config_json);
    static json_pair pairs[128];
    int n = json_read_flat(text, pairs, 128);
    check(n > 0, "config_json writes one object of \"key\": value pairs (%d pairs)", n);

    int missing = 0;
    for (int i = 0; i < N_FIELDS; i++)
        if (!json_get(pairs, n, all_fields[i])) {
            printf("#   missing from JSON: %s\n", all_fields[i]);
            missing++;
        }
    check(missing == 0 && n == N_FIELDS, "config_json has every field of config.h and no other");
    check(json_get(pairs, n, "compile") == NULL, "config_json leaves out the ignored seed flags");

    const char *v;
    check((v = json_get(pairs, n, "moe_E")) && strcmp(v, "128") == 0, "\"moe_E\": 128");
    check((v = json_get(pairs, n, "moe_k")) && strcmp(v, "12") == 0, "\"moe_k\": 12");
    check((v = json_get(pairs, n, "deltanet_share_qk")) && strcmp(v, "true") == 0,
          "\"deltanet_share_qk\": true");
    check((v = json_get(pairs, n, "size")) && strcmp(v, "\"moe-1b\"") == 0, "\"size\": \"moe-1b\"");
    v = json_get(pairs, n, "data");
    check(v && strcmp(v, "\"dir \\\"quoted\\\"\\\\tab\\there\"") == 0,
          "strings are escaped (%s)", v ? v : "(none)");
    check((v = json_get(pairs, n, "seed")) && strcmp(v, "18446744073709551615") == 0,
          "uint64 seed written in full");

    const struct {
        const char *key;
        const float *field;
    } floats[] = {
        {"learning_rate", &c.learning_rate}, {"min_lr", &c.min_lr},
        {"rope_theta", &c.rope_theta},       {"weight_decay", &c.weight_decay},
        {"router_z_loss_coef", &c.router_z_loss_coef},
    };
    int exact = 1;
    for (size_t i = 0; i < sizeof floats / sizeof floats[0]; i++) {
        v = json_get(pairs, n, floats[i].key);
        exact = exact && v && strtof(v, NULL) == *floats[i].field;
    }
    check(exact, "floats read back exactly from the JSON");
    free(text);

    text = capture(&c, config_print);
    int lines = count_lines(text), well_formed = 1;
    for (char *line = text; *line;) {
        char *nl = strchr(line, '\n');
        *nl = '\0';
        well_formed = well_formed && strstr(line, " = ") != NULL;
        line = nl + 1;
    }
    check(well_formed && lines == N_FIELDS, "config_print: one \"name = value\" line per field (%d)",
          lines);
    free(text);
    text = capture(&c, config_print);
    check(strstr(text, "moe_E") && strstr(text, "= 128\n") && !strstr(text, "compile"),
          "config_print shows derived fields and not the ignored seed flags");
    free(text);
}

int main(void)
{
    test_defaults();
    test_presets();
    test_order();
    test_forms();
    test_moe_shapes();
    test_refusals();
    test_help_and_ignored();
    test_json_and_print();
    if (failures) printf("# %d check(s) failed\n", failures);
    else printf("# all config checks passed\n");
    return failures ? 1 : 0;
}
