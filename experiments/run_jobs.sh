#!/bin/bash
# Runs the training jobs of a jobs file, PARALLEL at a time, one workdir each under WORKROOT, and prints each job's
# final valid/test word-level perplexity; then `python -m experiments.summarize --runs="$WORKROOT/*"` pools seeds.
#
#   bash experiments/run_jobs.sh experiments/jobs/wikitext2_gpu.txt 8 runs/gpu [--data_dir=DIR ...]
#
# A jobs line is `NAME CONFIG[:VARIANT] [--config.overrides ...]`, CONFIG relative to experiments/configs/; blank
# lines and lines starting with # are skipped. Extra arguments are passed to every job. Several small jobs share one
# GPU well (each takes only the memory it needs); a job's log is WORKROOT/NAME.log.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 JOBS_FILE PARALLEL WORKROOT [extra train flags...]" >&2
  exit 2
fi
jobs_file=$1; parallel=$2; workroot=$3; shift 3
[[ -s $jobs_file ]] || { echo "jobs file $jobs_file is missing or empty" >&2; exit 2; }
mkdir -p "$workroot"
export XLA_PYTHON_CLIENT_PREALLOCATE=false HMOE_WORKROOT=$workroot HMOE_EXTRA_FLAGS="$*"

run_job() {
  local name=$1 spec=$2; shift 2
  local rc=0
  # shellcheck disable=SC2086  # extra flags are split on purpose.
  python -m experiments.train --config="experiments/configs/$spec" --workdir="$HMOE_WORKROOT/$name" "$@" \
    $HMOE_EXTRA_FLAGS > "$HMOE_WORKROOT/$name.log" 2>&1 || rc=$?
  echo "$name rc=$rc $(grep -E '(valid|test)/word_perplexity' "$HMOE_WORKROOT/$name.log" | tail -2 | tr '\n' ' ')"
  return "$rc"  # A failed job makes the whole script fail (xargs exits 123), after the others have finished.
}
export -f run_job

grep -v -E '^\s*(#|$)' "$jobs_file" | xargs -P "$parallel" -L 1 bash -c 'run_job "$@"' _
