// kiln CUDA kernels: the prelude every kernel file is compiled with (prepended by the host, not
// #included, so NVRTC needs no include path for it).
//
// Arithmetic rules, so results match kiln's CPU backend: the host compiles with --fmad=false (no
// contraction: every fused multiply-add is written out as __fmaf_rn where the CPU uses mul_add),
// --prec-div=true, --prec-sqrt=true, --ftz=false. Reductions run in a fixed order: each thread sums
// its strided elements in sequence, then a tree over KILN_BLOCK threads; never floating-point
// atomics. KILN_BLOCK (a power of two) is defined by the host with -D and every reduction kernel is
// launched with exactly that many threads.

#ifndef KILN_BLOCK
#error "KILN_BLOCK must be defined by the host (-DKILN_BLOCK=...)"
#endif

#define KILN_INF __int_as_float(0x7f800000)
#define KILN_NAN __int_as_float(0x7fc00000)

// expf as the CPU's libm computes it (correctly rounded but for the rarest halfway cases): the
// double-precision exp rounded once to float.
__device__ __forceinline__ float kiln_expf(float x) {
    return __double2float_rn(exp((double)x));
}

// Tree sum of one value per thread over the block, in a fixed order; every thread gets the total.
// `part` is KILN_BLOCK doubles of shared memory.
__device__ __forceinline__ double kiln_block_sum(double v, double* part) {
    const unsigned int t = threadIdx.x;
    part[t] = v;
    __syncthreads();
    for (unsigned int s = KILN_BLOCK / 2; s > 0; s >>= 1) {
        if (t < s) part[t] = part[t] + part[t + s];
        __syncthreads();
    }
    const double r = part[0];
    __syncthreads();
    return r;
}

// Maximum of one value per thread over the block (NaN-ignoring, as Rust's f32::max); every thread
// gets it. `part` is KILN_BLOCK floats of shared memory.
__device__ __forceinline__ float kiln_block_max(float v, float* part) {
    const unsigned int t = threadIdx.x;
    part[t] = v;
    __syncthreads();
    for (unsigned int s = KILN_BLOCK / 2; s > 0; s >>= 1) {
        if (t < s) part[t] = fmaxf(part[t], part[t + s]);
        __syncthreads();
    }
    const float r = part[0];
    __syncthreads();
    return r;
}
