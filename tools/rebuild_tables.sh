#!/usr/bin/env bash
# Rebuild every published benchmark's tables and figures from its published files (results/weights/<name>/),
# with the options that made them, into OUT (default: a fresh temporary directory), then compare OUT with
# results/ byte for byte. The first line of a Markdown/LaTeX table (its provenance: command and commit) is left out
# of the comparison; every other byte counts, the PNG/PDF figures' included. Exit status 1 when a file differs.
#
#   bash tools/rebuild_tables.sh [OUT]
#
# CIFAR_FS_ARCHIVE names the CIFAR-100 archive the published cross-domain target was scored on (its episodes are
# generated from the data, so its test-class interval needs the data): the partial
# cifar-100-python-partial-train1117-test916.tar.gz that the published cpu_tiny_imagenet cells were scored on.
# FSL_BENCH: the command to run [default: .venv/bin/fsl-bench].
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(mktemp -d)}
FSL=${FSL_BENCH:-.venv/bin/fsl-bench}
CIFAR=${CIFAR_FS_ARCHIVE:-}
if [ -z "$CIFAR" ] || [ ! -f "$CIFAR" ]; then
  echo "error: set CIFAR_FS_ARCHIVE to the CIFAR-100 archive the published cross-domain target was scored on" \
       "(cifar-100-python-partial-train1117-test916.tar.gz); got '${CIFAR}'" >&2
  exit 2
fi
mkdir -p "$OUT"
cp results/README.md "$OUT/README.md"   # table rewrites its generated sections in place
status=0
t() {
  local name=$1; shift
  local s; s=$(date +%s.%N)
  if ! "$FSL" table "benchmarks/$name.yaml" --from-results "results/weights/$name" --results-dir "$OUT" "$@" \
      > "$OUT/.$name.log" 2>&1; then
    echo "FAILED: fsl-bench table benchmarks/$name.yaml (log: $OUT/.$name.log)"; status=1; return
  fi
  printf '%6.1f s  %s\n' "$(echo "$(date +%s.%N) - $s" | bc)" "$name"
}
t cpu_tiny_imagenet --data "cifar_fs=$CIFAR" --baseline ce --baseline pskd
t limited_data_tiny_imagenet
t store_ablation_tiny_imagenet --baseline pskd --baseline lsskd
t short_distill_tiny_imagenet
same=0; differ=0
for f in "$OUT"/*; do
  b=$(basename "$f"); [ -f "results/$b" ] || { echo "new file: $b"; differ=$((differ + 1)); continue; }
  case "$b" in
    *.md|*.tex) if [ "$b" = README.md ]; then cmp -s "$f" "results/$b"; else
                  cmp -s <(tail -n +2 "$f") <(tail -n +2 "results/$b"); fi ;;
    *) cmp -s "$f" "results/$b" ;;
  esac
  if [ $? -eq 0 ]; then same=$((same + 1)); else echo "differs: $b"; differ=$((differ + 1)); fi
done
echo "$same files identical, $differ differ (rebuilt into $OUT)"
[ "$differ" -eq 0 ] && exit $status || exit 1
