# Fails the build when the objects of CPU variant ISA define an external symbol outside namespace
# airtrace::ISA: the linker keeps one copy of each weak (inline, template) symbol, so such a symbol
# defined by two variants could run one variant's instructions in the other (SIGILL on a CPU without
# them). Usage: cmake -DNM=<nm> -DISA=<variant> -DOBJECTS=<a.o|b.o|...> -P check_cpu_variant.cmake
string(REPLACE "|" ";" objects "${OBJECTS}")
set(shared "")
foreach(object IN LISTS objects)
  execute_process(COMMAND "${NM}" --defined-only --extern-only --demangle "${object}"
                  OUTPUT_VARIABLE listing RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${NM} failed on ${object}")
  endif()
  string(REPLACE "\n" ";" lines "${listing}")
  foreach(line IN LISTS lines)
    # "<address> <type> <name>"; DW.ref.__gxx_personality_v0 is the same data in every object.
    if(line MATCHES "^[0-9a-fA-F]* [A-Za-z] (.*)$")
      set(name "${CMAKE_MATCH_1}")
      if(NOT name MATCHES "airtrace::${ISA}::" AND NOT name STREQUAL "DW.ref.__gxx_personality_v0")
        list(APPEND shared "${name}")
      endif()
    endif()
  endforeach()
endforeach()
if(shared)
  list(REMOVE_DUPLICATES shared)
  list(JOIN shared "\n  " text)
  message(FATAL_ERROR "CPU variant ${ISA} defines symbols outside namespace airtrace::${ISA}, which the linker "
          "may merge with another variant's code compiled for other instructions:\n  ${text}\n"
          "Keep csrc/cpu code in namespace airtrace::AIRTRACE_ISA and use cpu::Buffer instead of std::vector.")
endif()
