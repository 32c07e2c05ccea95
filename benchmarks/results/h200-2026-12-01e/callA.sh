#!/usr/bin/env bash
# Next session, call 1 (issue 14, ~7 min; not yet run). Does `risd` beat `ar` at C = 64? This session's
# C = 64 `ar` figures moved 24,000-33,000 tok/s from engine to engine. Here one engine runs ar, risd fixed and
# risd adaptive three times over, interleaved (bench --repeats 3), each run after a full warm-up, so the
# machine's drift falls on every mode alike; then the same at C = 1 and 16, shorter. The adaptive runs also
# check that the up-front step-cost measurement, which now runs each shape's next step as overlap scheduling
# launches it (step_cost.meet_launched_ahead, new, not yet run on a GPU), works there and leaves no capture
# inside the timed runs (decode_shapes and the ITL p99 tell); every bucket's graphs are now captured before
# any run (LLMEngine.prepare_decode_steps), so the Poisson runs at 84 requests/s (issue 14's ITL p99 <= 2.5x
# p50; last measured with the per-step sync and captures inside the runs: ar 2.6x, risd 4.3-4.8x) no longer
# capture as the batch size wanders. Carry [".carry/next_a.sh", ".carry/gguf.last",
# ".whl"] after the c1-c3 chain (bash scripts/gpu_stage.sh makes them).
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 IDLM_CACHE=/tmp/idlm-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -f /tmp/smollm2.gguf ] || cat /tmp/gguf.part* .carry/gguf.last > /tmp/smollm2.gguf
M=/tmp/smollm2.gguf; A=$PWD/idlm/adapters/smollm2-risd; W=$PWD/configs/smollm2/prompts/bench_workload.jsonl
export PYTHONPATH=$PWD:/tmp/site
date -u
timeout 330 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
  --stride-policy fixed,adaptive --concurrency 64 --num-prompts 512 --max-num-seqs 64 --warmup full --repeats 3 \
  --request-rate 84 -o $OUT/bench_c64_repeats.json 2>&1 | grep "^ar \|^risd\|K chosen\|CUDA graphs captured\|req/s"
date -u
timeout 200 python3 -m idlm bench --model $M --adapter $A --stride 4 --workload $W --modes ar,risd \
  --stride-policy fixed,adaptive --concurrency 1,16 --num-prompts 64 --max-num-seqs 64 --warmup full --repeats 2 \
  -o $OUT/bench_c1_c16_repeats.json 2>&1 | grep "^ar \|^risd\|K chosen"
date -u
