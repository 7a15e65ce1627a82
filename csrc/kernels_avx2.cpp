// The CPU kernels for x86-64 with AVX2 and FMA.
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#define SAE_ISA avx2
#define SAE_ISA_NAME "avx2"
#define SAE_VECTOR_BYTES 32
#include "kernels.h"
#endif
