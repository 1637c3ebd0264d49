// kiln CUDA kernels: RMSNorm of each row times the norm weight, as cpu.rs `rms_norm`: the squares
// in f32, summed in f64, the mean rounded to f32, scale = 1/sqrt(mean + eps) in f32.

// One block of KILN_BLOCK threads per row; y may not alias x.
extern "C" __global__ void rms_norm_f32(const float* x, const float* w, float* y, unsigned int cols,
                                        float eps) {
    __shared__ double part[KILN_BLOCK];
    const float* xr = x + (unsigned long long)blockIdx.x * cols;
    float* yr = y + (unsigned long long)blockIdx.x * cols;
    double s = 0.0;
    for (unsigned int c = threadIdx.x; c < cols; c += KILN_BLOCK) {
        const float v = xr[c];
        s = s + (double)(v * v);
    }
    const double sum = kiln_block_sum(s, part);
    const float mean = __double2float_rn(sum / (double)cols);
    const float scale = 1.0f / sqrtf(mean + eps);
    for (unsigned int c = threadIdx.x; c < cols; c += KILN_BLOCK) {
        yr[c] = xr[c] * scale * w[c];
    }
}
