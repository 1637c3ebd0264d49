// kiln CUDA kernels: normal-mode RoPE in place (adjacent pairs), as cpu.rs `rope`: per position the
// angles are ggml_rope_cache_init's (theta multiplied up by theta_scale in f32, times freq_scale),
// each pair rotated with the CPU's fused multiply-adds.

// One block per row (row i is at position pos0 + i); dynamic shared memory of n_rot floats holds
// the row's cos/sin pairs. theta_scale = freq_base^(-2/n_rot) comes from the host (Rust powf).
extern "C" __global__ void rope_f32(float* x, unsigned int cols, unsigned int n_head,
                                    unsigned int head_dim, unsigned int n_rot, unsigned int pos0,
                                    float freq_scale, float theta_scale) {
    extern __shared__ float cs[];
    const unsigned int half = n_rot / 2;
    const unsigned int row = blockIdx.x;
    for (unsigned int k = threadIdx.x; k < half; k += blockDim.x) {
        float theta = (float)(pos0 + row);
        for (unsigned int j = 0; j < k; j++) theta = theta * theta_scale;
        const double th = (double)(freq_scale * theta);
        // libm's cosf/sinf (correctly rounded but for the rarest cases): double, rounded once
        cs[2 * k] = __double2float_rn(cos(th));
        cs[2 * k + 1] = __double2float_rn(sin(th));
    }
    __syncthreads();
    float* xr = x + (unsigned long long)row * cols;
    for (unsigned int p = threadIdx.x; p < n_head * half; p += blockDim.x) {
        const unsigned int h = p / half;
        const unsigned int k = p - h * half;
        float* q = xr + h * head_dim + 2 * k;
        const float x0 = q[0];
        const float x1 = q[1];
        const float c = cs[2 * k];
        const float s = cs[2 * k + 1];
        q[0] = __fmaf_rn(x0, c, -(x1 * s));
        q[1] = __fmaf_rn(x0, s, x1 * c);
    }
}
