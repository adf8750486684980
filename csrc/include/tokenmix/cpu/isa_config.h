// Vector width of the instruction set a kernel translation unit is compiled
// for (CMake compiles each such unit once per set; see CMakeLists.txt).
#pragma once

#if !defined(TOKENMIX_VEC_BYTES)
#if defined(__AVX512F__)
#define TOKENMIX_VEC_BYTES 64
#elif defined(__AVX2__)
#define TOKENMIX_VEC_BYTES 32
#else
#define TOKENMIX_VEC_BYTES 16
#endif
#endif
