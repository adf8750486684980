// Backward kernels, f32.
#include "na_instantiate.h"

TOKENMIX_NA_BACKWARD(F32, f32)
