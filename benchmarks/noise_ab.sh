#!/usr/bin/env bash
# A/B of the CPU noise kernel (csrc/philox.h + csrc/cpu/step_simd.h, both ISAs) between a git revision (A) and the
# working tree (B): the two must give the same bits, then one thread times both in paired rounds.
#
#   bash benchmarks/noise_ab.sh [REV]        # REV defaults to HEAD; prints one line per ISA this CPU has
#   bash benchmarks/noise_ab.sh DIR          # A = DIR/csrc (e.g. `git archive REV csrc | tar -x -C DIR` made where
#                                            # there is no .git, as on the GPU machine)
#
# It compiles with the extension's host flags (setup.py's HOST_FLAGS, LINUX_HOST_FLAGS; OpenMP aside) and calls the
# kernel in blocks of the extension's kBlock groups (csrc/cpu/kernels.h); CXX picks the compiler.
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
FLAGS="-std=c++17 $(python3 -c 'import ast
flags = {t.id: ast.literal_eval(node.value) for node in ast.parse(open("setup.py").read()).body
         if isinstance(node, ast.Assign) for t in node.targets if getattr(t, "id", "").endswith("HOST_FLAGS")}
print(" ".join(f for f in flags["HOST_FLAGS"] + flags["LINUX_HOST_FLAGS"] if f != "-fopenmp"))')"
CXX=${CXX:-c++}
for side in a b; do
  src=$([ $side = a ] && echo "$TMP/csrc" || echo csrc)
  $CXX $FLAGS -I"$src" -DFN=avx2_$side -c benchmarks/noise_ab/kernel.cpp -o "$TMP/avx2_$side.o"
  $CXX $FLAGS -I"$src" -DFD_ISA_AVX512=1 -DFN=avx512_$side -c benchmarks/noise_ab/kernel.cpp -o "$TMP/avx512_$side.o"
done
$CXX -O2 -std=c++17 -Icsrc benchmarks/noise_ab/main.cpp "$TMP"/*.o -o "$TMP/noise_ab"
echo "A = $NAME, B = the working tree; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" \
  "[$(grep -m1 'cpu family' /proc/cpuinfo | cut -d: -f2 | xargs)/$(grep -m1 '^model\s' /proc/cpuinfo | cut -d: -f2 | xargs)]"
"$TMP/noise_ab"
