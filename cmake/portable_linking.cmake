# Portable linking: the shipped libraries load on every manylinux_2_28 system (glibc 2.28, gcc 8's
# libstdc++), whichever glibc and gcc build them. docs/wheels.md explains the mechanism;
# tests/test_portable_library.py checks the built libraries' symbol versions.
#
# TOKENMIX_PORTABLE_LINKING: ON (x86-64 Linux with glibc; the default there) or OFF.

set(_tokenmix_portable_default OFF)
if(CMAKE_SYSTEM_NAME STREQUAL "Linux" AND CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64)$")
  # glibc only: the symbol versions below are glibc's (musl has none).
  include(CheckCXXSymbolExists)
  check_cxx_symbol_exists(gnu_get_libc_version "gnu/libc-version.h" TOKENMIX_HAVE_GLIBC)
  if(TOKENMIX_HAVE_GLIBC)
    set(_tokenmix_portable_default ON)
  endif()
endif()
option(TOKENMIX_PORTABLE_LINKING
  "Link against glibc 2.28 and GLIBCXX 3.4.24 symbol versions (manylinux_2_28 wheels)"
  ${_tokenmix_portable_default})

if(TOKENMIX_PORTABLE_LINKING)
  enable_language(ASM)
  set(_tokenmix_portable_dir ${CMAKE_CURRENT_LIST_DIR}/../csrc/portable)
  # The wrapped symbols are those the two sources define wrappers for: the `compat NAME, VERSION`
  # lines and `__wrap_NAME:` labels of glibc_compat.S, the `void __wrap_NAME(` functions of
  # libstdcxx_compat.cpp (tests/test_portable_library.py reads them the same way).
  file(STRINGS ${_tokenmix_portable_dir}/glibc_compat.S _tokenmix_asm_lines
    REGEX "^(compat [A-Za-z0-9_]+,|__wrap_[A-Za-z0-9_]+:)")
  file(READ ${_tokenmix_portable_dir}/libstdcxx_compat.cpp _tokenmix_cxx_source)
  string(REGEX MATCHALL "void[ \t\n]+__wrap_[A-Za-z0-9_]+\\(" _tokenmix_cxx_wrappers
    "${_tokenmix_cxx_source}")
  set(_tokenmix_wraps)
  foreach(_item IN LISTS _tokenmix_asm_lines _tokenmix_cxx_wrappers)
    string(REGEX REPLACE "^(compat |void[ \t\n]+__wrap_|__wrap_)([A-Za-z0-9_]+).*" "\\2" _symbol
      "${_item}")
    list(APPEND _tokenmix_wraps ${_symbol})
  endforeach()
  list(LENGTH _tokenmix_wraps _tokenmix_wrap_count)
  list(TRANSFORM _tokenmix_wraps PREPEND "LINKER:--wrap=" OUTPUT_VARIABLE _tokenmix_wrap_options)
  add_library(tokenmix_portable OBJECT
    ${_tokenmix_portable_dir}/glibc_compat.S
    ${_tokenmix_portable_dir}/libstdcxx_compat.cpp)
  set_target_properties(tokenmix_portable PROPERTIES POSITION_INDEPENDENT_CODE ON)
  message(STATUS "tokenmix: portable linking (glibc 2.28, GLIBCXX 3.4.24 symbol versions; "
    "${_tokenmix_wrap_count} wrapped symbols)")
endif()

# Links `target` portably when TOKENMIX_PORTABLE_LINKING is on.
function(tokenmix_portable_link target)
  if(NOT TOKENMIX_PORTABLE_LINKING)
    return()
  endif()
  target_sources(${target} PRIVATE $<TARGET_OBJECTS:tokenmix_portable>)
  target_link_options(${target} PRIVATE ${_tokenmix_wrap_options})
  # Where the wrapped functions live on glibc < 2.34 (empty stubs on newer glibc).
  target_link_libraries(${target} PRIVATE "-Wl,--push-state,--no-as-needed" -l:libpthread.so.0 -l:libdl.so.2 -l:librt.so.1
    "-Wl,--pop-state")
endfunction()
