// kiln CUDA kernels: embedding rows gathered for the tokens and decoded to f32 (F32, F16, BF16
// tables; exact conversions, as kiln_quant::dequantize_row). The host checks every token is inside
// the table before launching (the CPU's error); a token past it is skipped here, never read.

#include <cuda_fp16.h>

// One block per token; out row r is table row tokens[r].
extern "C" __global__ void embed_f32(const unsigned int* tokens, const float* table, float* out,
                                     unsigned int cols, unsigned int n_rows) {
    const unsigned int t = tokens[blockIdx.x];
    if (t >= n_rows) return;
    const float* src = table + (unsigned long long)t * cols;
    float* dst = out + (unsigned long long)blockIdx.x * cols;
    for (unsigned int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

extern "C" __global__ void embed_f16(const unsigned int* tokens, const unsigned short* table,
                                     float* out, unsigned int cols, unsigned int n_rows) {
    const unsigned int t = tokens[blockIdx.x];
    if (t >= n_rows) return;
    const unsigned short* src = table + (unsigned long long)t * cols;
    float* dst = out + (unsigned long long)blockIdx.x * cols;
    for (unsigned int c = threadIdx.x; c < cols; c += blockDim.x) {
        dst[c] = __half2float(__ushort_as_half(src[c]));
    }
}

extern "C" __global__ void embed_bf16(const unsigned int* tokens, const unsigned short* table,
                                      float* out, unsigned int cols, unsigned int n_rows) {
    const unsigned int t = tokens[blockIdx.x];
    if (t >= n_rows) return;
    const unsigned short* src = table + (unsigned long long)t * cols;
    float* dst = out + (unsigned long long)blockIdx.x * cols;
    for (unsigned int c = threadIdx.x; c < cols; c += blockDim.x) {
        dst[c] = __uint_as_float((unsigned int)src[c] << 16);
    }
}
