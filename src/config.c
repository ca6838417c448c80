/* config.c: the option table, the --size presets, command-line parsing, validation and
 * printing of the run configuration declared in config.h.
 *
 * Everything a user can set is one row of `options` below: flag name (= field name),
 * type, place in struct config and help line. The parser, --help, config_print and
 * config_json all walk that one table, so a flag cannot be parsed but missing from the
 * help or the saved config (STYLE.md rule 6). Derived fields are rows too, so they print
 * and serialise the same way, but the parser refuses them. Seed flags that mean nothing
 * here (torch.compile, DataLoader workers) are rows marked ignored: a seed command line
 * runs unchanged, with one note saying they have no effect.
 */
#include "config.h"
#include "util.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef enum opt_type { OPT_INT, OPT_FLOAT, OPT_BOOL, OPT_STRING, OPT_UINT64 } opt_type;

typedef enum opt_role {
    OPT_ROLE_FLAG,    /* a flag stored in struct config */
    OPT_ROLE_IGNORED, /* a seed flag accepted for compatibility and stored nowhere */
    OPT_ROLE_DERIVED, /* computed by config_finish: printed and serialised, never parsed */
    OPT_ROLE_SECTION  /* a heading in --help */
} opt_role;

typedef struct option_entry {
    const char *name;    /* flag name without "--", and the struct field name */
    opt_type type;
    opt_role role;
    size_t offset;       /* offsetof(config, field) */
    size_t size;         /* sizeof the field: the capacity of a string, NUL included */
    const char *choices; /* space-separated allowed values of a string flag, or NULL */
    const char *help;
} option_entry;

/* The field's C type picks the row's type, so a row cannot disagree with config.h about
 * int, float, uint64 or string. On/off flags are ints in the struct: BOOL_FLAG says so. */
#define FIELD_TYPE(f)                                                                    \
    _Generic(((config *)0)->f, int: OPT_INT, float: OPT_FLOAT, uint64_t: OPT_UINT64,     \
             char *: OPT_STRING)
#define FIELD_SIZE(f) sizeof(((config *)0)->f)
#define FLAG(f, help) {#f, FIELD_TYPE(f), OPT_ROLE_FLAG, offsetof(config, f), FIELD_SIZE(f), NULL, help}
#define BOOL_FLAG(f, help) {#f, OPT_BOOL, OPT_ROLE_FLAG, offsetof(config, f), FIELD_SIZE(f), NULL, help}
#define CHOICE_FLAG(f, choices, help)                                                    \
    {#f, OPT_STRING, OPT_ROLE_FLAG, offsetof(config, f), FIELD_SIZE(f), choices, help}
#define IGNORED_FLAG(name, type, help) {name, type, OPT_ROLE_IGNORED, 0, 0, NULL, help}
#define DERIVED(f, help) {#f, FIELD_TYPE(f), OPT_ROLE_DERIVED, offsetof(config, f), FIELD_SIZE(f), NULL, help}
#define SECTION(title) {NULL, OPT_INT, OPT_ROLE_SECTION, 0, 0, NULL, title}

/* Stands in for the choices of --size, which are the names in the preset table below. */
static const char preset_choices_marker[] = "(presets)";

static const option_entry options[] = {
    SECTION("model (MODEL.md); --size sets the shape first, explicit flags override it"),
    CHOICE_FLAG(size, preset_choices_marker, "model preset, applied before every other flag"),
    FLAG(n_layer, "number of blocks"),
    FLAG(n_embd, "model width d"),
    FLAG(n_head, "heads H; GDN head_dim = n_embd / n_head, rounded down"),
    FLAG(vocab_size, "vocabulary size V (tied embedding and LM head)"),
    FLAG(block_size, "sequence length T"),
    FLAG(swa_layers_per_cycle, "GDN blocks per cycle (seed's name; GDN replaced its SWA)"),
    FLAG(mla_layers_per_cycle, "MLA blocks per cycle"),
    FLAG(deltanet_latent_dim, "GDN q/k/v/o bottleneck rank, 0 = direct projections"),
    BOOL_FLAG(deltanet_share_qk, "one GDN projection serves as both q and k"),
    FLAG(mla_q_lora_rank, "MLA query LoRA rank, 0 = direct query projection"),
    FLAG(mla_kv_lora_rank, "MLA kv LoRA rank; layer i gets rank x (0.5 + 1.5 i/(n_layer-1))"),
    FLAG(mla_qk_nope_head_dim, "MLA per-head query/key width without RoPE"),
    FLAG(mla_qk_rope_head_dim, "MLA per-head RoPE width (even)"),
    FLAG(mla_v_head_dim, "MLA per-head value width"),
    FLAG(rope_theta, "RoPE base"),

    SECTION("mixture of experts (the FFN of MLA blocks)"),
    BOOL_FLAG(use_moe, "MoE FFN in MLA blocks (on for moe-* sizes)"),
    BOOL_FLAG(use_latent_moe, "LatentMoE: routed experts work in a latent space (on for moe-* sizes)"),
    FLAG(latent_ratio, "LatentMoE ratio: latent = n_embd/ratio, experts and top-k x ratio"),
    FLAG(latent_dim, "LatentMoE latent width, 0 = n_embd / latent_ratio"),
    FLAG(n_experts, "base routed experts (LatentMoE routes n_experts x latent_ratio)"),
    FLAG(n_activated, "base experts per token (LatentMoE: n_activated x latent_ratio)"),
    FLAG(n_routed_experts, "routed experts E, replacing the count above; 0 = derived"),
    FLAG(n_activated_experts, "experts per token k, replacing the count above; 0 = derived"),
    FLAG(n_shared_experts, "always-on shared experts (full width, hidden expert_dim)"),
    FLAG(expert_dim, "expert hidden width (LatentMoE routed: expert_dim / latent_ratio)"),
    BOOL_FLAG(latent_preserve_expert_dim, "LatentMoE routed experts keep hidden expert_dim"),
    FLAG(router_z_loss_coef, "router z-loss coefficient"),
    FLAG(router_bias_update_rate, "step of the load-balancing router bias update (gamma)"),

    SECTION("training"),
    FLAG(batch_size, "micro-batch B per rank, in sequences"),
    FLAG(gradient_accumulation_steps, "micro-batches per optimizer step"),
    FLAG(max_iters, "optimizer steps"),
    FLAG(warmup_iters, "linear learning-rate warm-up steps"),
    FLAG(learning_rate, "peak learning rate (Muon groups use 200 x this)"),
    FLAG(min_lr, "learning rate reached by the cosine decay at max_iters"),
    FLAG(weight_decay, "decoupled weight decay"),
    FLAG(grad_clip, "global gradient-norm clip, 0 = no clipping"),
    CHOICE_FLAG(optimizer_type, "muon adamw", "muon: Muon for matrices, AdamW for the rest"),
    FLAG(log_interval, "steps between log lines"),
    FLAG(seed, "random seed (initialisation and data order)"),
    FLAG(data, "training data: a directory of token shards (deltamla prep), one shard (.h5), or a text file read as bytes"),
    FLAG(val_data, "validation data (same forms as --data); default: --val_fraction of --data"),
    FLAG(val_fraction, "fraction of --data's rows held out for validation when --val_data is not given"),
    FLAG(eval_interval, "steps between validation passes (0 = never)"),
    FLAG(eval_iters, "batches per validation pass"),
    BOOL_FLAG(doc_mask, "isolate documents: attention, GDN state, short convs and RoPE restart at each one"),
    FLAG(output_dir, "directory for checkpoints, metrics.jsonl and config.json"),
    FLAG(resume, "checkpoint to resume from: empty = OUTPUT_DIR/latest if present, none = start fresh, or a path"),
    FLAG(checkpoint_interval, "steps between checkpoints (0 = only at the end and on SIGUSR1/SIGTERM)"),
    FLAG(keep_checkpoints, "newest checkpoints kept in OUTPUT_DIR (0 = all)"),
    CHOICE_FLAG(device, "auto cpu cuda", "backend: auto = cuda when this build has it and a GPU is visible, else cpu"),
    BOOL_FLAG(gradient_checkpointing, "recompute each block's forward in backward to save memory"),
    BOOL_FLAG(skip_nonfinite, "skip a step whose gradients are not finite instead of stopping"),
    FLAG(threads, "OpenMP threads of the CPU backend, 0 = OpenMP's default"),
    FLAG(ep, "expert parallel: split each MoE layer's routed experts over this many ranks (divides the rank count and --n_experts)"),
    FLAG(zero, "ZeRO stage: 1 shards optimizer state over the data-parallel ranks, 0 keeps it whole on every rank"),
    FLAG(bucket_mb, "gradient-reduction bucket size in MiB (reductions start as buckets fill during the backward)"),
    BOOL_FLAG(comm_timing, "log the step split into compute, gradient reduction and expert all-to-all (synchronises)"),
    BOOL_FLAG(cuda_graph, "replay forward and backward as CUDA graphs (cuda; data parallel: the forward; not --ep)"),

    SECTION("seed flags accepted so its command lines run; they have no effect here"),
    IGNORED_FLAG("compile", OPT_BOOL, "torch.compile (deltamla is compiled ahead of time)"),
    IGNORED_FLAG("compile_mode", OPT_STRING, "torch.compile mode"),
    IGNORED_FLAG("num_workers", OPT_INT, "PyTorch DataLoader worker processes"),

    DERIVED(head_dim, "GDN head width n_embd / n_head"),
    DERIVED(gdn_proj_dim, "GDN projection width n_head x head_dim"),
    DERIVED(moe_E, "routed experts per MoE layer"),
    DERIVED(moe_k, "routed experts per token"),
    DERIVED(moe_latent, "LatentMoE latent width l (0 without LatentMoE)"),
    DERIVED(moe_hidden, "routed expert hidden width h"),
    DERIVED(moe_in, "routed expert input/output width (l or n_embd)"),
};

#define N_OPTIONS (sizeof options / sizeof options[0])

/* ---- presets (MODEL.md section 10) ---- */

typedef struct preset {
    const char *name;
    int n_layer, n_embd, n_head;
    int moe;        /* use_moe and use_latent_moe */
    int expert_dim; /* 0: the preset leaves expert_dim alone */
    int n_experts;  /* 0: likewise */
} preset;

/* n_activated is deliberately absent: the seed's moe-1b preset says 2, but its training
 * script's CLI default (3) wins, and the acceptance parameter counts need k = 3 x 4. */
static const preset presets[] = {
    {"small", 12, 1024, 16, 0, 0, 0},
    {"base", 24, 1536, 16, 0, 0, 0},
    {"large", 28, 2048, 16, 0, 0, 0},
    {"moe-1b", 12, 1024, 12, 1, 1024, 32},
    {"moe-2b", 18, 1024, 16, 1, 3072, 32},
    {"tiny", 3, 64, 4, 1, 64, 4},
};

#define N_PRESETS (sizeof presets / sizeof presets[0])

static void preset_names(char *buf, size_t n)
{
    buf[0] = '\0';
    for (size_t i = 0; i < N_PRESETS; i++) {
        size_t len = strlen(buf);
        snprintf(buf + len, n - len, "%s%s", i ? " " : "", presets[i].name);
    }
}

static void apply_preset(config *c, const char *name)
{
    const preset *p = NULL;
    for (size_t i = 0; i < N_PRESETS; i++)
        if (strcmp(presets[i].name, name) == 0) p = &presets[i];
    if (!p) {
        char names[128];
        preset_names(names, sizeof names);
        die("unknown --size '%s' (valid sizes: %s)", name, names);
    }
    snprintf(c->size, sizeof c->size, "%s", p->name);
    c->n_layer = p->n_layer;
    c->n_embd = p->n_embd;
    c->n_head = p->n_head;
    c->use_moe = p->moe;
    c->use_latent_moe = 1; /* the seed: "--use_latent_moe (default: true)"; only matters with --use_moe */
    if (p->expert_dim) c->expert_dim = p->expert_dim;
    if (p->n_experts) c->n_experts = p->n_experts;
    if (strcmp(p->name, "tiny") == 0) {
        /* Small enough for unit tests and a CPU demo, yet every code path is live:
         * two GDN blocks and one MLA block with LatentMoE (E 8, k 2, latent 32). */
        c->vocab_size = 512; /* bytes, the end-of-text token and small BPE vocabularies */
        c->block_size = 64;
        c->latent_ratio = 2;
        c->n_activated = 1;
        c->n_shared_experts = 1;
        c->mla_kv_lora_rank = 32;
        c->mla_qk_nope_head_dim = 16;
        c->mla_qk_rope_head_dim = 8;
        c->mla_v_head_dim = 16;
        c->batch_size = 8;
    }
}

void config_defaults(config *c)
{
    memset(c, 0, sizeof *c);
    c->vocab_size = 50304;
    c->block_size = 2048;
    c->swa_layers_per_cycle = 2;
    c->mla_layers_per_cycle = 1;
    c->deltanet_latent_dim = 0;
    c->deltanet_share_qk = 0;
    c->mla_q_lora_rank = 0;
    c->mla_kv_lora_rank = 256;
    c->mla_qk_nope_head_dim = 128;
    c->mla_qk_rope_head_dim = 64;
    c->mla_v_head_dim = 128;
    c->rope_theta = 10000.0f;
    c->latent_ratio = 4;
    c->latent_dim = 0;
    c->n_experts = 32;
    c->n_activated = 3;
    c->n_routed_experts = 0;
    c->n_activated_experts = 0;
    c->n_shared_experts = 1;
    c->latent_preserve_expert_dim = 0;
    c->router_z_loss_coef = 0.001f;
    c->router_bias_update_rate = 0.001f;

    c->batch_size = 8;
    c->gradient_accumulation_steps = 1;
    c->max_iters = 100000;
    c->warmup_iters = 400;
    c->learning_rate = 1e-4f;
    c->min_lr = 1e-5f;
    c->weight_decay = 0.1f;
    c->grad_clip = 1.0f;
    snprintf(c->optimizer_type, sizeof c->optimizer_type, "muon");
    c->log_interval = 10;
    c->seed = 1337;
    c->data[0] = '\0';
    snprintf(c->output_dir, sizeof c->output_dir, "out");
    snprintf(c->device, sizeof c->device, "auto");
    c->val_fraction = 0.0f;
    c->eval_interval = 0;
    c->eval_iters = 20;
    c->checkpoint_interval = 1000;
    c->keep_checkpoints = 3;
    c->gradient_checkpointing = 0;
    c->skip_nonfinite = 0;
    c->threads = 0;
    c->ep = 1;
    c->zero = 0;
    c->bucket_mb = 64;
    c->comm_timing = 0;
    c->cuda_graph = 0;

    /* The seed's default size: its shape (and MoE on) belong to the defaults, so a bare
     * `deltamla train` is the seed's bare `train.py`. */
    apply_preset(c, "moe-1b");
}

/* ---- value parsing ---- */

static const char *type_word(opt_type t)
{
    switch (t) {
    case OPT_INT: return "an integer";
    case OPT_FLOAT: return "a number";
    case OPT_BOOL: return "true, false, 1 or 0";
    case OPT_STRING: return "a string";
    case OPT_UINT64: return "a non-negative integer";
    }
    return "a value";
}

/* Case-insensitive so that Python habits (True/False) carry over. */
static int parse_bool_word(const char *s, int *out)
{
    static const char *const words[] = {"true", "false", "1", "0"};
    for (int w = 0; w < 4; w++) {
        const char *a = s, *b = words[w];
        while (*a && *b && tolower((unsigned char)*a) == *b) a++, b++;
        if (!*a && !*b) {
            *out = (w == 0 || w == 2);
            return 1;
        }
    }
    return 0;
}

/* Leading blanks are refused although strtol would skip them: a value such as " 8"
 * almost always comes from a broken script, and reading it silently hides that. */
static int starts_clean(const char *s) { return s[0] != '\0' && s[0] != ' ' && s[0] != '\t'; }

static void parse_int(const char *flag, const char *s, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (!starts_clean(s) || *end != '\0') die("--%s: '%s' is not an integer", flag, s);
    if (errno == ERANGE || v < INT_MIN || v > INT_MAX)
        die("--%s: '%s' is not an integer in range (%d to %d)", flag, s, INT_MIN, INT_MAX);
    *out = (int)v;
}

static void parse_uint64(const char *flag, const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    /* strtoull would wrap "-1" to 2^64-1; a sign is never meant here. */
    unsigned long long v = strtoull(s, &end, 10);
    if (!starts_clean(s) || s[0] == '-' || s[0] == '+' || *end != '\0')
        die("--%s: '%s' is not a non-negative integer", flag, s);
    if (errno == ERANGE)
        die("--%s: '%s' is not a non-negative integer in range (at most %" PRIu64 ")", flag, s,
            (uint64_t)UINT64_MAX);
    *out = (uint64_t)v;
}

static void parse_float(const char *flag, const char *s, float *out)
{
    char *end;
    errno = 0;
    /* strtof rounds the decimal once, straight to float; strtod then a cast would round
     * twice and could differ from the seed's value in the last bit. */
    float v = strtof(s, &end);
    if (!starts_clean(s) || *end != '\0') die("--%s: '%s' is not a number", flag, s);
    if (!isfinite(v) || errno == ERANGE)
        die("--%s: '%s' is not a finite number in float range", flag, s);
    *out = v;
}

static int in_choices(const char *choices, const char *s)
{
    size_t n = strlen(s);
    const char *p = choices;
    while (*p) {
        size_t w = strcspn(p, " ");
        if (w == n && strncmp(p, s, n) == 0) return 1;
        p += w;
        while (*p == ' ') p++;
    }
    return 0;
}

/* Store `text` as the value of row o. Ignored rows check the value's form (so a typo is
 * still caught) and store nothing. */
static void set_value(const option_entry *o, config *c, const char *text)
{
    union { int i; float f; uint64_t u; } scratch;
    int ignored = o->role == OPT_ROLE_IGNORED;
    void *dst = ignored ? (void *)&scratch : (void *)((char *)c + o->offset);
    switch (o->type) {
    case OPT_INT: parse_int(o->name, text, dst); break;
    case OPT_FLOAT: parse_float(o->name, text, dst); break;
    case OPT_UINT64: parse_uint64(o->name, text, dst); break;
    case OPT_BOOL:
        if (!parse_bool_word(text, dst)) die("--%s: '%s' is not true, false, 1 or 0", o->name, text);
        break;
    case OPT_STRING:
        if (ignored) break;
        if (o->choices && o->choices != preset_choices_marker && !in_choices(o->choices, text))
            die("--%s '%s' is not one of: %s", o->name, text, o->choices);
        if (strlen(text) >= o->size)
            die("--%s: '%s' is longer than %zu characters", o->name, text, o->size - 1);
        memcpy(dst, text, strlen(text) + 1);
        break;
    }
}

static const option_entry *find_flag(const char *name, size_t len)
{
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const option_entry *o = &options[i];
        if (o->role != OPT_ROLE_FLAG && o->role != OPT_ROLE_IGNORED) continue;
        if (strlen(o->name) == len && strncmp(o->name, name, len) == 0) return o;
    }
    return NULL;
}

/* A value never starts with "--": "--batch_size --lr 1" is a missing value, not a
 * batch size of "--lr". A value that must start so can use --name=value. */
static int is_flag_like(const char *s) { return strncmp(s, "--", 2) == 0; }

void config_parse(config *c, int argc, char **argv)
{
    /* Help first, so that it works even on a command line that would be refused. */
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            config_help(stdout);
            fflush(stdout);
            exit(0);
        }
    }

    config_defaults(c);

    /* The preset goes first wherever --size stands, so "--n_layer 6 --size moe-2b"
     * means moe-2b with 6 layers: an explicit flag beats the preset in any order. */
    const char *size = NULL;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--size") == 0 && i + 1 < argc && !is_flag_like(argv[i + 1]))
            size = argv[i + 1];
        else if (strncmp(argv[i], "--size=", 7) == 0)
            size = argv[i] + 7;
    }
    if (size) apply_preset(c, size);

    const option_entry *ignored_seen[N_OPTIONS];
    int n_ignored_seen = 0;

    for (int i = 0; i < argc; i++) {
        const char *arg = argv[i];
        if (!is_flag_like(arg) || arg[2] == '\0')
            die("unexpected argument '%s' (flags start with --; deltamla train --help lists "
                "them)", arg);
        const char *name = arg + 2;
        const char *eq = strchr(name, '=');
        size_t name_len = eq ? (size_t)(eq - name) : strlen(name);
        const char *inline_value = eq ? eq + 1 : NULL;

        int negated = 0;
        const option_entry *o = find_flag(name, name_len);
        if (!o && name_len > 3 && strncmp(name, "no_", 3) == 0) {
            o = find_flag(name + 3, name_len - 3);
            if (o && o->type == OPT_BOOL) negated = 1;
            else o = NULL;
        }
        if (!o)
            die("unknown flag --%.*s (deltamla train --help lists the flags)", (int)name_len,
                name);

        if (o->type == OPT_BOOL) {
            int value = 1;
            if (negated) {
                if (inline_value) die("--no_%s takes no value (got '%s')", o->name, inline_value);
                value = 0;
            } else if (inline_value) {
                if (!parse_bool_word(inline_value, &value))
                    die("--%s: '%s' is not true, false, 1 or 0", o->name, inline_value);
            } else if (i + 1 < argc && parse_bool_word(argv[i + 1], &value)) {
                i++; /* "--flag false" from a wrapper script means false, not a positional */
            } else {
                value = 1; /* bare "--flag", as argparse's store_true */
            }
            if (o->role == OPT_ROLE_FLAG) *(int *)((char *)c + o->offset) = value;
        } else {
            const char *value = inline_value;
            if (!value) {
                if (i + 1 >= argc || is_flag_like(argv[i + 1]))
                    die("--%s needs a value (%s)", o->name, type_word(o->type));
                value = argv[++i];
            }
            set_value(o, c, value);
        }

        if (o->role == OPT_ROLE_IGNORED) {
            int seen = 0;
            for (int k = 0; k < n_ignored_seen; k++) seen |= ignored_seen[k] == o;
            if (!seen) ignored_seen[n_ignored_seen++] = o;
        }
    }

    if (n_ignored_seen) {
        fputs("deltamla: note: ", stderr);
        for (int k = 0; k < n_ignored_seen; k++)
            fprintf(stderr, "%s--%s", k ? ", " : "", ignored_seen[k]->name);
        fprintf(stderr, " %s no effect in deltamla and %s ignored\n",
                n_ignored_seen > 1 ? "have" : "has", n_ignored_seen > 1 ? "are" : "is");
    }

    config_finish(c);
}

/* ---- derived fields and validation ---- */

static void require_at_least(const char *flag, long long v, long long min)
{
    if (v < min) die("--%s must be at least %lld (got %lld)", flag, min, v);
}

/* Written as !(v >= min) so that a NaN from a hand-built config fails too. */
static void require_float_at_least(const char *flag, float v, float min)
{
    if (!(v >= min)) die("--%s must be at least %g (got %g)", flag, (double)min, (double)v);
}

static void require_float_positive(const char *flag, float v)
{
    if (!(v > 0)) die("--%s must be greater than 0 (got %g)", flag, (double)v);
}

static int checked_product(long long a, long long b, const char *what)
{
    long long p = a * b; /* both operands are ints, so the product fits a long long */
    if (p > INT_MAX) die("%s %lld x %lld is too large", what, a, b);
    return (int)p;
}

static void finish_moe(config *c)
{
    c->moe_E = c->moe_k = c->moe_latent = c->moe_hidden = c->moe_in = 0;
    if (!c->use_moe) return;

    int latent = c->use_latent_moe;
    int r = latent ? c->latent_ratio : 1;
    require_at_least("expert_dim", c->expert_dim, 1);
    require_at_least("n_shared_experts", c->n_shared_experts, 0);
    require_at_least("n_routed_experts", c->n_routed_experts, 0);
    require_at_least("n_activated_experts", c->n_activated_experts, 0);
    if (latent) {
        require_at_least("latent_ratio", c->latent_ratio, 1);
        require_at_least("latent_dim", c->latent_dim, 0);
        if (!c->latent_dim && c->n_embd % r != 0)
            die("--n_embd %d is not divisible by --latent_ratio %d (LatentMoE needs "
                "n_embd/latent_ratio; or give --latent_dim)", c->n_embd, r);
        if (!c->latent_preserve_expert_dim && c->expert_dim % r != 0)
            die("--expert_dim %d is not divisible by --latent_ratio %d (LatentMoE routed "
                "experts use expert_dim/latent_ratio; or give --latent_preserve_expert_dim)",
                c->expert_dim, r);
    }

    /* Where E and k come from, for the messages below. */
    char e_src[96], k_src[96];
    if (c->n_routed_experts) {
        c->moe_E = c->n_routed_experts;
        snprintf(e_src, sizeof e_src, "--n_routed_experts %d", c->n_routed_experts);
    } else {
        require_at_least("n_experts", c->n_experts, 1);
        c->moe_E = checked_product(c->n_experts, r, "routed experts --n_experts x --latent_ratio");
        if (latent) snprintf(e_src, sizeof e_src, "--n_experts %d x %d", c->n_experts, r);
        else snprintf(e_src, sizeof e_src, "--n_experts %d", c->n_experts);
    }
    if (c->n_activated_experts) {
        c->moe_k = c->n_activated_experts;
        snprintf(k_src, sizeof k_src, "--n_activated_experts %d", c->n_activated_experts);
    } else {
        require_at_least("n_activated", c->n_activated, 1);
        c->moe_k = checked_product(c->n_activated, r, "top-k --n_activated x --latent_ratio");
        if (latent)
            snprintf(k_src, sizeof k_src, "--n_activated %d x --latent_ratio %d", c->n_activated, r);
        else snprintf(k_src, sizeof k_src, "--n_activated %d", c->n_activated);
    }
    if (c->moe_k > c->moe_E)
        die("top-k %d is larger than the %d routed experts (%s > %s)", c->moe_k, c->moe_E, k_src,
            e_src);

    if (latent) {
        c->moe_latent = c->latent_dim ? c->latent_dim : c->n_embd / r;
        c->moe_hidden = c->latent_preserve_expert_dim ? c->expert_dim : c->expert_dim / r;
        c->moe_in = c->moe_latent;
    } else {
        c->moe_latent = 0;
        c->moe_hidden = c->expert_dim;
        c->moe_in = c->n_embd;
    }
}

void config_finish(config *c)
{
    require_at_least("n_layer", c->n_layer, 1);
    require_at_least("n_embd", c->n_embd, 1);
    require_at_least("n_head", c->n_head, 1);
    if (c->n_head > c->n_embd)
        die("--n_head %d is larger than --n_embd %d (GDN head_dim = n_embd / n_head would be 0)",
            c->n_head, c->n_embd);
    require_at_least("vocab_size", c->vocab_size, 2);
    require_at_least("block_size", c->block_size, 1);

    require_at_least("swa_layers_per_cycle", c->swa_layers_per_cycle, 0);
    require_at_least("mla_layers_per_cycle", c->mla_layers_per_cycle, 0);
    if ((long long)c->swa_layers_per_cycle + c->mla_layers_per_cycle < 1)
        die("--swa_layers_per_cycle 0 and --mla_layers_per_cycle 0 leave a cycle with no "
            "blocks (their sum must be at least 1)");
    require_at_least("deltanet_latent_dim", c->deltanet_latent_dim, 0);
    require_at_least("mla_q_lora_rank", c->mla_q_lora_rank, 0);
    require_at_least("mla_kv_lora_rank", c->mla_kv_lora_rank, 1);
    require_at_least("mla_qk_nope_head_dim", c->mla_qk_nope_head_dim, 1);
    require_at_least("mla_v_head_dim", c->mla_v_head_dim, 1);
    if (c->mla_qk_rope_head_dim < 2 || c->mla_qk_rope_head_dim % 2 != 0)
        die("--mla_qk_rope_head_dim %d must be even and at least 2 (RoPE rotates pairs)",
            c->mla_qk_rope_head_dim);
    require_float_positive("rope_theta", c->rope_theta);
    require_float_at_least("router_z_loss_coef", c->router_z_loss_coef, 0);
    require_float_at_least("router_bias_update_rate", c->router_bias_update_rate, 0);

    require_at_least("batch_size", c->batch_size, 1);
    require_at_least("gradient_accumulation_steps", c->gradient_accumulation_steps, 1);
    require_at_least("max_iters", c->max_iters, 0);
    require_at_least("warmup_iters", c->warmup_iters, 0);
    require_float_positive("learning_rate", c->learning_rate);
    require_float_at_least("min_lr", c->min_lr, 0);
    require_float_at_least("weight_decay", c->weight_decay, 0);
    require_float_at_least("grad_clip", c->grad_clip, 0);
    require_at_least("log_interval", c->log_interval, 1);
    require_at_least("threads", c->threads, 0);
    require_at_least("ep", c->ep, 1);
    require_at_least("bucket_mb", c->bucket_mb, 1);
    if (c->zero != 0 && c->zero != 1) die("--zero %d: only 0 (off) and 1 (optimizer state sharded) exist", c->zero);
    require_float_at_least("val_fraction", c->val_fraction, 0);
    if (c->val_fraction >= 1) die("--val_fraction %g must be below 1 (it is the share of rows held out)", c->val_fraction);
    require_at_least("eval_interval", c->eval_interval, 0);
    require_at_least("eval_iters", c->eval_iters, 1);
    require_at_least("checkpoint_interval", c->checkpoint_interval, 0);
    require_at_least("keep_checkpoints", c->keep_checkpoints, 0);
    /* Checked again here because a config may be built without config_parse. */
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const option_entry *o = &options[i];
        if (o->role != OPT_ROLE_FLAG || !o->choices || o->choices == preset_choices_marker)
            continue;
        const char *s = (const char *)c + o->offset;
        if (!in_choices(o->choices, s)) die("--%s '%s' is not one of: %s", o->name, s, o->choices);
    }

    c->head_dim = c->n_embd / c->n_head;
    c->gdn_proj_dim = c->n_head * c->head_dim;
    finish_moe(c);
    if (c->ep > 1 && !c->use_moe) die("--ep %d needs a model with MoE layers (--use_moe)", c->ep);
    if (c->ep > 1 && c->moe_E % c->ep != 0)
        die("--ep %d does not divide the %d routed experts per MoE layer (each rank holds experts / ep of them)", c->ep,
            c->moe_E);
}

int config_kv_rank(const config *c, int layer)
{
    fatal_check(layer >= 0 && layer < c->n_layer);
    /* The seed's Python expression in the same order of operations, in double, so the
     * floor lands on the same integer. */
    double factor = c->n_layer == 1 ? 1.0 : 0.5 + 1.5 * layer / (double)(c->n_layer - 1);
    double r = floor(c->mla_kv_lora_rank * factor);
    return r < 1 ? 1 : (int)r;
}

int config_is_gdn(const config *c, int layer)
{
    int cycle = c->swa_layers_per_cycle + c->mla_layers_per_cycle;
    fatal_check(layer >= 0 && cycle >= 1);
    return layer % cycle < c->swa_layers_per_cycle;
}

/* ---- printing ---- */

/* The shortest form that reads back as the same float: "0.0001" rather than
 * "9.99999975e-05" and "10000" rather than "1e+04", yet exact (%.9g always is). */
static void format_float(float v, char *buf, size_t n)
{
    if (v == floorf(v) && fabsf(v) < 1e9f) {
        snprintf(buf, n, "%.0f", (double)v);
        return;
    }
    for (int prec = 1; prec <= 9; prec++) {
        snprintf(buf, n, "%.*g", prec, (double)v);
        if (strtof(buf, NULL) == v) return;
    }
}

static void format_value(const option_entry *o, const config *c, char *buf, size_t n)
{
    const char *p = (const char *)c + o->offset;
    switch (o->type) {
    case OPT_INT: snprintf(buf, n, "%d", *(const int *)p); break;
    case OPT_BOOL: snprintf(buf, n, "%s", *(const int *)p ? "true" : "false"); break;
    case OPT_FLOAT: format_float(*(const float *)p, buf, n); break;
    case OPT_UINT64: snprintf(buf, n, "%" PRIu64, *(const uint64_t *)p); break;
    case OPT_STRING: snprintf(buf, n, "%s", p[0] ? p : "\"\""); break;
    }
}

static int printed(const option_entry *o)
{
    return o->role == OPT_ROLE_FLAG || o->role == OPT_ROLE_DERIVED;
}

void config_print(const config *c, FILE *f)
{
    int width = 0;
    for (size_t i = 0; i < N_OPTIONS; i++)
        if (printed(&options[i]) && (int)strlen(options[i].name) > width)
            width = (int)strlen(options[i].name);
    char value[CONFIG_PATH_MAX + 8];
    /* The table lists every flag before the derived rows, so one pass prints the
     * options first and the derived fields after them. */
    for (size_t i = 0; i < N_OPTIONS; i++) {
        if (!printed(&options[i])) continue;
        format_value(&options[i], c, value, sizeof value);
        fprintf(f, "%-*s = %s\n", width, options[i].name, value);
    }
}

static void json_string(const char *s, FILE *f)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') fprintf(f, "\\%c", ch);
        else if (ch == '\n') fputs("\\n", f);
        else if (ch == '\t') fputs("\\t", f);
        else if (ch < 0x20) fprintf(f, "\\u%04x", ch);
        else fputc(ch, f);
    }
    fputc('"', f);
}

void config_json(const config *c, FILE *f)
{
    char value[64];
    int first = 1;
    fputs("{\n", f);
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const option_entry *o = &options[i];
        if (!printed(o)) continue;
        fprintf(f, "%s  \"%s\": ", first ? "" : ",\n", o->name);
        first = 0;
        if (o->type == OPT_STRING) {
            json_string((const char *)c + o->offset, f);
        } else {
            format_value(o, c, value, sizeof value);
            fputs(value, f);
        }
    }
    fputs("\n}\n", f);
}

static const char *type_metavar(opt_type t)
{
    switch (t) {
    case OPT_INT: return "INT";
    case OPT_FLOAT: return "FLOAT";
    case OPT_BOOL: return "[BOOL]";
    case OPT_STRING: return "STR";
    case OPT_UINT64: return "UINT";
    }
    return "";
}

void config_help(FILE *f)
{
    config d;
    config_defaults(&d);
    char names[128];
    preset_names(names, sizeof names);

    fputs("usage: deltamla train|info [flags]\n\n"
          "Flags take their value as --name value or --name=value. On/off flags ([BOOL]) are\n"
          "set by a bare --name, --name=true|false|1|0, --name true|false|1|0, or --no_name.\n"
          "Defaults are the seed's (size moe-1b); --size applies its preset first, so an\n"
          "explicit flag overrides the preset wherever it stands.\n",
          f);

    int width = 0;
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const option_entry *o = &options[i];
        if (o->role != OPT_ROLE_FLAG && o->role != OPT_ROLE_IGNORED) continue;
        int w = (int)(strlen(o->name) + strlen(type_metavar(o->type))) + 3;
        if (w > width) width = w;
    }

    char flag[96], value[CONFIG_PATH_MAX + 8];
    for (size_t i = 0; i < N_OPTIONS; i++) {
        const option_entry *o = &options[i];
        if (o->role == OPT_ROLE_SECTION) {
            fprintf(f, "\n%s:\n", o->help);
            continue;
        }
        if (o->role == OPT_ROLE_DERIVED) continue;
        snprintf(flag, sizeof flag, "--%s %s", o->name, type_metavar(o->type));
        if (o->role == OPT_ROLE_IGNORED) snprintf(value, sizeof value, "ignored");
        else format_value(o, &d, value, sizeof value);
        fprintf(f, "  %-*s  %-8s  %s", width, flag, value, o->help);
        if (o->choices == preset_choices_marker) fprintf(f, " (%s)", names);
        else if (o->choices) fprintf(f, " (%s)", o->choices);
        fputc('\n', f);
    }
    fprintf(f, "\n  %-*s  %-8s  %s\n", width, "--help, -h", "", "print this text and exit");
}
