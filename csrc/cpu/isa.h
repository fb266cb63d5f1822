// Whether this build has the SIMD kernel tables (no code here: safe to include before a target pragma).
#pragma once

// x86-64 with GCC: per-function ISA targets via #pragma GCC target.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FD_X86_SIMD 1
#else
#define FD_X86_SIMD 0
#endif
