// The CPU kernels for any processor: the compiler's baseline instruction set.
#define SAE_ISA generic
#define SAE_ISA_NAME "generic"
#include "kernels.h"
