// Forward kernels, f32.
#include "na_instantiate.h"

TOKENMIX_NA_FORWARD(F32, f32)
