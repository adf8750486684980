// Block-sparse forward kernels, f16.
#include "bs_instantiate.h"

TOKENMIX_BS_FORWARD(F16, f16)
