// kvcompose: attention statistics from the running decode graph.
//
// Per micro-batch and layer the graph gets, next to the attention itself:
//   rows of q for the observing queries (get_rows, one index list per ubatch)
//   x cached K, the layer's softcap, mask rows, scale, ALiBi and sinks through
//   the same ggml_soft_max_ext the plain attention path uses, then a reduction
//   over the observing queries (pool_2d MAX or AVG along the query axis).
// Where the two reductions commute with splitting the queries over micro-batches
// (mean or sum over queries with mean over the group; max with max) the GQA group
// is reduced on the device too and the host receives [n_kv, n_head_kv] floats per
// layer. Max over queries then mean over the group (the reference default) does
// not commute: the host then receives [n_kv, n_head], accumulates per query head
// and reduces the group when the result is read.

#include "llama-kvcompose.h"
#include "kvcompose-stats-graph.h"

#include "llama-batch.h"
#include "llama-context.h"
#include "llama-graph.h"
#include "llama-hparams.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include "ggml.h"
#include "ggml-backend.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

static const char * const KVC_IDX_Q_NAME = "kvc_stats_idx_q";
static const char * const KVC_IDX_M_NAME = "kvc_stats_idx_m";

struct llama_kvcompose_stats {
    llama_kvcompose_stats_params params;
    bool enabled = false;

    int32_t n_layer   = 0;
    int32_t n_head    = 0;
    int32_t n_acc     = 0;           // heads accumulated: n_head_kv when the device reduces the group, else n_head
    int32_t n_head_kv = 0;
    int32_t n_cells   = 0;

    std::vector<float>   acc;        // [n_layer][n_acc][n_cells]: max or sum over observing queries
    std::vector<uint8_t> observed;   // [n_layer]
    int64_t n_queries = 0;
    bool    lost_ubatch = false;     // a micro-batch with observing queries could not be observed

    // batch index from which tokens of seq_id observe, for the llama_decode call in progress
    int32_t cutoff = 0;

    // the observing token indices of the micro-batch in progress
    std::vector<int32_t> obs_idx;

    std::vector<float> tmp;          // host copy of one layer's [n_kv, n_acc]

    void clear() {
        std::fill(acc.begin(), acc.end(), 0.0f);
        std::fill(observed.begin(), observed.end(), 0);
        n_queries   = 0;
        lost_ubatch = false;
    }
};

static std::mutex g_mutex;
static std::map<const llama_context *, std::unique_ptr<llama_kvcompose_stats>> g_states;

static llama_kvcompose_stats * find_state(const llama_context * ctx) {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_states.find(ctx);
    return it == g_states.end() ? nullptr : it->second.get();
}

// The KV cache whose cells the statistics index: the plain cache, or the base
// (full-attention) cache of a sliding-window model.
static const llama_kv_cache * stats_cache(const llama_context * ctx) {
    llama_memory_i * mem = ctx->get_memory();
    if (mem == nullptr) {
        return nullptr;
    }
    if (auto * kv = dynamic_cast<const llama_kv_cache *>(mem)) {
        return kv;
    }
    if (auto * iswa = dynamic_cast<const llama_kv_cache_iswa *>(mem)) {
        return iswa->get_base();
    }
    return nullptr;
}

// Whether the group reduction may run on the device before accumulation across micro-batches.
static bool group_on_device(int32_t query_reduce, int32_t head_reduce) {
    const bool q_max = query_reduce == LLAMA_KVCOMPOSE_STATS_QUERY_MAX;
    const bool h_max = head_reduce  == LLAMA_KVCOMPOSE_STATS_HEAD_MAX;
    return q_max == h_max;
}

static bool layer_is_observable(const llama_hparams & hparams, int il) {
    return !(hparams.swa_type != LLAMA_SWA_TYPE_NONE && hparams.is_swa(il));
}

//
// internal hooks
//

// The tokens of ubatch that observe: those of seq_id at batch index >= cutoff.
static void observing_tokens(const llama_kvcompose_stats & st, const llama_ubatch & ubatch, std::vector<int32_t> & out) {
    out.clear();
    if (!ubatch.data || ubatch.data->batch_idxs.size() != ubatch.n_tokens) {
        return; // a reserve ubatch, not a batch of llama_decode
    }
    for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
        if (ubatch.data->batch_idxs[i] < st.cutoff) {
            continue;
        }
        for (int32_t s = 0; s < ubatch.n_seq_id[i]; ++s) {
            if (ubatch.seq_id[i][s] == st.params.seq_id) {
                out.push_back((int32_t) i);
                break;
            }
        }
    }
}

// First batch index of the last n_last tokens of seq_id in the batch.
static int32_t batch_cutoff(const llama_batch & batch, llama_seq_id seq_id, int32_t n_last) {
    if (n_last < 0) {
        return 0;
    }
    int32_t seen = 0;
    for (int32_t j = batch.n_tokens - 1; j >= 0; --j) {
        const int32_t n_seq = batch.n_seq_id ? batch.n_seq_id[j] : 1;
        for (int32_t s = 0; s < n_seq; ++s) {
            const llama_seq_id sid = batch.seq_id ? batch.seq_id[j][s] : 0;
            if (sid == seq_id) {
                if (++seen == n_last) {
                    return j;
                }
                break;
            }
        }
    }
    return 0;
}

llama_kvcompose_stats_plan llama_kvcompose_stats_plan_ubatch(
        const llama_context      & lctx,
        const llama_batch_allocr & balloc,
        const llama_ubatch       & ubatch) {
    llama_kvcompose_stats_plan plan;
    llama_kvcompose_stats * st = find_state(&lctx);
    if (st == nullptr || !st->enabled) {
        return plan;
    }
    st->cutoff = batch_cutoff(balloc.get_batch(), st->params.seq_id, st->params.n_last);
    observing_tokens(*st, ubatch, st->obs_idx);
    if (st->obs_idx.empty()) {
        return plan;
    }
    const bool several_streams = !lctx.get_cparams().kv_unified && ubatch.n_seqs_unq > 1;
    if (several_streams) {
        // each stream has its own cells and mask; observing one of several is not implemented
        st->lost_ubatch = true;
        return plan;
    }
    plan.state        = st;
    plan.n_obs        = (int32_t) st->obs_idx.size();
    plan.query_reduce = st->params.query_reduce;
    plan.head_reduce  = st->params.head_reduce;
    plan.n_stream     = 1;
    return plan;
}

// Fills the row indices of the observing queries for each micro-batch.
class llm_graph_input_kvcompose_stats : public llm_graph_input_i {
public:
    llm_graph_input_kvcompose_stats(const llama_kvcompose_stats_plan & plan, ggml_tensor * idx_q, ggml_tensor * idx_m)
        : plan(plan), idx_q(idx_q), idx_m(idx_m) {}

    void set_input(const llama_ubatch * ubatch) override {
        GGML_UNUSED(ubatch);
        // the plan was made for this ubatch just before the graph was built or reused
        const auto & obs = plan.state->obs_idx;
        GGML_ASSERT((int64_t) obs.size() == idx_m->ne[0]);
        ggml_backend_tensor_set(idx_m, obs.data(), 0, ggml_nbytes(idx_m));
        std::vector<int32_t> rows((size_t) idx_q->ne[0] * idx_q->ne[1]);
        for (int64_t h = 0; h < idx_q->ne[1]; ++h) {
            std::copy(obs.begin(), obs.end(), rows.begin() + h * idx_q->ne[0]);
        }
        ggml_backend_tensor_set(idx_q, rows.data(), 0, ggml_nbytes(idx_q));
    }

    bool can_reuse(const llm_graph_params & params) override {
        return params.cparams.kvcompose_stats == plan;
    }

private:
    const llama_kvcompose_stats_plan plan;
    ggml_tensor * idx_q;
    ggml_tensor * idx_m;
};

static void stats_output_name(char * buf, size_t size, int il) {
    snprintf(buf, size, "kvc_stats-%d", il);
}

void llama_kvcompose_stats_build(
        const llama_kvcompose_stats_plan & plan,
        ggml_context         * ctx0,
        ggml_cgraph          * gf,
        llm_graph_result     * res,
        const llama_hparams  & hparams,
        bool                   is_grok,
        ggml_tensor          * q,
        ggml_tensor          * k,
        ggml_tensor          * kq_mask,
        ggml_tensor          * kq_b,
        ggml_tensor          * sinks,
        ggml_tensor          * v_mla,
        int64_t                n_kv_max,
        float                  kq_scale,
        int                    il) {
    if (plan.state == nullptr || plan.n_obs == 0) {
        return;
    }
    // layers whose scores would index other cells, or whose attention this path does not reproduce
    // (MTP/nextn layers past n_layer have no accumulator)
    if (il < 0 || (uint32_t) il >= hparams.n_layer() || !layer_is_observable(hparams, il) ||
            kq_b != nullptr || v_mla != nullptr || n_kv_max > 0 ||
            kq_mask == nullptr || k->ne[3] != 1 || q->ne[3] != 1) {
        return;
    }
    const int64_t n_head = q->ne[2];

    // one pair of index inputs per graph, shared by all layers
    ggml_tensor * idx_q = ggml_get_tensor(ctx0, KVC_IDX_Q_NAME);
    ggml_tensor * idx_m = ggml_get_tensor(ctx0, KVC_IDX_M_NAME);
    if (idx_q == nullptr) {
        idx_q = ggml_new_tensor_3d(ctx0, GGML_TYPE_I32, plan.n_obs, n_head, 1);
        idx_m = ggml_new_tensor_3d(ctx0, GGML_TYPE_I32, plan.n_obs, 1, 1);
        ggml_set_input(idx_q);
        ggml_set_input(idx_m);
        ggml_set_name(idx_q, KVC_IDX_Q_NAME);
        ggml_set_name(idx_m, KVC_IDX_M_NAME);
        res->add_input(std::make_unique<llm_graph_input_kvcompose_stats>(plan, idx_q, idx_m));
    }
    if (idx_q->ne[1] != n_head) {
        return; // begin() refuses models whose layers differ in head count; never expected here
    }

    ggml_tensor * q_obs = ggml_get_rows(ctx0, q, idx_q);            // [d, n_obs, n_head, 1]
    ggml_tensor * kq    = ggml_mul_mat(ctx0, k, q_obs);             // [n_kv, n_obs, n_head, 1]
    ggml_prec_set_acc(kq, GGML_PREC_F32);

    // the same transformations, in the same order, as the plain attention path of build_attn_mha
    if (is_grok) {
        kq = ggml_tanh(ctx0, ggml_scale(ctx0, kq, hparams.f_attn_out_scale / hparams.f_attn_logit_softcapping));
        kq = ggml_scale(ctx0, kq, hparams.f_attn_logit_softcapping);
    }
    if (hparams.attn_soft_cap) {
        kq = ggml_scale(ctx0, kq, 1.0f / hparams.f_attn_logit_softcapping);
        kq = ggml_tanh (ctx0, kq);
        kq = ggml_scale(ctx0, kq, hparams.f_attn_logit_softcapping);
    }
    ggml_tensor * mask = ggml_get_rows(ctx0, kq_mask, idx_m);      // [n_kv, n_obs, 1, 1] f32
    ggml_tensor * prob = ggml_soft_max_ext(ctx0, kq, mask, kq_scale, hparams.f_max_alibi_bias);
    ggml_soft_max_add_sinks(prob, sinks);

    // reduce along the query axis; ggml has no row-wise max over dim 1 on every backend, pool_2d is
    const ggml_op_pool op = plan.query_reduce == LLAMA_KVCOMPOSE_STATS_QUERY_MAX ? GGML_OP_POOL_MAX : GGML_OP_POOL_AVG;
    ggml_tensor * red = ggml_pool_2d(ctx0, prob, op, 1, plan.n_obs, 1, plan.n_obs, 0, 0); // [n_kv, 1, n_head, 1]

    if (group_on_device(plan.query_reduce, plan.head_reduce)) {
        // query head h belongs to KV head h / G (mul_mat's broadcast): a group is G consecutive heads
        const int64_t n_head_kv = k->ne[2];
        const int     G         = (int) (n_head / n_head_kv);
        const ggml_op_pool op_h = plan.head_reduce == LLAMA_KVCOMPOSE_STATS_HEAD_MAX ? GGML_OP_POOL_MAX : GGML_OP_POOL_AVG;
        red = ggml_reshape_4d(ctx0, red, red->ne[0], G, n_head_kv, 1);
        red = ggml_pool_2d(ctx0, red, op_h, 1, G, 1, G, 0, 0);     // [n_kv, 1, n_head_kv, 1]
    }

    char name[GGML_MAX_NAME];
    stats_output_name(name, sizeof(name), il);
    ggml_set_name(red, name);
    ggml_set_output(red);
    ggml_build_forward_expand(gf, red);
}

void llama_kvcompose_stats_collect(
        const llama_context & lctx,
        const llama_kvcompose_stats_plan & plan,
        ggml_cgraph * gf) {
    llama_kvcompose_stats * st = plan.state;
    if (st == nullptr || plan.n_obs == 0) {
        return;
    }
    ggml_backend_sched_synchronize(lctx.get_sched());

    const bool is_max = st->params.query_reduce == LLAMA_KVCOMPOSE_STATS_QUERY_MAX;
    char name[GGML_MAX_NAME];
    for (int32_t il = 0; il < st->n_layer; ++il) {
        stats_output_name(name, sizeof(name), il);
        ggml_tensor * t = ggml_graph_get_tensor(gf, name);
        if (t == nullptr) {
            continue;
        }
        const int64_t n_kv = t->ne[0];
        GGML_ASSERT(t->ne[2] == st->n_acc && n_kv <= st->n_cells && t->type == GGML_TYPE_F32);
        st->tmp.resize((size_t) n_kv * st->n_acc);
        ggml_backend_tensor_get(t, st->tmp.data(), 0, ggml_nbytes(t));

        for (int32_t h = 0; h < st->n_acc; ++h) {
            float       * dst = st->acc.data() + ((size_t) il * st->n_acc + h) * st->n_cells;
            const float * src = st->tmp.data() + (size_t) h * n_kv;
            if (is_max) {
                for (int64_t c = 0; c < n_kv; ++c) {
                    dst[c] = std::max(dst[c], src[c]);
                }
            } else {
                // the device averaged over this micro-batch's queries; keep sums
                for (int64_t c = 0; c < n_kv; ++c) {
                    dst[c] += src[c] * (float) plan.n_obs;
                }
            }
        }
        st->observed[il] = 1;
    }
    st->n_queries += plan.n_obs;
}

void llama_kvcompose_stats_release(const llama_context * lctx) {
    std::lock_guard<std::mutex> lock(g_mutex);
    g_states.erase(lctx);
}

//
// public API
//

llama_kvcompose_stats_params llama_kvcompose_stats_default_params(void) {
    llama_kvcompose_stats_params p;
    p.seq_id       = 0;
    p.n_last       = -1;
    p.query_reduce = LLAMA_KVCOMPOSE_STATS_QUERY_MAX;
    p.head_reduce  = LLAMA_KVCOMPOSE_STATS_HEAD_MEAN;
    return p;
}

int32_t llama_kvcompose_stats_begin(llama_context * ctx, const llama_kvcompose_stats_params * params) {
    if (ctx == nullptr || params == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    if (params->n_last == 0 || params->n_last < -1 ||
            params->query_reduce < LLAMA_KVCOMPOSE_STATS_QUERY_MAX || params->query_reduce > LLAMA_KVCOMPOSE_STATS_QUERY_SUM ||
            params->head_reduce  < LLAMA_KVCOMPOSE_STATS_HEAD_MEAN || params->head_reduce  > LLAMA_KVCOMPOSE_STATS_HEAD_MAX) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const llama_model & model = ctx->get_model();
    if (llama_model_has_encoder(&model)) {
        return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
    }
    const llama_kv_cache * kv = stats_cache(ctx);
    if (kv == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
    }
    if (params->seq_id < 0 || (uint32_t) params->seq_id >= kv->get_n_seq_max()) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const llama_hparams & hparams = model.hparams;
    const uint32_t n_layer = hparams.n_layer();
    for (uint32_t il = 0; il < n_layer; ++il) {
        if (hparams.n_head(il) != hparams.n_head() || hparams.n_head_kv(il) != hparams.n_head_kv()) {
            return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED; // per-layer head counts are not handled
        }
    }
    if (hparams.n_head_kv() == 0 || hparams.n_head() % hparams.n_head_kv() != 0) {
        return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
    }

    auto st = std::make_unique<llama_kvcompose_stats>();
    st->params    = *params;
    st->enabled   = true;
    st->n_layer   = (int32_t) n_layer;
    st->n_head    = (int32_t) hparams.n_head();
    st->n_head_kv = (int32_t) hparams.n_head_kv();
    st->n_cells   = (int32_t) kv->get_cells(params->seq_id).size();
    st->n_acc     = group_on_device(params->query_reduce, params->head_reduce) ? st->n_head_kv : st->n_head;
    st->acc.assign((size_t) st->n_layer * st->n_acc * st->n_cells, 0.0f);
    st->observed.assign(st->n_layer, 0);

    std::lock_guard<std::mutex> lock(g_mutex);
    g_states[ctx] = std::move(st);
    return LLAMA_KVCOMPOSE_OK;
}

int32_t llama_kvcompose_stats_set_enabled(llama_context * ctx, bool enabled) {
    llama_kvcompose_stats * st = ctx ? find_state(ctx) : nullptr;
    if (ctx == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    if (st == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_STATE;
    }
    st->enabled = enabled;
    return LLAMA_KVCOMPOSE_OK;
}

int32_t llama_kvcompose_stats_reset(llama_context * ctx) {
    if (ctx == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    llama_kvcompose_stats * st = find_state(ctx);
    if (st == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_STATE;
    }
    st->clear();
    return LLAMA_KVCOMPOSE_OK;
}

int32_t llama_kvcompose_stats_end(llama_context * ctx) {
    if (ctx == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    llama_kvcompose_stats_release(ctx);
    return LLAMA_KVCOMPOSE_OK;
}

int32_t llama_kvcompose_stats_shape(llama_context * ctx, int32_t * n_layer, int32_t * n_head_kv, int32_t * n_cells) {
    if (ctx == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const llama_kvcompose_stats * st = find_state(ctx);
    if (st == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_STATE;
    }
    if (n_layer)   { *n_layer   = st->n_layer; }
    if (n_head_kv) { *n_head_kv = st->n_head_kv; }
    if (n_cells)   { *n_cells   = st->n_cells; }
    return LLAMA_KVCOMPOSE_OK;
}

int32_t llama_kvcompose_stats_n_queries(llama_context * ctx, int64_t * n_queries) {
    if (ctx == nullptr || n_queries == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const llama_kvcompose_stats * st = find_state(ctx);
    if (st == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_STATE;
    }
    *n_queries = st->n_queries;
    return LLAMA_KVCOMPOSE_OK;
}

int32_t llama_kvcompose_stats_layers(llama_context * ctx, uint8_t * out, int32_t n_layer) {
    if (ctx == nullptr || out == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const llama_kvcompose_stats * st = find_state(ctx);
    if (st == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_STATE;
    }
    if (n_layer != st->n_layer) {
        return LLAMA_KVCOMPOSE_ERR_RANGE;
    }
    std::copy(st->observed.begin(), st->observed.end(), out);
    return LLAMA_KVCOMPOSE_OK;
}

// Combine the query heads of KV head g of layer il into out[n_cells].
static void read_kv_head(const llama_kvcompose_stats & st, int32_t il, int32_t g, float * out) {
    const int32_t G = st.n_acc / st.n_head_kv; // 1 when the device reduced the group
    const bool q_mean   = st.params.query_reduce == LLAMA_KVCOMPOSE_STATS_QUERY_MEAN;
    const float q_scale = q_mean && st.n_queries > 0 ? 1.0f / (float) st.n_queries : 1.0f;
    const bool h_max    = st.params.head_reduce == LLAMA_KVCOMPOSE_STATS_HEAD_MAX;
    const size_t n      = (size_t) st.n_cells;

    std::fill(out, out + n, 0.0f);
    for (int32_t j = 0; j < G; ++j) {
        const float * src = st.acc.data() + ((size_t) il * st.n_acc + (size_t) g * G + j) * n;
        for (size_t c = 0; c < n; ++c) {
            const float v = src[c] * q_scale;
            out[c] = h_max ? std::max(out[c], v) : out[c] + v / (float) G;
        }
    }
}

int32_t llama_kvcompose_stats_get(llama_context * ctx, int32_t il, int32_t head_kv, float * out, int32_t n_cells) {
    if (ctx == nullptr || out == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const llama_kvcompose_stats * st = find_state(ctx);
    if (st == nullptr || st->lost_ubatch) {
        return LLAMA_KVCOMPOSE_ERR_STATE;
    }
    if (il < 0 || il >= st->n_layer || head_kv < 0 || head_kv >= st->n_head_kv || n_cells != st->n_cells) {
        return LLAMA_KVCOMPOSE_ERR_RANGE;
    }
    read_kv_head(*st, il, head_kv, out);
    return LLAMA_KVCOMPOSE_OK;
}

int32_t llama_kvcompose_stats_get_all(llama_context * ctx, float * out, size_t n_out) {
    if (ctx == nullptr || out == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const llama_kvcompose_stats * st = find_state(ctx);
    if (st == nullptr || st->lost_ubatch) {
        return LLAMA_KVCOMPOSE_ERR_STATE;
    }
    if (n_out != (size_t) st->n_layer * st->n_head_kv * st->n_cells) {
        return LLAMA_KVCOMPOSE_ERR_RANGE;
    }
    for (int32_t il = 0; il < st->n_layer; ++il) {
        for (int32_t g = 0; g < st->n_head_kv; ++g) {
            read_kv_head(*st, il, g, out + ((size_t) il * st->n_head_kv + g) * st->n_cells);
        }
    }
    return LLAMA_KVCOMPOSE_OK;
}

// The cells of seq_id's stream, after validating the context and the sequence id.
static int32_t seq_stream_cells(llama_context * ctx, llama_seq_id seq_id, const llama_kv_cells ** cells) {
    const llama_kv_cache * kv = stats_cache(ctx);
    if (kv == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_UNSUPPORTED;
    }
    if (seq_id < 0 || (uint32_t) seq_id >= kv->get_n_seq_max()) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    *cells = &kv->get_cells(seq_id);
    return LLAMA_KVCOMPOSE_OK;
}

int32_t llama_kvcompose_stats_n_cells(llama_context * ctx, llama_seq_id seq_id, int32_t * n_cells) {
    if (ctx == nullptr || n_cells == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const llama_kv_cells * cells = nullptr;
    const int32_t rc = seq_stream_cells(ctx, seq_id, &cells);
    if (rc != LLAMA_KVCOMPOSE_OK) {
        return rc;
    }
    *n_cells = (int32_t) cells->size();
    return LLAMA_KVCOMPOSE_OK;
}

int32_t llama_kvcompose_stats_cell_positions(llama_context * ctx, llama_seq_id seq_id, int32_t * out, int32_t n_cells) {
    if (ctx == nullptr || out == nullptr) {
        return LLAMA_KVCOMPOSE_ERR_ARGUMENT;
    }
    const llama_kv_cells * found = nullptr;
    const int32_t rc = seq_stream_cells(ctx, seq_id, &found);
    if (rc != LLAMA_KVCOMPOSE_OK) {
        return rc;
    }
    const llama_kv_cells & cells = *found;
    if (n_cells < 0 || (uint32_t) n_cells != cells.size()) {
        return LLAMA_KVCOMPOSE_ERR_RANGE;
    }
    for (uint32_t i = 0; i < cells.size(); ++i) {
        out[i] = cells.seq_has(i, seq_id) ? cells.pos_get(i) : -1;
    }
    return LLAMA_KVCOMPOSE_OK;
}
