#!/usr/bin/env bash
# Train a tiny Llama with Gradient-Mask Tuning inside real clients, each in a virtualenv of its own
# with the client's own pins, and check that GMT acted (scripts/clients/check_run.py):
#
#   scripts/clients.sh [axolotl|llamafactory|all]      (default: all)
#
# axolotl:      axolotl==0.19.0 over the CPU build of torch 2.13.0; `axolotl train` with
#               `plugins: [gmt_axolotl.GMTPlugin]`, once with the default launcher (accelerate) and
#               once with `--launcher python`.
# llamafactory: llamafactory==0.9.5 over the default (CUDA-enabled) build of torch 2.13.0, which its
#               registry torchvision/torchaudio are linked against; it runs on a CPU-only machine too.
#               examples/llamafactory_gmt.py with examples/llamafactory_gmt.yaml and its dataset folder.
#
# The virtualenvs live in .cache/clients/<client> (GMT_CLIENTS_CACHE to move them) and are reused once
# complete; delete the folder for a fresh install. This checkout's gmt-plugins (and, for Axolotl,
# gmt-axolotl) are installed editable with --no-deps, so the client's pins stay as it resolved them.
# Prints one line per run; exits non-zero if any install, run or check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${GMT_CLIENTS_CACHE:-$ROOT/.cache/clients}
PYTHON=${PYTHON:-python3}
RATIO=0.5
STEPS=4
# Offline, `axolotl train` waits at exit for its telemetry to flush unless told not to track.
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export HF_HOME=$CACHE/hf OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$CACHE"
SUMMARY=()
FAILED=0

fail() { SUMMARY+=("$1: FAIL ($2)"); FAILED=1; }

# venv NAME INSTALL_FUNCTION: the client's virtualenv, created by INSTALL_FUNCTION unless complete already.
venv() {
    local name=$1 install=$2 dir=$CACHE/$1
    if [ -f "$dir/.complete" ]; then
        echo "[$name] reusing $dir"
        return
    fi
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    echo "[$name] installing into $dir (log: $CACHE/$name-install.log)"
    local start=$SECONDS
    if ! "$install" "$dir/bin/python" >"$CACHE/$name-install.log" 2>&1; then
        grep -v "is ignored: it is neither a file nor a directory" "$CACHE/$name-install.log" | tail -n 30
        return 1
    fi
    echo "[$name] installed in $((SECONDS - start)) s, $(du -sh "$dir" | cut -f1)"
    touch "$dir/.complete"
}

# install_checkout PYTHON "PIP_OPTIONS" PACKAGE...: this checkout's packages, --no-deps, plus pluggy
# (gmt-plugins' one dependency a client may lack); then pip check.
install_checkout() {
    local py=$1 options=$2; shift 2
    # shellcheck disable=SC2086 # PIP_OPTIONS is empty or one word
    "$py" -m pip install $options --no-deps "$@"
    # shellcheck disable=SC2086
    "$py" -m pip install $options "pluggy>=1.5"
    "$py" -m pip check
}

install_axolotl() {
    # The CPU wheel of torch 2.13.0 (this machine's pip configuration finds it, as scripts/setup.sh relies on),
    # then axolotl with every pin of its own.
    "$1" -m pip install torch==2.13.0
    "$1" -m pip install axolotl==0.19.0
    install_checkout "$1" "" -e "$ROOT" -e "$ROOT/integrations/axolotl"
}

install_llamafactory() {
    # --isolated ignores the user's and environment's pip configuration (a local CPU wheel or index), so
    # torch is PyPI's default build, the one PyPI's torchvision and torchaudio are linked against.
    # llamafactory leaves torch unpinned: naming torch==2.13.0 again keeps it, and picks the torchvision
    # built for it (the newest torchvision would replace torch).
    "$1" -m pip install --isolated torch==2.13.0
    "$1" -m pip install --isolated llamafactory==0.9.5 torch==2.13.0
    install_checkout "$1" --isolated -e "$ROOT"
}

version() { "$CACHE/$1/bin/python" -c "import importlib.metadata as m; print(m.version('$2'))"; }

# fresh_run NAME CLIENT: an empty run folder holding the tiny model, built by the client's own transformers.
fresh_run() {
    local run=$CACHE/runs/$1
    rm -rf "$run" && mkdir -p "$run"
    "$CACHE/$2/bin/python" scripts/clients/build_tiny.py "$run/tiny-llama" >"$run/build.log" 2>&1 || { cat "$run/build.log"; return 1; }
    echo "$run"
}

# check RUN LABEL: scripts/clients/check_run.py on the run's checkpoints, its summary line kept.
check() {
    local line
    if line=$("$CACHE/$3/bin/python" scripts/clients/check_run.py --label "$2" --output "$1/out" \
            --initial "$1/tiny-llama" --ratio "$RATIO" --steps "$STEPS"); then
        SUMMARY+=("$line")
    else
        SUMMARY+=("${line:-$2: FAIL (the checker did not run)}")
        FAILED=1
    fi
}

# train RUN WORKDIR LABEL COMMAND...: run COMMAND in WORKDIR (log in RUN/train.log), timed.
train() {
    local run=$1 workdir=$2 label=$3; shift 3
    local start=$SECONDS
    echo "[$label] $*"
    if ! (cd "$workdir" && timeout 1200 "$@") >"$run/train.log" 2>&1; then
        tail -n 40 "$run/train.log"
        return 1
    fi
    echo "[$label] trained in $((SECONDS - start)) s"
}

run_axolotl() {
    venv axolotl install_axolotl || { fail axolotl "install failed"; return; }
    local bin=$CACHE/axolotl/bin version launcher run label
    version=$(version axolotl axolotl)
    for launcher in accelerate python; do
        label="axolotl $version, torch $(version axolotl torch), --launcher $launcher"
        run=$(fresh_run "axolotl-$launcher" axolotl) || { fail "$label" "tiny model not built"; continue; }
        cp scripts/clients/axolotl.yml "$run/config.yml"
        cp scripts/clients/axolotl_data.jsonl "$run/data.jsonl"
        # The accelerate launcher calls `accelerate` from PATH: the venv's bin goes first.
        PATH=$bin:$PATH train "$run" "$run" "$label" "$bin/axolotl" train config.yml --launcher "$launcher" \
            || { fail "$label" "axolotl train failed, see $run/train.log"; continue; }
        check "$run" "$label" axolotl
    done
}

run_llamafactory() {
    venv llamafactory install_llamafactory || { fail llamafactory "install failed"; return; }
    local version run label
    version=$(version llamafactory llamafactory)
    label="llamafactory $version, torch $(version llamafactory torch)"
    run=$(fresh_run llamafactory llamafactory) || { fail "$label" "tiny model not built"; return; }
    # The example config as shipped, run from the repository root (its dataset_dir is relative to it), with
    # the model, precision and the optimizer settings check_run.py needs overridden by key=value.
    train "$run" "$ROOT" "$label" "$CACHE/llamafactory/bin/python" examples/llamafactory_gmt.py \
        examples/llamafactory_gmt.yaml "model_name_or_path=$run/tiny-llama" template=default "output_dir=$run/out" bf16=false \
        cutoff_len=64 preprocessing_num_workers=1 per_device_train_batch_size=2 gradient_accumulation_steps=2 \
        max_steps=$STEPS logging_steps=1 save_steps=1 optim=sgd learning_rate=0.1 weight_decay=0.0 \
        lr_scheduler_type=constant warmup_ratio=0.0 gmt_mask_ratio=$RATIO gmt_scope=tensor gmt_track_energy=true \
        || { fail "$label" "training failed, see $run/train.log"; return; }
    check "$run" "$label" llamafactory
}

case "${1:-all}" in
    axolotl) run_axolotl ;;
    llamafactory) run_llamafactory ;;
    all) run_axolotl; run_llamafactory ;;
    *) echo "usage: $0 [axolotl|llamafactory|all]" >&2; exit 2 ;;
esac

echo "== GMT in real clients (mask ratio $RATIO, $STEPS steps, $(lscpu | sed -n 's/^Model name: *//p'))"
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
