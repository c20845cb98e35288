// refdump: llama.cpp's reference logits for one prompt, as one JSON "case" object in the
// format of tests/fixtures/*.json (see README.md next to this file).
//
// For a prompt it prints:
//   - the prompt's tokens as llama.cpp tokenizes it (special tokens parsed, BOS only where the
//     model's metadata asks for one),
//   - llama.cpp's free-running greedy continuation (argmax, one token per llama_decode),
//   - for every position (each prompt token, then each generated token that was decoded) the
//     top-K (id, raw logit) of the row and the logsumexp of the whole row.
// The prompt is decoded in one llama_decode with every row's logits on, as llama-cpp-python's
// `logits_all=True` does; each greedy token is then decoded alone.
//
// Optionally (--dump NAME[,NAME...] --dump-dir DIR) the named graph tensors of the prompt's
// decode (e.g. "l_out-0", the output of layer 0) are written as raw little-endian f32 through the
// scheduler's eval callback, one file DIR/NAME.f32 each, ne[0] fastest; their shapes go to stderr.
//
// Determinism over speed: 2 threads by default, flash attention off (llama-cpp-python's default,
// so the non-flash f16 KV path), f16 K/V cache (llama.cpp's default).

#define _POSIX_C_SOURCE 200809L  // strdup

#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void usage(const char * argv0) {
    fprintf(stderr,
            "usage: %s -m MODEL.gguf -f PROMPT_FILE [-n N_GEN] [-t THREADS] [-k TOP_K] [--fa] [--no-extra-bufts]\n"
            "          [--n-ctx N] [--dump NAME[,NAME...] --dump-dir DIR]\n"
            "prints one JSON case object on stdout (see tools/llama-ref/README.md)\n",
            argv0);
    exit(2);
}

static char * read_file(const char * path, size_t * len) {
    FILE * f = fopen(path, "rb");
    if (!f) {
        perror(path);
        exit(1);
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char * buf = malloc((size_t) n + 1);
    if (fread(buf, 1, (size_t) n, f) != (size_t) n) {
        perror(path);
        exit(1);
    }
    buf[n] = 0;
    fclose(f);
    *len = (size_t) n;
    return buf;
}

// A JSON string literal (UTF-8 passes through; control characters are escaped).
static void json_string(FILE * out, const char * s, size_t n) {
    fputc('"', out);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char) s[i];
        switch (c) {
            case '"': fputs("\\\"", out); break;
            case '\\': fputs("\\\\", out); break;
            case '\n': fputs("\\n", out); break;
            case '\r': fputs("\\r", out); break;
            case '\t': fputs("\\t", out); break;
            default:
                if (c < 0x20) {
                    fprintf(out, "\\u%04x", c);
                } else {
                    fputc(c, out);
                }
        }
    }
    fputc('"', out);
}

// The row's top-k (id, logit), largest first (ties: the lower id first, as a stable argmax), and
// the logsumexp of the whole row in double precision.
static void row_summary(FILE * out, const float * row, int n_vocab, int k) {
    int ids[64];
    for (int j = 0; j < k; j++) {
        ids[j] = -1;
    }
    for (int i = 0; i < n_vocab; i++) {
        float v = row[i];
        int   p = k;
        while (p > 0 && (ids[p - 1] < 0 || row[ids[p - 1]] < v)) {
            p--;
        }
        if (p < k) {
            memmove(&ids[p + 1], &ids[p], sizeof(int) * (size_t) (k - p - 1));
            ids[p] = i;
        }
    }
    double m = row[ids[0]];
    double s = 0.0;
    for (int i = 0; i < n_vocab; i++) {
        s += exp((double) row[i] - m);
    }
    fputs("{\"ids\":[", out);
    for (int j = 0; j < k; j++) {
        fprintf(out, "%s%d", j ? "," : "", ids[j]);
    }
    fputs("],\"logits\":[", out);
    for (int j = 0; j < k; j++) {
        fprintf(out, "%s%.4f", j ? "," : "", row[ids[j]]);
    }
    fprintf(out, "],\"logsumexp\":%.4f}", m + log(s));
}

static int argmax(const float * row, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) {
        if (row[i] > row[best]) {
            best = i;
        }
    }
    return best;
}

struct dump_state {
    char   names[1024][GGML_MAX_NAME];
    int    n_names;
    const char * dir;
    bool   active;  // only the prompt's decode is dumped
};

static bool wanted(const struct dump_state * d, const char * name) {
    for (int i = 0; i < d->n_names; i++) {
        if (strcmp(d->names[i], name) == 0) {
            return true;
        }
    }
    return false;
}

// The scheduler's eval callback: with ask = true it says which tensors it wants to see; with
// ask = false the tensor has been computed and is written out.
static bool dump_cb(struct ggml_tensor * t, bool ask, void * user_data) {
    struct dump_state * d = user_data;
    if (!d->active || !wanted(d, t->name)) {
        return ask ? false : true;
    }
    if (ask) {
        return true;
    }
    if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t)) {
        fprintf(stderr, "dump: %s is not a contiguous f32 tensor (type %s), skipped\n", t->name,
                ggml_type_name(t->type));
        return true;
    }
    size_t  n   = (size_t) ggml_nelements(t);
    float * buf = malloc(n * sizeof(float));
    ggml_backend_tensor_get(t, buf, 0, n * sizeof(float));
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.f32", d->dir, t->name);
    FILE * f = fopen(path, "wb");
    if (!f) {
        perror(path);
        exit(1);
    }
    fwrite(buf, sizeof(float), n, f);
    fclose(f);
    free(buf);
    fprintf(stderr, "dump: %s [%lld, %lld, %lld, %lld] -> %s\n", t->name, (long long) t->ne[0],
            (long long) t->ne[1], (long long) t->ne[2], (long long) t->ne[3], path);
    return true;
}

static void quiet_log(enum ggml_log_level level, const char * text, void * user_data) {
    (void) user_data;
    if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) {
        fputs(text, stderr);
    }
}

int main(int argc, char ** argv) {
    const char * model_path  = NULL;
    const char * prompt_path = NULL;
    int          n_gen       = 24;
    int          n_threads   = 2;
    int          top_k       = 8;
    int          n_ctx_arg   = 0;
    bool         fa          = false;
    bool         extra_bufts = true;
    const char * dump_list   = NULL;
    struct dump_state dump   = { 0 };
    for (int i = 1; i < argc; i++) {
        const char * a    = argv[i];
        const char * next = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "-m") && next) {
            model_path = argv[++i];
        } else if (!strcmp(a, "-f") && next) {
            prompt_path = argv[++i];
        } else if (!strcmp(a, "-n") && next) {
            n_gen = atoi(argv[++i]);
        } else if (!strcmp(a, "-t") && next) {
            n_threads = atoi(argv[++i]);
        } else if (!strcmp(a, "-k") && next) {
            top_k = atoi(argv[++i]);
        } else if (!strcmp(a, "--n-ctx") && next) {
            n_ctx_arg = atoi(argv[++i]);
        } else if (!strcmp(a, "--fa")) {
            fa = true;
        } else if (!strcmp(a, "--no-extra-bufts")) {
            extra_bufts = false;
        } else if (!strcmp(a, "--dump") && next) {
            dump_list = argv[++i];
        } else if (!strcmp(a, "--dump-dir") && next) {
            dump.dir = argv[++i];
        } else {
            usage(argv[0]);
        }
    }
    if (!model_path || !prompt_path || top_k < 2 || top_k > 64 || n_gen < 0 || n_ctx_arg < 0 ||
        (dump_list && !dump.dir)) {
        usage(argv[0]);
    }
    if (dump_list) {
        char * list = strdup(dump_list);
        for (char * tok = strtok(list, ","); tok && dump.n_names < 1024; tok = strtok(NULL, ",")) {
            snprintf(dump.names[dump.n_names++], GGML_MAX_NAME, "%s", tok);
        }
        free(list);
    }

    size_t prompt_len;
    char * prompt = read_file(prompt_path, &prompt_len);

    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers              = 0;
    mp.use_extra_bufts           = extra_bufts;
    struct llama_model * model   = llama_model_load_from_file(model_path, mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", model_path);
        return 1;
    }
    const struct llama_vocab * vocab   = llama_model_get_vocab(model);
    const int                  n_vocab = llama_vocab_n_tokens(vocab);
    const bool                 add_bos = llama_vocab_get_add_bos(vocab);

    int           cap    = (int) prompt_len + 16;
    llama_token * tokens = malloc(sizeof(llama_token) * (size_t) (cap + n_gen));
    int n_prompt = llama_tokenize(vocab, prompt, (int32_t) prompt_len, tokens, cap, add_bos, true);
    if (n_prompt <= 0) {
        fprintf(stderr, "tokenization failed (%d)\n", n_prompt);
        return 1;
    }

    struct llama_context_params cp = llama_context_default_params();
    // One ubatch for the whole prompt, as llama-cpp-python's defaults (n_ctx = n_batch = 512) give
    // for the prompts of the fixtures.
    int n_ctx = 512;
    while (n_ctx < n_prompt + n_gen + 1) {
        n_ctx *= 2;
    }
    // --n-ctx: a context of that size instead, for models whose arithmetic depends on it (phi3
    // takes its long RoPE factors when the context exceeds the original one).
    if (n_ctx_arg > 0) {
        if (n_ctx_arg < n_prompt + n_gen + 1) {
            fprintf(stderr, "--n-ctx %d is too small for %d prompt and %d generated tokens\n",
                    n_ctx_arg, n_prompt, n_gen);
            return 1;
        }
        n_ctx = n_ctx_arg;
    }
    cp.n_ctx             = (uint32_t) n_ctx;
    cp.n_batch           = (uint32_t) (n_prompt > 512 ? n_prompt : 512);
    cp.n_ubatch          = cp.n_batch;
    cp.n_threads         = n_threads;
    cp.n_threads_batch   = n_threads;
    cp.flash_attn_type   = fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf           = true;
    if (dump.n_names) {
        cp.cb_eval           = dump_cb;
        cp.cb_eval_user_data = &dump;
    }
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }

    FILE * out = stdout;
    fputs("{\"prompt\":", out);
    json_string(out, prompt, prompt_len);
    fprintf(out, ",\"add_bos\":%s,\"prompt_tokens\":[", add_bos ? "true" : "false");
    for (int i = 0; i < n_prompt; i++) {
        fprintf(out, "%s%d", i ? "," : "", tokens[i]);
    }
    fputs("],\n\"top_logits_per_position\":[\n", out);

    // The prompt: one decode, logits for every row.
    struct llama_batch batch = llama_batch_init(n_prompt, 0, 1);
    for (int i = 0; i < n_prompt; i++) {
        batch.token[i]     = tokens[i];
        batch.pos[i]       = i;
        batch.n_seq_id[i]  = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i]    = 1;
    }
    batch.n_tokens = n_prompt;
    dump.active    = true;
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "llama_decode failed on the prompt\n");
        return 1;
    }
    dump.active = false;
    for (int i = 0; i < n_prompt; i++) {
        row_summary(out, llama_get_logits_ith(ctx, i), n_vocab, top_k);
        fputs(i + 1 < n_prompt ? ",\n" : "", out);
    }

    // Free-running greedy: each generated token is decoded alone (except an end-of-generation
    // token, which ends the continuation undecoded).
    int          n_done  = 0;
    llama_token * gen    = tokens + n_prompt;
    int          last    = n_prompt - 1;
    const float * row    = llama_get_logits_ith(ctx, last);
    while (n_done < n_gen) {
        llama_token t = argmax(row, n_vocab);
        gen[n_done++] = t;
        if (llama_vocab_is_eog(vocab, t)) {
            break;
        }
        struct llama_batch one = llama_batch_get_one(&gen[n_done - 1], 1);
        if (llama_decode(ctx, one) != 0) {
            fprintf(stderr, "llama_decode failed on generated token %d\n", n_done - 1);
            return 1;
        }
        row = llama_get_logits_ith(ctx, -1);
        fputs(",\n", out);
        row_summary(out, row, n_vocab, top_k);
    }
    fputs("\n],\n\"greedy_tokens\":[", out);
    for (int i = 0; i < n_done; i++) {
        fprintf(out, "%s%d", i ? "," : "", gen[i]);
    }
    fputs("],\"greedy_text\":", out);
    // The continuation as text (special tokens rendered), for a reader of the fixture.
    size_t text_cap = 64 * (size_t) n_done + 64;
    char * text     = malloc(text_cap);
    int n_text = llama_detokenize(vocab, gen, n_done, text, (int32_t) text_cap, false, true);
    json_string(out, text, n_text > 0 ? (size_t) n_text : 0);
    // The context llama.cpp ran with (after its rounding up to a multiple of 256).
    fprintf(out, ",\"n_ctx\":%u,\"n_vocab\":%d}\n", llama_n_ctx(ctx), n_vocab);

    free(text);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    free(tokens);
    free(prompt);
    return 0;
}
