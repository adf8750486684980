// Keeps the shipped libraries within the libstdc++ symbol versions of manylinux_2_28 (GLIBCXX
// 3.4.24, gcc 8), whatever gcc builds them (cmake/portable_linking.cmake, docs/wheels.md).
//
// Newer gcc headers call three library functions that older libstdc++ does not export. The link
// passes --wrap for each, so the references land on these definitions, which use only functions
// gcc 8's libstdc++ has.
#include <new>
#include <sstream>

extern "C" {

// std::__throw_bad_array_new_length() (GLIBCXX_3.4.29, gcc 11): thrown by allocators on an
// overflowing array size.
[[noreturn]] __attribute__((visibility("hidden"))) void
__wrap__ZSt28__throw_bad_array_new_lengthv() {
  throw std::bad_array_new_length();
}

// The default constructors of std::stringstream and std::ostringstream (GLIBCXX_3.4.26, gcc 9)
// are the openmode constructors with their default modes.
__attribute__((visibility("hidden"))) void
__wrap__ZNSt7__cxx1118basic_stringstreamIcSt11char_traitsIcESaIcEEC1Ev(void* self) {
  ::new (self) std::stringstream(std::ios_base::in | std::ios_base::out);
}

__attribute__((visibility("hidden"))) void
__wrap__ZNSt7__cxx1119basic_ostringstreamIcSt11char_traitsIcESaIcEEC1Ev(void* self) {
  ::new (self) std::ostringstream(std::ios_base::out);
}

}  // extern "C"
