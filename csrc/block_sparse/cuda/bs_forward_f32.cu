// Block-sparse forward kernels, f32.
#include "bs_instantiate.h"

TOKENMIX_BS_FORWARD(F32, f32)
