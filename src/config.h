/* config.h: the run configuration: model shape, training settings, and what follows
 * from them.
 *
 * One option table (config.c) drives parsing, --help and the printed configuration, so
 * the three cannot drift (STYLE.md). Flag names are the PyTorch seed's (--size,
 * --batch_size, --deltanet_latent_dim, ...); a few of ours are added for small models
 * and for the run itself. Every field below is a flag of the same name unless marked
 * "derived"; config_json() writes every field under its field name.
 */
#ifndef DELTAMLA_CONFIG_H
#define DELTAMLA_CONFIG_H

#include <stdint.h>
#include <stdio.h>

#define CONFIG_PATH_MAX 1024

typedef struct config {
    /* ---- model (MODEL.md) ---- */
    char size[32];              /* preset: small base large moe-1b moe-2b tiny */
    int n_layer;
    int n_embd;                 /* d */
    int n_head;                 /* H */
    int vocab_size;             /* V */
    int block_size;             /* T */
    int swa_layers_per_cycle;   /* GDN blocks per cycle (seed's name) */
    int mla_layers_per_cycle;
    int deltanet_latent_dim;    /* 0 = off */
    int deltanet_share_qk;      /* bool */
    int mla_q_lora_rank;        /* 0 = off */
    int mla_kv_lora_rank;
    int mla_qk_nope_head_dim;
    int mla_qk_rope_head_dim;
    int mla_v_head_dim;
    float rope_theta;
    int use_moe;                /* bool */
    int use_latent_moe;         /* bool */
    int latent_ratio;
    int latent_dim;             /* 0 = n_embd / latent_ratio */
    int n_experts;              /* base count (routed E = n_experts * latent_ratio for LatentMoE) */
    int n_activated;            /* base top-k (k = n_activated * latent_ratio for LatentMoE) */
    int n_routed_experts;       /* 0 = derived as above; explicit override of E */
    int n_activated_experts;    /* 0 = derived as above; explicit override of k */
    int n_shared_experts;
    int expert_dim;
    int latent_preserve_expert_dim; /* bool */
    float router_z_loss_coef;   /* 0.001 */
    float router_bias_update_rate; /* gamma, 0.001 */

    /* ---- training ---- */
    int batch_size;             /* B, micro-batch per rank */
    int gradient_accumulation_steps;
    int max_iters;
    int warmup_iters;
    float learning_rate;
    float min_lr;
    float weight_decay;
    float grad_clip;
    char optimizer_type[16];    /* "muon" or "adamw" */
    int log_interval;
    uint64_t seed;
    char data[CONFIG_PATH_MAX];       /* training data file */
    char output_dir[CONFIG_PATH_MAX];
    char device[8];             /* "auto", "cpu" or "cuda" */
    int gradient_checkpointing; /* bool */
    int skip_nonfinite;         /* bool */
    int threads;                /* OpenMP threads for the CPU backend, 0 = default */
    int ep;                     /* expert-parallel ranks per group of routed experts (1 = none) */
    int zero;                   /* 1: shard optimizer state over the data-parallel ranks (ZeRO-1) */
    int bucket_mb;              /* gradient-reduction bucket size, MiB */
    int comm_timing;            /* bool: time collectives (synchronising) and log the split */
    int cuda_graph;             /* bool: forward and backward through backend graph_run (CUDA graphs) */
    int doc_mask;               /* bool: attention, GDN state, convs and RoPE restart per document */
    char val_data[CONFIG_PATH_MAX];   /* validation data, or "" */
    float val_fraction;         /* hold out this fraction of --data's rows when no --val_data */
    int eval_interval;          /* steps between validation passes, 0 = never */
    int eval_iters;             /* batches per validation pass */
    char resume[CONFIG_PATH_MAX];     /* "" = latest in output_dir if present; "none"; or a file */
    int checkpoint_interval;    /* steps between checkpoints, 0 = only at the end and on signals */
    int keep_checkpoints;       /* newest checkpoints kept, 0 = all */

    /* ---- derived (config_finish) ---- */
    int head_dim;               /* GDN hk = n_embd / n_head (integer division) */
    int gdn_proj_dim;           /* P = n_head * head_dim */
    int moe_E;                  /* routed experts per MoE layer */
    int moe_k;                  /* experts per token */
    int moe_latent;             /* l (LatentMoE) */
    int moe_hidden;             /* routed expert hidden h */
    int moe_in;                 /* routed expert input/output width: l (LatentMoE) or n_embd */
} config;

/* Fill with the seed's CLI defaults: the moe-1b shape, except that the preset's
 * n_activated 2 is never applied (the CLI default 3 wins, MODEL.md section 10). */
void config_defaults(config *c);

/* Parse argv (after the subcommand) into c: defaults, then the --size preset, then every
 * flag in order. Unknown flags, malformed values and impossible shapes end the program
 * through die() with one line naming the problem. --help prints the table and exits 0.
 * Calls config_finish. */
void config_parse(config *c, int argc, char **argv);

/* Compute the derived fields and validate; die() with a clear line on a bad config. */
void config_finish(config *c);

/* The kv LoRA rank of layer i (MODEL.md section 4). */
int config_kv_rank(const config *c, int layer);

/* 1 if layer i is a GDN block, 0 if MLA (MODEL.md section 1). */
int config_is_gdn(const config *c, int layer);

/* Print "name = value" for every option and derived field (info and train start-up). */
void config_print(const config *c, FILE *f);

/* Write the whole config as one JSON object (field names as keys). */
void config_json(const config *c, FILE *f);

/* Print the option table as --help text. */
void config_help(FILE *f);

#endif
