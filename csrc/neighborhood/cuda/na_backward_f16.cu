// Backward kernels, f16.
#include "na_instantiate.h"

TOKENMIX_NA_BACKWARD(F16, f16)
