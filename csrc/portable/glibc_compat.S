// Links the shipped libraries against the glibc 2.28 symbol versions (manylinux_2_28), whatever
// glibc the build machine has (cmake/portable_linking.cmake, docs/wheels.md).
//
// glibc 2.29+ gave some functions new default versions (exp, exp2, log2), and glibc 2.34 moved
// libpthread, libdl and librt into libc under GLIBC_2.34. A library linked on a newer glibc, by
// our code or by the static CUDA runtime, references those new versions and does not load on an
// older glibc. Each `compat NAME, VERSION` line below defines a hidden trampoline __wrap_NAME
// that jumps to NAME@VERSION, the newest version glibc 2.28 has; the link passes --wrap=NAME so
// that every object's references go through it. The library keeps DT_NEEDED entries for
// libpthread, libdl and librt, where those functions live on glibc < 2.34.
//
// The list is checked: tests/test_portable_library.py reads the built libraries' version needs.

.macro compat name, version
  .text
  .globl __wrap_\name
  .hidden __wrap_\name
  .type __wrap_\name, @function
__wrap_\name:
  jmp tokenmix_versioned_\name@PLT
  .size __wrap_\name, . - __wrap_\name
  .symver tokenmix_versioned_\name, \name@\version
.endm

compat dladdr, GLIBC_2.2.5
compat dlclose, GLIBC_2.2.5
compat dlerror, GLIBC_2.2.5
compat dlmopen, GLIBC_2.3.4
compat dlopen, GLIBC_2.2.5
compat dlsym, GLIBC_2.2.5
compat dlvsym, GLIBC_2.2.5
compat exp, GLIBC_2.2.5
compat exp2, GLIBC_2.2.5
compat log2, GLIBC_2.2.5
compat pthread_condattr_setpshared, GLIBC_2.2.5
compat pthread_create, GLIBC_2.2.5
compat pthread_detach, GLIBC_2.2.5
compat pthread_getspecific, GLIBC_2.2.5
compat pthread_join, GLIBC_2.2.5
compat pthread_key_create, GLIBC_2.2.5
compat pthread_key_delete, GLIBC_2.2.5
compat pthread_kill, GLIBC_2.2.5
compat pthread_mutex_trylock, GLIBC_2.2.5
compat pthread_mutexattr_destroy, GLIBC_2.2.5
compat pthread_mutexattr_init, GLIBC_2.2.5
compat pthread_mutexattr_setpshared, GLIBC_2.2.5
compat pthread_mutexattr_settype, GLIBC_2.2.5
compat pthread_once, GLIBC_2.2.5
compat pthread_rwlock_destroy, GLIBC_2.2.5
compat pthread_rwlock_init, GLIBC_2.2.5
compat pthread_rwlock_rdlock, GLIBC_2.2.5
compat pthread_rwlock_timedrdlock, GLIBC_2.2.5
compat pthread_rwlock_timedwrlock, GLIBC_2.2.5
compat pthread_rwlock_tryrdlock, GLIBC_2.2.5
compat pthread_rwlock_trywrlock, GLIBC_2.2.5
compat pthread_rwlock_unlock, GLIBC_2.2.5
compat pthread_rwlock_wrlock, GLIBC_2.2.5
compat pthread_rwlockattr_destroy, GLIBC_2.2.5
compat pthread_rwlockattr_init, GLIBC_2.2.5
compat pthread_rwlockattr_setpshared, GLIBC_2.2.5
compat pthread_setspecific, GLIBC_2.2.5
compat pthread_spin_destroy, GLIBC_2.2.5
compat pthread_spin_init, GLIBC_2.2.5
compat pthread_spin_lock, GLIBC_2.2.5
compat pthread_spin_trylock, GLIBC_2.2.5
compat pthread_spin_unlock, GLIBC_2.2.5
compat sem_destroy, GLIBC_2.2.5
compat sem_init, GLIBC_2.2.5
compat sem_post, GLIBC_2.2.5
compat sem_timedwait, GLIBC_2.2.5
compat sem_trywait, GLIBC_2.2.5
compat sem_wait, GLIBC_2.2.5
compat shm_open, GLIBC_2.2.5
compat shm_unlink, GLIBC_2.2.5

// __libc_single_threaded (GLIBC_2.32) has no older version: libstdc++'s headers read it to skip
// atomic reference counting in single-threaded processes. Zero means "maybe multi-threaded", which
// is always correct: reference counts stay atomic.
  .data
  .globl __wrap___libc_single_threaded
  .hidden __wrap___libc_single_threaded
  .type __wrap___libc_single_threaded, @object
  .size __wrap___libc_single_threaded, 1
__wrap___libc_single_threaded:
  .byte 0

  .section .note.GNU-stack,"",@progbits
