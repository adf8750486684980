// Block-sparse forward kernels, bf16.
#include "bs_instantiate.h"

TOKENMIX_BS_FORWARD(BF16, bf16)
