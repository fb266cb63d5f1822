#!/usr/bin/env bash
# A/B of the CPU noise kernel (csrc/philox.h + csrc/cpu/step_simd.h, both ISAs) between a git revision (A) and the
# working tree (B): the two must give the same bits, then one thread times both in paired rounds.
#
#   bash benchmarks/noise_ab.sh [REV]        # REV defaults to HEAD; prints one line per ISA this CPU has
#   bash benchmarks/noise_ab.sh DIR          # A = DIR/csrc (e.g. `git archive REV csrc | tar -x -C DIR` made where
#                                            # there is no .git, as on the GPU machine)
#
# It compiles with the extension's host flags (setup.py); CXX picks the compiler.
set -eu -o pipefail
cd "$(dirname "$0")/.."
REV=${1:-HEAD}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
if [ -d "$REV/csrc" ]; then
  cp -r "$REV/csrc" "$TMP/csrc"; NAME="$REV/csrc"
else
  git archive "$REV" csrc | tar -x -C "$TMP"; NAME="$REV ($(git rev-parse --short "$REV"))"
fi
FLAGS="-O3 -std=c++17 -ffp-contract=off -fno-math-errno -fno-trapping-math -fschedule-insns -fsched-pressure"
CXX=${CXX:-c++}
for side in a b; do
  src=$([ $side = a ] && echo "$TMP/csrc" || echo csrc)
  $CXX $FLAGS -I"$src" -DFN=avx2_$side -c benchmarks/noise_ab/kernel.cpp -o "$TMP/avx2_$side.o"
  $CXX $FLAGS -I"$src" -DFD_ISA_AVX512=1 -DFN=avx512_$side -c benchmarks/noise_ab/kernel.cpp -o "$TMP/avx512_$side.o"
done
$CXX -O2 -std=c++17 benchmarks/noise_ab/main.cpp "$TMP"/*.o -o "$TMP/noise_ab"
echo "A = $NAME, B = the working tree; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" \
  "[$(grep -m1 'cpu family' /proc/cpuinfo | cut -d: -f2 | xargs)/$(grep -m1 '^model\s' /proc/cpuinfo | cut -d: -f2 | xargs)]"
"$TMP/noise_ab"
