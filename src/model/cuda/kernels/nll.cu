// kiln CUDA kernels: per-token negative log-likelihood from a row of logits, as perplexity.rs
// `nll` (perplexity.cpp's log_softmax): f32 max, f64 sum of expf of the f32 differences, log in
// f64. Only the per-token values leave the device.

// One block of KILN_BLOCK threads per row of n_vocab logits; out[r] = -log softmax(row r)[targets[r]]
// (infinity for a target outside the vocabulary, as on the CPU).
extern "C" __global__ void nll_f32(const float* logits, const unsigned int* targets, double* out,
                                   unsigned int n_vocab) {
    __shared__ float pmax[KILN_BLOCK];
    __shared__ double psum[KILN_BLOCK];
    const float* l = logits + (unsigned long long)blockIdx.x * n_vocab;
    float m = -KILN_INF;
    for (unsigned int c = threadIdx.x; c < n_vocab; c += KILN_BLOCK) m = fmaxf(m, l[c]);
    const float max = kiln_block_max(m, pmax);
    double s = 0.0;
    for (unsigned int c = threadIdx.x; c < n_vocab; c += KILN_BLOCK) {
        s = s + (double)kiln_expf(l[c] - max);
    }
    const double sum = kiln_block_sum(s, psum);
    if (threadIdx.x == 0) {
        const unsigned int t = targets[blockIdx.x];
        const float lt = t < n_vocab ? l[t] : -KILN_INF;
        out[blockIdx.x] = -((double)(lt - max) - log(sum));
    }
}
