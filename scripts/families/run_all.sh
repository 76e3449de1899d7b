#!/bin/bash
# Every CLI path on each pair made by make_pairs.py; one line per step (ok / FAIL with the error's tail).
#   bash scripts/families/run_all.sh /tmp/families > families.log
# Expected refusals (one line each): --calib on gpt2 (Conv1D); --calib's end-to-end stages and generate
# on mixtral and qwen2_moe (experts merged on load). See README "Model families".
set -u
ROOT=$1; D=${DELTACOMP:-.venv/bin/deltacomp}
run_pair() {
  local A=$1 O=$1/out; rm -rf "$O"; mkdir -p "$O"
  step() { local name=$1; shift; if "$@" >"$O/$name.log" 2>&1; then echo "  ok   $name"; else
    echo "  FAIL $name: $(grep -v '^\s*$' "$O/$name.log" | tail -1 | cut -c1-300)"; fi; }
  step compress_svd $D compress $A/base $A/ft -o $O/svd.dcz --ratio 8 -q
  step inspect $D inspect $O/svd.dcz
  step reconstruct $D reconstruct $A/base $O/svd.dcz -o $O/rec -q
  step eval $D eval $A/base $A/ft $O/svd.dcz --max-tokens 256 -q
  step compress_bitdelta $D compress $A/base $A/ft -o $O/bd.dcz --method bitdelta -q
  step compress_ternary $D compress $A/base $A/ft -o $O/tern.dcz --method ternary --ratio 8 -q
  step compress_lowrank $D compress $A/base $A/ft -o $O/lr.dcz --method lowrank --ratio 8 -q
  step compress_auto $D compress $A/base $A/ft -o $O/auto.dcz --method auto --ratio 8 -q
  step calib_svd $D compress $A/base $A/ft -o $O/svdc.dcz --ratio 8 --calib shakespeare --calib-samples 4 \
      --calib-len 32 --calib-tune-steps 2 -q
  step calib_bd $D compress $A/base $A/ft -o $O/bdc.dcz --method bitdelta --calib shakespeare \
      --calib-samples 4 --calib-len 32 --calib-steps 2 -q
  step export_lora $D export-lora --delta $O/lr.dcz -o $O/lora
  step export_lora_svd $D export-lora $A/base $A/ft -o $O/lora2 --rank 4
  step generate $D generate $A/base --delta $O/svd.dcz --delta $O/bd.dcz --prompt Hello --prompt Hi \
      --prompt-delta 0 --prompt-delta 1 --max-new-tokens 4
}
for a in "$ROOT"/*/; do echo "== $(basename "$a")"; run_pair "${a%/}"; done
