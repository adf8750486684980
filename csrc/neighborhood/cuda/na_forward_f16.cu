// Forward kernels, f16.
#include "na_instantiate.h"

TOKENMIX_NA_FORWARD(F16, f16)
