#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Every table and plot of docs/performance.md's comparison with the peers, on one machine
# with an NVIDIA GPU, PyTorch (triton) and matplotlib, nbhd installed with its CUDA backends.
#   bench/reproduce.sh                  all steps: anchors models paper-1 paper-2 classifiers summary
#   bench/reproduce.sh anchors          some steps (each well under 10 minutes on an H100);
#                                       `periodic` (not in the default list) times periodic twins
# Output: bench/results/<card>-<date>.{json,md}, -*.png, -paper.md; pieces in <card>-<date>/;
# classifier images/s in <card>-<date>-classifiers/.
# NBHD_BENCH_DATE=YYYY-MM-DD keeps the steps of one reproduction together across midnight;
# NBHD_BENCH_MAX_MINUTES (default 8.5) is when a step starts no new problem.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
date="${NBHD_BENCH_DATE:-$(date -u +%F)}"
card="$("$py" -c 'import sys, torch; sys.path.insert(0, "bench"); import suite; print(suite.card_slug(torch.cuda.get_device_name()))')"
tag="$card-$date"
suite=("$py" bench/suite.py --date "$date" --max-minutes "${NBHD_BENCH_MAX_MINUTES:-8.5}")

[ $# -gt 0 ] || set -- anchors models paper-1 paper-2 classifiers summary
for step in "$@"; do
  echo "== $step ($tag)"
  SECONDS=0
  case "$step" in
    anchors) "${suite[@]}" --set anchors ;;
    models) "${suite[@]}" --set models ;;
    periodic) "${suite[@]}" --set periodic ;;  # each 2-D problem plain and periodic on axis 1 (issue 23)
    paper-1) "${suite[@]}" --set paper --start 0 --limit 150 ;;
    paper-2) "${suite[@]}" --set paper --start 150 --limit 150 ;;
    classifiers)  # the paper's Tables 5 and 8: NAT/DiNAT-Tiny images/s per backend
      # Beside the suite's pieces, not among them: the merge reads every JSON there.
      mkdir -p "bench/results/$tag-classifiers"
      for model in nat-tiny dinat-tiny; do
        "$py" examples/nat.py --model "$model" --steps 10 --warmup 3 --json "bench/results/$tag-classifiers/$model.json"
      done ;;
    summary) "$py" bench/summarize.py "bench/results/$tag" --set paper --out "bench/results/$tag-paper.md" \
               --merge-to "bench/results/$tag" > /dev/null ;;
    *) echo "unknown step '$step' (anchors, models, periodic, paper-1, paper-2, classifiers, summary)" >&2; exit 2 ;;
  esac
  echo "== $step done in $SECONDS s"
done
