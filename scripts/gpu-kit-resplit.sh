#!/usr/bin/env bash
# Re-split the vLLM GPU kit (../shared/gpu/build-kit.sh writes .gpu-kit/p00.. of 60 MiB) into smaller
# parts. A device call carries the working tree plus one part and must stay under 64 MiB; since the
# quality fixtures (benchmarks/quality/fixtures, ~27 MB) are in the tree, 60 MiB parts no longer fit.
# usage: bash scripts/gpu-kit-resplit.sh [PART_MIB]   (default: 64 MiB minus the tree, rounded down)
# Then send the parts as ../shared/gpu/README.md says, with .gpu-kit/recv.sh (rewritten here for the
# new part size).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.gpu-kit
[ -f "$KIT/p00" ] || { echo "no $KIT/p00: run bash ../shared/gpu/build-kit.sh first"; exit 2; }
tree_mib=$(( ($(git ls-files -z | xargs -0 cat | wc -c) + 1048575) / 1048576 ))
part=${1:-$(( 64 - tree_mib - 2 ))}
[ "$part" -ge 1 ] || { echo "the tree leaves no room for a part (${part} MiB)"; exit 2; }
cat "$KIT"/p?? > "$KIT/kit.tar"
rm -f "$KIT"/p??
split -b "${part}m" -d -a 2 "$KIT/kit.tar" "$KIT/p"
rm "$KIT/kit.tar"
sed -i "s/want=\$((n \* [0-9]* \* 1024 \* 1024))/want=\$((n * ${part} * 1024 * 1024))/" "$KIT/recv.sh"
grep -q "n \* ${part} \* 1024" "$KIT/recv.sh" || { echo "recv.sh not rewritten"; exit 1; }
echo "tree ${tree_mib} MiB; $(ls "$KIT"/p?? | wc -l) parts of ${part} MiB in $KIT (recv.sh updated)"
