// The CPU kernels for x86-64 with AVX-512 (F, BW, VL, DQ) and FMA.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define SAE_ISA avx512
#define SAE_ISA_NAME "avx512"
#define SAE_VECTOR_BYTES 64
#include "kernels.h"
#endif
