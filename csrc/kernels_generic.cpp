// The CPU kernels for any processor: the compiler's baseline instruction set.
#define SAE_ISA generic
#define SAE_ISA_NAME "generic"
#define SAE_VECTOR_BYTES 16
#include "kernels.h"
