// The llama.cpp reference runner behind tests/fixtures/greedy_long.jsonl and the ggml numerics'
// op-by-op checks (build with build.sh). It drives the library as llama.cpp's server drives one
// slot: 2 threads, n_batch 2048, n_ubatch 512, flash attention "auto" (on for the CPU).
//
//   refdump MODEL PROMPTS LOGITS [PROMPT STEP TENSORS]
//       PROMPTS: one line per prompt, "N_GEN id id ...". Each prompt is decoded in one call
//       (llama.cpp cuts it into micro-batches), then N_GEN greedy tokens one per call; the
//       generated ids go to stdout, one line per prompt, and every step's logits (f32,
//       n_vocab each) to LOGITS. With PROMPT and STEP, every f32 tensor the graph computes in
//       that prompt's step (0 = the prompt) goes to TENSORS: a 64-byte name, ne[4] as int64,
//       then the values.
//   MODE=A refdump MODEL IDS LOGITS     the ids (whitespace-separated) as one batch, logits of
//                                       every position
//   MODE=B refdump MODEL IDS LOGITS     the same, one token per call
//   MODE=T refdump MODEL - -            pp512 and tg128 speed, three times
#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

static FILE * g_tensors = nullptr;
static int    g_dump_step = -1;
static int    g_step      = 0;

static bool on_tensor(ggml_tensor * t, bool ask, void *) {
    if (ask) {
        return g_tensors != nullptr && g_step == g_dump_step;
    }
    if (t->type != GGML_TYPE_F32 || !ggml_is_contiguous(t)) {
        return true;
    }
    const size_t       n = ggml_nelements(t);
    std::vector<float> buf(n);
    ggml_backend_tensor_get(t, buf.data(), 0, n * sizeof(float));
    char name[64] = { 0 };
    strncpy(name, t->name, 63);
    fwrite(name, 1, 64, g_tensors);
    const int64_t ne[4] = { t->ne[0], t->ne[1], t->ne[2], t->ne[3] };
    fwrite(ne, sizeof(int64_t), 4, g_tensors);
    fwrite(buf.data(), sizeof(float), n, g_tensors);
    return true;
}

static int argmax(const float * x, int n) {
    int best = 0;
    for (int i = 1; i < n; ++i) {
        if (x[i] > x[best]) {
            best = i;
        }
    }
    return best;
}

static std::vector<llama_token> read_ids(const char * path) {
    std::ifstream            in(path);
    std::vector<llama_token> ids;
    int                      x;
    while (in >> x) {
        ids.push_back(x);
    }
    return ids;
}

int main(int argc, char ** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: refdump MODEL PROMPTS LOGITS [PROMPT STEP TENSORS]\n");
        return 1;
    }
    const int dump_prompt = argc > 6 ? atoi(argv[4]) : -1;
    if (argc > 6) {
        g_dump_step = atoi(argv[5]);
    }
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) {
        return 1;
    }
    const llama_vocab * vocab   = llama_model_get_vocab(model);
    const int           n_vocab = llama_vocab_n_tokens(vocab);
    auto                cp      = llama_context_default_params();
    cp.n_ctx                    = 4096;
    cp.n_batch                  = 2048;
    cp.n_ubatch                 = 512;
    cp.n_threads                = 2;
    cp.n_threads_batch          = 2;
    cp.cb_eval                  = on_tensor;
    cp.flash_attn_type          = LLAMA_FLASH_ATTN_TYPE_AUTO;
    llama_context * ctx         = llama_init_from_model(model, cp);
    llama_memory_t  mem         = llama_get_memory(ctx);

    const char * mode = getenv("MODE");
    if (mode && mode[0] == 'T') {
        std::vector<llama_token> ids(512);
        for (int i = 0; i < 512; ++i) {
            ids[i] = 100 + (i * 7919) % 40000;
        }
        for (int rep = 0; rep < 3; ++rep) {
            llama_memory_clear(mem, true);
            auto t0 = std::chrono::steady_clock::now();
            if (llama_decode(ctx, llama_batch_get_one(ids.data(), 512))) {
                return 1;
            }
            auto t1 = std::chrono::steady_clock::now();
            llama_memory_clear(mem, true);
            llama_token t  = 1;
            auto        t2 = std::chrono::steady_clock::now();
            for (int i = 0; i < 128; ++i) {
                if (llama_decode(ctx, llama_batch_get_one(&t, 1))) {
                    return 1;
                }
                t = 100 + i;
            }
            auto t3 = std::chrono::steady_clock::now();
            printf("pp512 %.1f tok/s  tg128 %.1f tok/s\n", 512 / std::chrono::duration<double>(t1 - t0).count(),
                   128 / std::chrono::duration<double>(t3 - t2).count());
        }
        return 0;
    }
    if (mode && (mode[0] == 'A' || mode[0] == 'B')) {
        std::vector<llama_token> ids = read_ids(argv[2]);
        FILE *                   out = fopen(argv[3], "wb");
        llama_memory_clear(mem, true);
        if (mode[0] == 'A') {
            llama_batch b = llama_batch_init(ids.size(), 0, 1);
            for (size_t i = 0; i < ids.size(); ++i) {
                b.token[i]     = ids[i];
                b.pos[i]       = i;
                b.n_seq_id[i]  = 1;
                b.seq_id[i][0] = 0;
                b.logits[i]    = 1;
            }
            b.n_tokens = ids.size();
            if (llama_decode(ctx, b)) {
                return 1;
            }
            for (size_t i = 0; i < ids.size(); ++i) {
                fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, out);
            }
        } else {
            for (size_t i = 0; i < ids.size(); ++i) {
                llama_token t = ids[i];
                if (llama_decode(ctx, llama_batch_get_one(&t, 1))) {
                    return 1;
                }
                fwrite(llama_get_logits_ith(ctx, -1), sizeof(float), n_vocab, out);
            }
        }
        fclose(out);
        return 0;
    }

    FILE *        out = fopen(argv[3], "wb");
    std::ifstream in(argv[2]);
    std::string   line;
    for (int pi = 0; std::getline(in, line); ++pi) {
        std::istringstream       ss(line);
        int                      n_gen = 0;
        std::vector<llama_token> ids;
        ss >> n_gen;
        for (int x; ss >> x;) {
            ids.push_back(x);
        }
        llama_memory_clear(mem, true);
        g_tensors = pi == dump_prompt ? fopen(argv[6], "wb") : nullptr;
        g_step    = 0;
        if (llama_decode(ctx, llama_batch_get_one(ids.data(), ids.size()))) {
            return 1;
        }
        printf("%d:", pi);
        for (int s = 0; s < n_gen; ++s) {
            const float * logits = llama_get_logits_ith(ctx, -1);
            fwrite(logits, sizeof(float), n_vocab, out);
            llama_token best = argmax(logits, n_vocab);
            printf(" %d", best);
            if (llama_vocab_is_eog(vocab, best) || s + 1 == n_gen) {
                break;
            }
            g_step = s + 1;
            if (llama_decode(ctx, llama_batch_get_one(&best, 1))) {
                return 1;
            }
        }
        printf("\n");
        fflush(stdout);
        if (g_tensors) {
            fclose(g_tensors);
            g_tensors = nullptr;
        }
    }
    fclose(out);
    return 0;
}
