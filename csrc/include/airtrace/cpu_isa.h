// Which instruction-set variant of the CPU kernels the airtrace::<op>_cpu functions run.
//
// The CPU kernels are compiled once per variant (CMakeLists.txt, AIRTRACE_CPU_ISAS: on x86-64
// "generic" = x86-64, "avx2" = x86-64-v3 (AVX2, FMA, F16C), "avx512" = x86-64-v4 (AVX-512
// F/BW/CD/DQ/VL); elsewhere "generic" only). At load the best variant that this CPU can execute
// is picked, unless the environment variable AIRTRACE_CPU_ISA names one.
#pragma once
#include <string>
#include <vector>

namespace airtrace::cpu_isa {

// The variants compiled into this build, worst to best.
std::vector<std::string> built();

// The built variants that this CPU can execute, worst to best (never empty).
std::vector<std::string> runnable();

// The x86-64 psABI level features (v2 to v4) that this CPU has, by their GCC names; empty off x86.
std::vector<std::string> cpu_features();

// The variant that the kernels run. Throws std::invalid_argument when AIRTRACE_CPU_ISA asked
// for one that cannot run here (every kernel call then throws the same message).
std::string current();

// Runs `name` from now on ("auto": the best runnable). Throws std::invalid_argument, naming the
// CPU's features and the runnable variants, for an unknown, unbuilt or unrunnable variant; the
// current variant is then kept.
void select(const std::string& name);

// select($AIRTRACE_CPU_ISA), "auto" when unset or empty. An impossible request is kept as the
// error that every kernel call and current() throw, never as a silent fallback.
void select_from_env();

}  // namespace airtrace::cpu_isa
