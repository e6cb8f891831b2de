#!/usr/bin/env bash
# Sweeps of cytology-lora experiments: every combination, finished runs skipped (see utils/sweep.py).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: bash launch_run.sh --experiment {1,2,3} --datasets "D ..." --models "M ..." [options]

  --experiment 1|2|3   1 = linear head (main.py); 2 = LoRA few-shot; 3 = LoRA on a percentage (main_lora.py)
  --datasets "..."     e.g. "sipakmed mlcc bcfc hicervix"
  --models "..."       e.g. "clip quilt biomedclip uni vit_google"
  --methods "..."      e.g. "linear knn lora" (default: the experiment's method, else lora)
  --shots "..."        K images per class (default: the preset's, -1 = all images for experiment 1;
                       else "1 2 4 8 16")
  --percentages "..."  run with --shots 0 (default for experiment 3: "1 10 50 100")
  --seeds "..."        default "1 2 3"
  --folds K            folder and csv data: every combination runs K times, --cv K --fold i for i = 0..K-1
                       (K >= 2; run folders end in -fold<i>of<K>; the report treats folds like seeds)
  --lrs "..."          learning rates of the methods that train (default: the preset's, 1e-3 for experiment 3;
                       else each method's own, CLIP-LoRA's 2e-4 for most); methods that train nothing have none
  --weights "..."      "pretrained" (default), "random", or a local file; "pretrained random" runs both
  --level L            HiCervix level(s), e.g. level_3
  --root_path R  --output_dir O (default results)
  --n_iters N          the budget of the methods counting it as the paper's LoRA does (warmup + N x K steps);
                       heads on cached features (N epochs) keep theirs unless no such method is in the sweep
  --extra "..."        flags for every run, e.g. "--params pw --r 4" or "--textual True"
  --dry_run            print the pending commands
  --estimate           print the runs (to run and finished), their training steps and images, and the
                       wall time they would take here, then exit without running anything; the time
                       comes from one timed training step (after a warm-up step) per model, method and
                       batch size on this machine's device (with --gpus: also divided among the GPUs)
  --step_seconds S     with --estimate: S seconds per training step on images, and nothing is timed
                       (steps on cached features, feature extraction and evaluation are then not counted)
  --gpus "0 1"         one local worker per GPU
  --slurm              write <output_dir>/sweeps/<time>/sweep.sbatch and submit it if sbatch exists
                       (--sbatch "--partition=gpu --time=04:00:00", --max_parallel N)
  --nodes M --gpus_per_node N
                       with --slurm: each run on M nodes x N GPUs (one torchrun per node, data-parallel);
                       near the time limit it checkpoints and requeues itself

Finished runs (a results.json in their folder) are skipped, so rerunning resumes a sweep; a run that
another process is running (its folder's lock) is not started again. Each run is a process group of
its own: Ctrl-C or SIGTERM to the sweep reaches the running runs, which save a checkpoint and stop.
Each run logs to <run folder>.log, one line per progress update; a rerun appends to it after a
"# ---- resumed" line. Failed runs are listed at the end with their last error line.
Summarise with: python -m utils.report <output_dir>
EOF
}

if [[ $# -eq 0 ]]; then
    usage >&2
    exit 2
fi
if [[ "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    exit 0
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python}" -m utils.sweep "$@"
