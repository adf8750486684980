// Block-sparse backward kernels, f32.
#include "bs_instantiate.h"

TOKENMIX_BS_BACKWARD(F32, f32)
