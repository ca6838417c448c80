/* ckpt_export.c: `deltamla ckpt export`: a checkpoint into a folder a Hugging Face user can
 * upload as it is: model.safetensors under the PyTorch reference's names and layouts (F32),
 * config.json, tokenizer.json and a README.md model card.
 */
#define _POSIX_C_SOURCE 200809L
#include "ckpt_tool_internal.h"

#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <hdf5.h>

#include "checkpoint.h"
#include "safetensors.h"
#include "tokenizer.h"
#include "util.h"

/* ---- export ---- */

static int dir_is_empty(const char *path)
{
    DIR *d = opendir(path);
    if (!d) die("cannot read %s: %s", path, strerror(errno));
    struct dirent *e;
    int empty = 1;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) empty = 0;
    closedir(d);
    return empty;
}

/* Refuse an unusable export folder before any work; it is created only once the
 * checkpoint has been read, so a refused export leaves nothing behind. */
static void check_folder(const char *out, int force)
{
    struct stat st;
    if (stat(out, &st) == 0) {
        if (!S_ISDIR(st.st_mode)) die("--out %s exists and is not a directory", out);
        if (!force && !dir_is_empty(out))
            die("--out %s exists and is not empty (pass --force to write into it)", out);
    } else if (errno != ENOENT) {
        die("cannot use --out %s: %s", out, strerror(errno));
    }
}

static char *model_card(const ckpt_weights *w, const char *source, int with_tokenizer)
{
    const config *c = &w->cfg;
    int64_t total, active;
    params_count(&w->table, &total, &active);
    char ta[32], tb[32];
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f) die("out of host memory writing the model card");
    int gdn = ckpt_n_gdn_layers(c);
    /* the front matter is what the Hugging Face hub reads to classify a model */
    fprintf(f, "---\nlibrary_name: deltamla\ntags:\n- deltamla\n- gated-deltanet\n- multi-head-latent-attention\n%s---\n\n",
            c->use_moe ? "- mixture-of-experts\n" : "");
    fprintf(f,
            "# deltamla %s model, step %lld\n\n"
            "A hybrid Gated DeltaNet / Multi-head Latent Attention language model trained with\n"
            "deltamla and exported by `deltamla ckpt export` from `%s`.\n\n"
            "%d layers (%d Gated DeltaNet, %d MLA), width %d, %d heads, vocabulary %d, context %d;\n"
            "%s parameters in total, %s active per token.\n\n",
            c->size, (long long)w->step, source, c->n_layer, gdn, c->n_layer - gdn, c->n_embd, c->n_head,
            c->vocab_size, c->block_size, ckpt_grouped(total, ta, sizeof ta), ckpt_grouped(active, tb, sizeof tb));
    fprintf(f,
            "## Files\n\n"
            "| file | what it holds |\n|---|---|\n"
            "| `model.safetensors` | every parameter in float32 under the PyTorch reference's names and "
            "layouts (Linear weights [out, in], routed expert stacks [E, in, out], short convolutions "
            "[P, 1, 4])%s |\n"
            "| `config.json` | deltamla's configuration of the run (every flag of `deltamla train`, and the "
            "derived shapes) |\n",
            w->n_moe ? ", and each MoE layer's router selection bias as "
                       "`transformer.h.{i}.ffn.router.expert_bias` [E]"
                     : "");
    if (with_tokenizer)
        fprintf(f, "| `tokenizer.json` | deltamla's tokenizer (its own JSON format, not the Hugging Face "
                   "`tokenizers` one) |\n");
    fprintf(f,
            "\n`lm_head.weight` is not in the file: the output head is tied to the embedding, so it\n"
            "is `transformer.wte.weight`. Load with `strict=False` (or tie the head after loading);\n"
            "the routers' monitoring buffers `load_history` and `update_count` are not stored either.\n\n"
            "```python\n"
            "from safetensors.torch import load_file\n"
            "state = load_file(\"model.safetensors\")\n"
            "state[\"lm_head.weight\"] = state[\"transformer.wte.weight\"]\n"
            "model.load_state_dict(state, strict=False)\n"
            "```\n\n"
            "To continue training with deltamla: `deltamla ckpt import model.safetensors --config config.json "
            "--out DIR%s`, then `deltamla train --output_dir DIR ...`.\n",
            with_tokenizer ? " --tokenizer tokenizer.json" : "");
    fclose(f);
    return text;
}

int ckpt_cmd_export(const ckpt_args *a)
{
    char *path = ckpt_resolve_checkpoint(a->input);
    /* read_weights checks the checksum of every dataset it reads (the weights and
     * router biases) and dies naming a damaged one; the optimizer state, which export
     * leaves behind, is not read at all */
    check_folder(a->out, a->force);
    ckpt_weights w;
    ckpt_read_weights(path, &w);
    ckpt_make_dirs(a->out);

    const config *c = &w.cfg;
    st_writer sw = {0};
    char (*bias_names)[96] = xmalloc((size_t)(w.n_moe + 1) * sizeof *bias_names);
    int64_t E = c->moe_E;
    int slot = 0;
    /* Each router's selection bias goes right after its gate, where a PyTorch
     * state_dict has it; slots are the MoE layers in layer order, as in the trainer. */
    for (int i = 0; i < w.table.count; i++) {
        const param_info *p = &w.table.items[i];
        st_add(&sw, p->name, ST_F32, p->ndim, p->shape, w.params + p->offset);
        const char *gate = strstr(p->name, ".ffn.router.gate.weight");
        if (gate && gate[strlen(".ffn.router.gate.weight")] == '\0') {
            fatal_check(slot < w.n_moe);
            snprintf(bias_names[slot], sizeof bias_names[slot], "%.*s.ffn.router.expert_bias", (int)(gate - p->name),
                     p->name);
            st_add(&sw, bias_names[slot], ST_F32, 1, &E, w.router_bias + (size_t)slot * (size_t)E);
            slot++;
        }
    }
    fatal_check(slot == w.n_moe);
    char file[4096];
    snprintf(file, sizeof file, "%s/model.safetensors", a->out);
    st_write(&sw, file);

    char *json = ckpt_config_json_text(c);
    snprintf(file, sizeof file, "%s/config.json", a->out);
    ckpt_write_file(file, json);
    free(json);

    snprintf(file, sizeof file, "%s/tokenizer.json", a->out);
    if (w.tokenizer_json) {
        ckpt_write_file(file, w.tokenizer_json);
    } else if (remove(file) != 0 && errno != ENOENT) {
        /* a stale tokenizer from an earlier --force export would describe another run */
        die("cannot remove the stale %s: %s", file, strerror(errno));
    }

    /* the card names the checkpoint file, not the local directories above it */
    const char *base = strrchr(path, '/');
    char *card = model_card(&w, base ? base + 1 : path, w.tokenizer_json != NULL);
    snprintf(file, sizeof file, "%s/README.md", a->out);
    ckpt_write_file(file, card);
    free(card);

    printf("exported %s (step %lld) to %s: model.safetensors (%d tensors), config.json%s, README.md\n", path,
           (long long)w.step, a->out, w.table.count + w.n_moe, w.tokenizer_json ? ", tokenizer.json" : "");
    free(bias_names);
    ckpt_weights_free(&w);
    free(path);
    return 0;
}
