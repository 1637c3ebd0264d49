// kiln CUDA kernels: element-wise float ops of the forward pass, the residual add and SwiGLU,
// with the arithmetic of the CPU backend (cpu.rs `add`, kiln_quant::dot::swiglu).

// ggml's vectorized expf (ggml_v_expf, one lane), as kiln_quant::dot::scalar::ggml_v_expf: a
// degree-5 polynomial on the reduced argument scaled by 2^n; 0 / infinity past |n| > 192.
__device__ __forceinline__ float kiln_ggml_v_expf(float x) {
    const float r = __uint_as_float(0x4b400000u);
    const float z = __fmaf_rn(x, __uint_as_float(0x3fb8aa3bu), r);
    const float n = z - r;
    const float b = __fmaf_rn(-n, __uint_as_float(0x35bfbe8eu),
                              __fmaf_rn(-n, __uint_as_float(0x3f317200u), x));
    const float u = b * b;
    float j = __fmaf_rn(__fmaf_rn(__uint_as_float(0x3c072010u), b, __uint_as_float(0x3d2b9f17u)), u,
                        __fmaf_rn(__uint_as_float(0x3e2aaf33u), b, __uint_as_float(0x3efffedbu)));
    j = __fmaf_rn(j, u, __fmaf_rn(__uint_as_float(0x3f7ffff6u), b, 1.0f));
    if (fabsf(n) > 192.0f) return n <= 0.0f ? 0.0f : KILN_INF;
    if (n != n || j != j) return KILN_NAN;
    // j * 2^n rounded once: exact in double, then one rounding to float (|n| <= 192)
    const double p2 = __longlong_as_double((long long)((unsigned long long)((long long)n + 1023) << 52));
    return __double2float_rn(__dmul_rn((double)j, p2));
}

// x[i] += y[i] for i < n (grid-stride).
extern "C" __global__ void add_f32(float* x, const float* y, unsigned long long n) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        x[i] = x[i] + y[i];
    }
}

// out = silu(gate) * up over rows of `cols`, n = rows * cols (grid-stride). Within each row the
// CPU uses ggml's expf on the first cols/16*16 columns and libm's expf on the rest.
extern "C" __global__ void swiglu_f32(const float* gate, const float* up, float* out,
                                      unsigned long long n, unsigned int cols) {
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    const unsigned int full = cols / 16 * 16;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += stride) {
        const float v = gate[i];
        const unsigned int c = (unsigned int)(i % cols);
        const float e = c < full ? kiln_ggml_v_expf(0.0f - v) : kiln_expf(-v);
        out[i] = v / (1.0f + e) * up[i];
    }
}
