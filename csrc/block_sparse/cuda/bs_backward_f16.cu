// Block-sparse backward kernels, f16.
#include "bs_instantiate.h"

TOKENMIX_BS_BACKWARD(F16, f16)
