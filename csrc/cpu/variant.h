// The namespace of one CPU kernel variant, and the containers its code uses.
//
// csrc/cpu/<op>.cpp are compiled once per instruction set (CMakeLists.txt, AIRTRACE_CPU_ISAS) with
// -DAIRTRACE_ISA=<variant>, and everything they define lives in namespace airtrace::<variant>. Inline
// and template code (the micro-kernel, std::vector members) is emitted as weak symbols that the linker
// keeps one copy of; with one namespace per variant, and an allocator of that namespace in every
// vector, no copy compiled for one instruction set can stand in for another variant's. The build
// checks this (cmake/check_cpu_variant.cmake).
#pragma once
#include <cstddef>
#include <new>
#include <vector>

#ifndef AIRTRACE_ISA
#error "csrc/cpu/*.cpp are compiled with -DAIRTRACE_ISA=<variant name>; build them through CMakeLists.txt"
#endif

namespace airtrace::AIRTRACE_ISA::cpu {

// std::allocator's behaviour under a type of this variant's namespace.
template <typename T>
struct Allocator {
  using value_type = T;
  Allocator() = default;
  template <typename U>
  Allocator(const Allocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p); }
  friend bool operator==(const Allocator&, const Allocator&) { return true; }
  friend bool operator!=(const Allocator&, const Allocator&) { return false; }
};

// The vector every CPU kernel uses for its buffers.
template <typename T>
using Buffer = std::vector<T, Allocator<T>>;

}  // namespace airtrace::AIRTRACE_ISA::cpu
