// Forward kernels, bf16.
#include "na_instantiate.h"

TOKENMIX_NA_FORWARD(BF16, bf16)
