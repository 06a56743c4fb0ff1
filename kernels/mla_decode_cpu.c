/* Paged MLA decode attention on CPU, reading the latent cache in place (mla_decode_cpu.py builds, launches it).

   q [B, H, W] (W = Lkv + R: latent query, then rope query), kv_cache [num_blocks, block_size, W],
   block_tables [B, max_blocks] int32, seq_lens [B] int32 (each >= 1) -> out [B, H, Lkv]; all fp32, contiguous.

   One pass per sequence over its blocks with flash-decoding's online softmax: a block's rows are read from
   memory once and used for the scores and the output while they sit in L1, where the torch kernels first
   gather every row into a workspace. Scores come from 4-head x 4-row register tiles, the output from 8-head
   accumulators over 16-float column chunks (scalar loops for widths past the last whole chunk); the compiler
   turns the vector types into the host's widest SIMD. */

#include <math.h>
#include <stdint.h>
#include <string.h>

#define VL 16
#define HEAD_TILE 4
#define ROW_TILE 4
#define OUT_HEADS 8

typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef float vfu __attribute__((vector_size(VL * sizeof(float)), aligned(4)));

static inline vf loadu(const float* p) { return *(const vfu*)p; }
static inline void storeu(float* p, vf v) { *(vfu*)p = v; }

static inline float hsum(vf v) {
    float s = 0.f;
    for (int i = 0; i < VL; ++i) s += v[i];
    return s;
}

typedef struct {
    const float* q;
    const float* kv_cache;
    const int32_t* block_tables;
    const int32_t* seq_lens;
    float* out;
    int64_t num_heads, kv_lora, width, block_size, max_blocks;
    float scale;
} Problem;

/* Tail columns past the last whole vector (widths that are not a multiple of VL). */
static inline float dot_tail(const float* a, const float* b, int64_t from, int64_t to) {
    float s = 0.f;
    for (int64_t c = from; c < to; ++c) s += a[c] * b[c];
    return s;
}

/* s[h * ld + t] = scale * q[h] . rows[t], the full 4 x 4 tile with its accumulators in registers. */
static inline void score_tile_full(const float* q, const float* rows, int64_t width, float* s, int64_t ld,
                                   float scale) {
    const int64_t vec_width = width - width % VL;
    vf acc[HEAD_TILE][ROW_TILE] = {{{0}}};
    for (int64_t c = 0; c < vec_width; c += VL) {
        vf r0 = loadu(rows + c), r1 = loadu(rows + width + c), r2 = loadu(rows + 2 * width + c),
           r3 = loadu(rows + 3 * width + c);
        for (int h = 0; h < HEAD_TILE; ++h) {
            vf qv = loadu(q + h * width + c);
            acc[h][0] += qv * r0;
            acc[h][1] += qv * r1;
            acc[h][2] += qv * r2;
            acc[h][3] += qv * r3;
        }
    }
    for (int h = 0; h < HEAD_TILE; ++h)
        for (int t = 0; t < ROW_TILE; ++t) s[h * ld + t] = hsum(acc[h][t]);
    if (vec_width != width)
        for (int h = 0; h < HEAD_TILE; ++h)
            for (int t = 0; t < ROW_TILE; ++t)
                s[h * ld + t] += dot_tail(q + h * width, rows + t * width, vec_width, width);
    for (int h = 0; h < HEAD_TILE; ++h)
        for (int t = 0; t < ROW_TILE; ++t) s[h * ld + t] *= scale;
}

/* The same for a partial tile (nh heads, nt rows) at a block's or the head count's edge. */
static inline void score_tile_part(const float* q, int64_t nh, const float* rows, int64_t nt, int64_t width,
                                   float* s, int64_t ld, float scale) {
    const int64_t vec_width = width - width % VL;
    vf acc[HEAD_TILE][ROW_TILE] = {{{0}}};
    for (int64_t c = 0; c < vec_width; c += VL)
        for (int64_t h = 0; h < nh; ++h) {
            vf qv = loadu(q + h * width + c);
            for (int64_t t = 0; t < nt; ++t) acc[h][t] += qv * loadu(rows + t * width + c);
        }
    for (int64_t h = 0; h < nh; ++h)
        for (int64_t t = 0; t < nt; ++t)
            s[h * ld + t] = (hsum(acc[h][t]) + dot_tail(q + h * width, rows + t * width, vec_width, width)) * scale;
}

static void block_scores(const Problem* p, const float* qb, const float* blk, int64_t nb, float* s) {
    for (int64_t t = 0; t < nb; t += ROW_TILE)
        for (int64_t h = 0; h < p->num_heads; h += HEAD_TILE) {
            int64_t nh = p->num_heads - h < HEAD_TILE ? p->num_heads - h : HEAD_TILE;
            int64_t nt = nb - t < ROW_TILE ? nb - t : ROW_TILE;
            float* tile = s + h * p->block_size + t;
            if (nh == HEAD_TILE && nt == ROW_TILE)
                score_tile_full(qb + h * p->width, blk + t * p->width, p->width, tile, p->block_size, p->scale);
            else
                score_tile_part(qb + h * p->width, nh, blk + t * p->width, nt, p->width, tile, p->block_size,
                                p->scale);
        }
}

/* Scores -> probabilities against the running max m; the output and the running sum l are rescaled when
   the max moves. The first block sets m (no infinities: the library is built with finite math). */
static void online_softmax(const Problem* p, int64_t nb, int is_first, float* s, float* m, float* l, float* ob) {
    for (int64_t h = 0; h < p->num_heads; ++h) {
        float* sh = s + h * p->block_size;
        float mx = is_first ? sh[0] : m[h];
        for (int64_t t = 0; t < nb; ++t) mx = sh[t] > mx ? sh[t] : mx;
        float sum = 0.f;
        for (int64_t t = 0; t < nb; ++t) {
            sh[t] = expf(sh[t] - mx);
            sum += sh[t];
        }
        if (is_first) {
            l[h] = sum;
        } else {
            if (mx != m[h]) {
                float alpha = expf(m[h] - mx);
                float* oh = ob + h * p->kv_lora;
                for (int64_t c = 0; c < p->kv_lora; ++c) oh[c] *= alpha;
                l[h] *= alpha;
            }
            l[h] += sum;
        }
        m[h] = mx;
    }
}

/* ob[h] += sum_t s[h, t] * blk[t, :Lkv], OUT_HEADS heads per pass over the block's column chunks. */
static void block_output(const Problem* p, const float* blk, int64_t nb, const float* s, float* ob) {
    for (int64_t h0 = 0; h0 < p->num_heads; h0 += OUT_HEADS) {
        int64_t nh = p->num_heads - h0 < OUT_HEADS ? p->num_heads - h0 : OUT_HEADS;
        const float* sp = s + h0 * p->block_size;
        float* op = ob + h0 * p->kv_lora;
        const int64_t vec_lora = p->kv_lora - p->kv_lora % VL;
        for (int64_t c = 0; c < vec_lora; c += VL) {
            vf acc[OUT_HEADS];
            for (int64_t h = 0; h < nh; ++h) acc[h] = loadu(op + h * p->kv_lora + c);
            if (nh == OUT_HEADS) {
                for (int64_t t = 0; t < nb; ++t) {
                    vf r = loadu(blk + t * p->width + c);
                    for (int h = 0; h < OUT_HEADS; ++h) acc[h] += sp[h * p->block_size + t] * r;
                }
            } else {
                for (int64_t t = 0; t < nb; ++t) {
                    vf r = loadu(blk + t * p->width + c);
                    for (int64_t h = 0; h < nh; ++h) acc[h] += sp[h * p->block_size + t] * r;
                }
            }
            for (int64_t h = 0; h < nh; ++h) storeu(op + h * p->kv_lora + c, acc[h]);
        }
        for (int64_t h = 0; h < nh; ++h)
            for (int64_t t = 0; t < nb; ++t)
                for (int64_t c = vec_lora; c < p->kv_lora; ++c)
                    op[h * p->kv_lora + c] += sp[h * p->block_size + t] * blk[t * p->width + c];
    }
}

/* scratch: s [H, block_size], then m [H] and l [H]. */
static void decode_sequence(const Problem* p, int64_t b, float* scratch) {
    float* s = scratch;
    float* m = s + p->num_heads * p->block_size;
    float* l = m + p->num_heads;
    const float* qb = p->q + b * p->num_heads * p->width;
    float* ob = p->out + b * p->num_heads * p->kv_lora;
    const int32_t* table = p->block_tables + b * p->max_blocks;
    int64_t len = p->seq_lens[b];
    memset(ob, 0, sizeof(float) * p->num_heads * p->kv_lora);
    for (int64_t t0 = 0; t0 < len; t0 += p->block_size) {
        const float* blk = p->kv_cache + (int64_t)table[t0 / p->block_size] * p->block_size * p->width;
        int64_t nb = len - t0 < p->block_size ? len - t0 : p->block_size;
        block_scores(p, qb, blk, nb, s);
        online_softmax(p, nb, t0 == 0, s, m, l, ob);
        block_output(p, blk, nb, s, ob);
    }
    for (int64_t h = 0; h < p->num_heads; ++h) {
        float inv = 1.f / l[h];
        float* oh = ob + h * p->kv_lora;
        for (int64_t c = 0; c < p->kv_lora; ++c) oh[c] *= inv;
    }
}

/* Sequences shared out over num_threads threads of torch's own OpenMP pool (the library is linked against
   the runtime torch loaded; built without OpenMP, the pragma is ignored and one thread runs them all). */
void mla_decode_paged(const float* q, const float* kv_cache, const int32_t* block_tables, const int32_t* seq_lens,
                      float* out, int64_t batch, int64_t num_heads, int64_t kv_lora, int64_t rope,
                      int64_t block_size, int64_t max_blocks, float scale, int64_t num_threads) {
    Problem problem = {q, kv_cache, block_tables, seq_lens, out, num_heads, kv_lora, kv_lora + rope, block_size,
                       max_blocks, scale};
    if (num_threads > batch) num_threads = batch;
    if (num_threads < 1) num_threads = 1;
#pragma omp parallel num_threads(num_threads)
    {
        float scratch[num_heads * (block_size + 2)];  /* s [H, block_size], m [H], l [H]; bounded by the launcher */
#pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < batch; ++b) decode_sequence(&problem, b, scratch);
    }
}
