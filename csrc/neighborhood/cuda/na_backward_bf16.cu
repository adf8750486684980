// Backward kernels, bf16.
#include "na_instantiate.h"

TOKENMIX_NA_BACKWARD(BF16, bf16)
