// Block-sparse backward kernels, bf16.
#include "bs_instantiate.h"

TOKENMIX_BS_BACKWARD(BF16, bf16)
