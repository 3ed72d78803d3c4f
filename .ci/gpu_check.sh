#!/usr/bin/env bash
# Run on the lent GPU machine (device tool). Stages (default: build tests):
#   build       pip install --no-build-isolation --no-deps .   (and the environment, to env.txt)
#   tests       the whole test suite (TEST_FILES: only these files of tests/), CUDA tests included, from
#               outside the checkout
#   sanitizer   compute-sanitizer memcheck + racecheck on a small case of every kernel's tests (the persistent
#               prototypes' included)
#   e2e         cqil bench for E2E_SHAPES (default the SmolLM2 and LLaMA-7B shapes; E2E_ARGS: more flags),
#               JSON + PNG; benchmarks/generate_eos.py (what generate's eos check costs, SmolLM2)
#   kernels     pytest-benchmark kernel comparisons (benchmarks/; BENCH_K=<-k expression>), as a table
#   demo        cqil demo --tiny on CUDA
#   prefill     benchmarks/prefill_rows.py per PREFILL_SHAPES (default smollm2-135m llama-7b) and PREFILL_ROWS
#               (default "64 256 512 1024 4096"): wall (graph-replayed), eager, device and host ms per length
#   quality     cqil calibrate + cqil eval of SmolLM2 on the shipped corpus on CUDA, timed (CQIL_SMOLLM2_GGUF=<gguf>)
#   kd          benchmarks/kd_domains.py on CUDA: KD_DOMAINS=<dir from benchmarks/domain_texts.py>, KD_GROUPS,
#               KD_TRAIN (corpus or a file), KD_ARGS; KD_UNTIL / KD_RESUME: the training in parts over several calls
#   finetune    cqil finetune of SmolLM2 on CUDA (issue 5): CQIL_SMOLLM2_GGUF=<gguf>, FT_TEXT=<dir with train.txt
#               and held_out.txt from benchmarks/python_docs_text.py>, FT_GROUPS (from_range arguments,
#               default "12 24 2"), FT_ARGS (more cqil finetune flags), FT_TIMEOUT (s, default 500)
#   parallel    all visible GPUs: tests/test_parallel_cuda.py, then benchmarks/parallel_e2e.py under torchrun
#               for each PAR_CONFIGS entry shape/groups (default llama-7b/12-30:2)
#   placements  all visible GPUs (>= 2): benchmarks/placements_e2e.py, one-GPU vs TP vs CQIL vs the hybrid
#               (PLACE_ARGS, default "--shape llama-7b --groups 12-30:2"); one GPU: the one-GPU estimate of 2
#               and 4 ranks (benchmarks/placement_estimate.py, reduction latencies EST_US2 / EST_US4; EST_33B=1: also
#               LLaMA-33B, one rank part at a time, H200 only); one GPU with PLACE_SHARED=1: placements_e2e.py with
#               2 ranks sharing the GPU (its checks against the one-GPU model; timings mean nothing)
#   profile     benchmarks/profile_step.py per PROFILE_SHAPES (default smollm2-135m, PROFILE_GROUPS default none):
#               eager prefill's host/device ops, the graph-replayed prompt's host Python (cProfile), decode kernels
#               (in order too), at PROFILE_BATCH rows (default 1)
#   boundaries  issue 26: benchmarks/layer_slope.py (per-layer fixed cost of our decode, SLOPE_SHAPE default llama-7b,
#               full layer and the TP2/TP4 shard shapes) and benchmarks/persistent_chain.py (the persistent
#               one-launch prototype against a launch per layer; CHAIN_ARGS), benchmarks/persistent_layers.py
#               (every decode stage in one launch against the fused step: LLaMA-7B 4 and 12 layers, 12 with
#               groups of 4 over 2-10, the TP4 shard shape, the per-layer slopes, at each of LAYERS_BATCHES,
#               default 1; SmolLM2 sequential and 2-26:4;
#               LAYERS_ARGS e.g. "--block-n 32 --block-n 64 --programs-per-sm 1 --programs-per-sm 2": a sweep)
#   ring        issue 26: benchmarks/ring_chain.py (the GEMV chain in one CUDA C++ launch with a per-SM shared-memory
#               weight ring, against persistent_chain.py's Triton variants), after its CUDA test, for each RING_CONFIGS
#               entry name:arguments (commas for spaces; default the 7B, 1B and 7B TP4 MLP shapes); RING_ARGS: more
#   ring_batch  issue 26: benchmarks/ring_batch.py (the chain at batch 1 to 32 on the tensor cores, weights packed in
#               fragment order, against the Triton launch-per-layer variants), after its CUDA test; RING_BATCH_ARGS
#   ring_layer  issue 26: benchmarks/ring_layer.py (whole decode layers at batch 1 in one ring launch against our
#               decode step's per-layer slope), after its CUDA tests, for each RING_LAYER_CONFIGS entry name:arguments
#               (commas for spaces; default SmolLM2, LLaMA-3.2-1B, LLaMA-7B and the 7B TP4 shard's layer);
#               RING_LAYER_ARGS (default --diagnose --profile --per-head; e.g. --slots 8:4, --page-positions 32)
#   mix         benchmarks/prompt_mix.py: first-token time over prompts of many lengths, 8 and 64 buckets kept
#   graph_launch issue 24: benchmarks/graph_launch.py (a CUDA graph replay's host time and start latency) and
#               benchmarks/launch_paths.py (one kernel launch's host time by path)
#   graph_launch_ab issue 24: benchmarks/graph_launch.py (GL_ARGS, default SmolLM2's 64-token prompt) of this build and
#               of an older one (HOST_AB_OLD, HOST_AB_NAME as host_ab; each with its own tree's script), alternated
#               ROUNDS times (default 2): the host parts of a prompt's forward, and its host and wall time, build by build
#   variant_ab  issue 26: benchmarks/ab_decode.py's variants alternated in one process (VARIANT_AB_ARGS; default
#               LLaMA-7B, the decode GEMM tuner against triton.autotune for every key, for the LM head alone and for
#               the keys of width 4096 alone: o_proj and the down projection)
#   gemm_configs issue 26: benchmarks/gemm_configs.py, each decode GEMM config timed alone in each launch form
#               (the final norm + LM head too) beside its registers and spills, the launcher's choice and triton.autotune's
#               (GEMM_ARGS, default the three 8-warp configs
#               that spill nothing where their 4-warp twins do: --extra 16,32,128,8,4 --extra 16,16,512,8,4 --extra 16,64,128,8,4)
#   attention_plans issue 24: benchmarks/attention_plans.py, a prompt's attention under other tile plans than the
#               shipped one, beside their registers and spills (ATT_PLAN_ARGS, default LLaMA-7B at 512, 2048 and
#               4096 tokens, plans 64,64,8 64,128,8 128,64,8 128,128,8)
#   decode_ab   issue 26: benchmarks/ab_trees.py running benchmarks/ab_decode.py (decode ms/token) alternately with
#               the older build (HOST_AB_OLD, HOST_AB_NAME as host_ab) and this one, per DECODE_AB_CONFIGS entry
#               shape/groups (default llama-7b/none smollm2-135m/none smollm2-135m/2-26:4), ROUNDS (default 4),
#               DECODE_AB_ARGS (more of ab_decode.py's arguments, e.g. --batch 32); its records are named
#               decode_ab_<shape>_<groups>_vs_<HOST_AB_NAME>.json, the older build installed in /tmp/ab_<HOST_AB_NAME>, so
#               one call may compare with several older builds (the stage run once per HOST_AB_OLD/HOST_AB_NAME)
#   host_ab     issue 24: benchmarks/ab_trees.py, prefill_rows.py run alternately with an older build of the package
#               and this one on the same machine (host times differ by half between machines of one card):
#               HOST_AB_OLD=<carried folder with the older tree: git archive REV | tar -x -C DIR>, HOST_AB_NAME=<REV>,
#               HOST_AB_ARGS (prefill_rows.py's arguments)
# Everything is logged under $OUT (or ./gpu_out); BUNDLE=1 leaves it as one archive, $OUT/results.tgz (the device
# tool brings back at most 8 files). Pass CQIL_COMMIT=<hash>: the copy has no git history.
# Wheels the image lacks (gguf) are carried in .whl/ (see the device tool's README).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
REPO=$PWD
# The commit the build stage was given names the records of every later stage on this machine, in this call or a
# later one (decode_ab and the sweeps wrote "unknown" when only the build had CQIL_COMMIT)
given_commit=${CQIL_COMMIT:-}
[ -z "$given_commit" ] && [ -f /tmp/cqil_commit ] && export CQIL_COMMIT=$(cat /tmp/cqil_commit)
stages=${*:-build tests}
for stage in $stages; do
  case $stage in
  build)
    if [ -n "$given_commit" ]; then echo "$given_commit" > /tmp/cqil_commit; else rm -f /tmp/cqil_commit; unset CQIL_COMMIT; fi
    {
      echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
      echo "commit: ${CQIL_COMMIT:-unknown}"
      echo "command: bash .ci/gpu_check.sh $stages"
      nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
      python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    } 2>&1 | tee "$OUT/env.txt"
    echo "== build" | tee "$OUT/build.log"
    python3 -m pip install --no-build-isolation --no-deps . >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
    cqil info 2>&1 | tee -a "$OUT/env.txt" ;;
  tests)
    echo "== tests (CQIL_AUTOTUNE=0: one GEMM config per shape class)"
    paths="$REPO/tests"; [ -n "${TEST_FILES:-}" ] && paths=$(for f in $TEST_FILES; do echo "$REPO/tests/$f"; done)
    (cd /tmp && CQIL_AUTOTUNE=0 timeout ${TEST_TIMEOUT:-400} python3 -m pytest -q -rfs -p no:cacheprovider \
      --durations=8 $paths ${PYTEST_ARGS:-} 2>&1) | tee "$OUT/pytest.log" | tail -30 ;;
  sanitizer)
    echo "== compute-sanitizer" | tee "$OUT/sanitizer.log"
    for tool in ${SAN_TOOLS:-memcheck racecheck}; do
      for case in "ops/test_group_gemm.py|qkv-bias-2-5-59-83-torch.bfloat16" \
                  "ops/test_group_gemm.py|test_group_down_sum and True-1-7-130-59-torch.float16" \
                  "ops/test_group_gemm.py|test_group_swiglu and bias-3-5-59-83-torch.bfloat16" \
                  "ops/test_group_gemm.py|o-residual-2-37-48-130-torch.bfloat16" \
                  "ops/test_group_gemm.py|test_group_swiglu and norm-3-37-48-130-torch.bfloat16" \
                  "ops/test_group_gemm.py|test_group_down_sum_split_k and 1-96-59-True-torch.bfloat16" \
                  "ops/test_group_gemm.py|test_every_config_the_autotuner_may_choose and bm32" \
                  "ops/test_rope_kv.py|3-2-5-6-2-8-torch.bfloat16" \
                  "ops/test_argmax.py|5-4099-torch.bfloat16" \
                  "ops/test_cache_advance.py|left-padded-2-1100" \
                  "ops/test_attention.py|3-fused-decode-P4-padded-torch.bfloat16" \
                  "ops/test_attention.py|test_the_steps_own_key_is_read_after_rope_kv_writes_it and 3" \
                  "ops/test_attention.py|None-fused-prefill-gqa3-torch.float16" \
                  "ops/test_group_residual.py|residual-2-1-7-59-torch.bfloat16" \
                  "test_persistent_chain.py|cuda" \
                  "test_ring_chain.py|cuda" \
                  "test_ring_batch.py|smallest" \
                  "test_ring_layer.py|stage_bounds and 37" \
                  "test_persistent_layers.py|test_persistent_groups_cuda and False"; do
        file=${case%%|*}; expr=${case#*|}
        # the ring prototypes' watchdogs wait longer: under the sanitizer their kernels run many times slower
        (cd /tmp && CQIL_AUTOTUNE=0 CQIL_RING_PATIENCE_S=120 timeout ${SAN_TIMEOUT:-240} compute-sanitizer --tool $tool \
          --error-exitcode 9 \
          python3 -m pytest -q -p no:cacheprovider "$REPO/tests/$file" -k "$expr" 2>&1; echo "exit $?") \
          | grep -E "passed|failed|deselected|ERROR SUMMARY|exit" | tr '\n' ' ' | sed "s|^|$tool $file $expr: |" \
          | tee -a "$OUT/sanitizer.log"; echo | tee -a "$OUT/sanitizer.log"
      done
    done ;;
  parallel)
    n=$(nvidia-smi -L | wc -l)
    echo "== parallel tests ($n GPUs)"
    (cd /tmp && timeout ${PAR_TEST_TIMEOUT:-300} python3 -m pytest -q -rs -p no:cacheprovider \
      "$REPO/tests/test_parallel_cuda.py" ${PAR_PYTEST_ARGS:-} 2>&1) | tee -a "$OUT/pytest_parallel.log" | tail -15
    for cfg in ${PAR_CONFIGS:-llama-7b/12-30:2}; do
      shape=${cfg%%/*}; groups=${cfg#*/}
      echo "== parallel_e2e $shape $groups on $n GPUs" | tee -a "$OUT/parallel.log"
      timeout ${PAR_TIMEOUT:-300} python3 -m torch.distributed.run --standalone --nproc-per-node $n \
        benchmarks/parallel_e2e.py --shape $shape --groups $groups --repeats ${REPEATS:-5} ${PAR_ARGS:-} \
        --out "$OUT/parallel_${shape}_${n}gpu.json" 2>&1 | grep -v "^W1\|OMP_NUM_THREADS" | tee -a "$OUT/parallel.log"
    done ;;
  placements)
    n=$(nvidia-smi -L | wc -l)
    if [ "$n" -ge 2 ]; then
      timeout ${PLACE_TIMEOUT:-500} python3 -m torch.distributed.run --standalone --nproc-per-node $n \
        benchmarks/placements_e2e.py ${PLACE_ARGS:---shape llama-7b --groups 12-30:2} \
        --out "$OUT/placements_${n}gpu.json" 2>&1 | grep -v "^W1\|OMP_NUM_THREADS" | tee -a "$OUT/placements.log"
    elif [ "${PLACE_SHARED:-0}" = 1 ]; then  # one GPU: placements_e2e.py's protocols and checks, 2 ranks sharing it
      timeout ${PLACE_TIMEOUT:-300} python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
        benchmarks/placements_e2e.py --one-gpu-shared ${PLACE_ARGS:---shape llama-3.2-1b --groups 2-14:2} --rounds 2 \
        --new 16 --greedy 8 --out "$OUT/placements_shared.json" 2>&1 | grep -v "^W1\|OMP_NUM_THREADS" \
        | tee -a "$OUT/placements.log"
    else
      timeout ${PLACE_TIMEOUT:-240} python3 benchmarks/placement_estimate.py --shape llama-7b --world 2 \
        --groups 12-30:2 --reduce-us ${EST_US2:-5.0} --rounds ${ROUNDS:-2} --out "$OUT/estimate_llama-7b_2.json" \
        2>&1 | tee -a "$OUT/placements.log"
      timeout ${PLACE_TIMEOUT:-240} python3 benchmarks/placement_estimate.py --shape llama-7b --world 4 \
        --groups 14-30:4 --split-groups 12-30:2 --reduce-us ${EST_US4:-7.5} --rounds ${ROUNDS:-2} \
        --out "$OUT/estimate_llama-7b_4.json" 2>&1 | tee -a "$OUT/placements.log"
      if [ "${EST_33B:-0}" = 1 ]; then  # one rank part at a time beside the one-GPU model: needs an H200
        timeout ${PLACE_TIMEOUT:-240} python3 benchmarks/placement_estimate.py --shape llama-33b --world 2 \
          --groups 22-56:2 --reduce-us ${EST_US2:-5.0} --rounds ${ROUNDS:-2} --one-at-a-time \
          --out "$OUT/estimate_llama-33b_2.json" 2>&1 | tee -a "$OUT/placements.log"
        timeout ${PLACE_TIMEOUT:-240} python3 benchmarks/placement_estimate.py --shape llama-33b --world 4 \
          --groups 24-56:4 --split-groups 22-56:2 --reduce-us ${EST_US4:-7.5} --rounds ${ROUNDS:-2} --one-at-a-time \
          --out "$OUT/estimate_llama-33b_4.json" 2>&1 | tee -a "$OUT/placements.log"
      fi
    fi ;;
  e2e)
    echo "== cqil bench"
    for shape in ${E2E_SHAPES:-smollm2-135m llama-7b}; do
      timeout ${E2E_TIMEOUT:-300} cqil bench --shape $shape --repeats ${REPEATS:-5} ${E2E_ARGS:-} \
        --out "$OUT/bench_${shape}.json" 2>&1 \
        | tee -a "$OUT/e2e.log"
    done
    # what an eos check costs generate (the flag read a step late against the per-step wait), SmolLM2
    timeout ${EOS_TIMEOUT:-180} python3 benchmarks/generate_eos.py --shape smollm2-135m --out "$OUT/generate_eos.json" \
      2>&1 | tee -a "$OUT/e2e.log" ;;
  kernels)
    echo "== kernel benchmarks"
    (cd "$REPO" && timeout ${BENCH_TIMEOUT:-420} python3 -m pytest -q -p no:cacheprovider benchmarks \
      ${BENCH_K:+-k "$BENCH_K"} --benchmark-json="$OUT/kernels.json" --benchmark-disable-gc 2>&1 | tail -5)
    python3 benchmarks/summarize.py "$OUT/kernels.json" | tee "$OUT/kernels.md" ;;
  finetune)
    python3 -c "import sys; from cqil_kernels import CQILConfig; CQILConfig.from_range(*map(int, sys.argv[2:])).save(sys.argv[1])" \
      "$OUT/groups.json" ${FT_GROUPS:-12 24 2}
    echo "command: cqil finetune \$CQIL_SMOLLM2_GGUF --cqil groups.json (from_range ${FT_GROUPS:-12 24 2}) --text train.txt --eval-text held_out.txt --device cuda --dtype float32 ${FT_ARGS:-}" | tee "$OUT/finetune.log"
    (TQDM_MININTERVAL=10 timeout ${FT_TIMEOUT:-500} python3 -m cqil_kernels finetune "$CQIL_SMOLLM2_GGUF" \
      --cqil "$OUT/groups.json" --text "$FT_TEXT/train.txt" --eval-text "$FT_TEXT/held_out.txt" --device cuda \
      --dtype float32 --out "$OUT/finetune" --overwrite ${FT_ARGS:-} 2>&1; echo "exit $?") | tee -a "$OUT/finetune.log" | tail -12
    rm -f "$OUT/finetune/checkpoint.safetensors" ;;
  quality)
    # issue 25: cqil calibrate and cqil eval of SmolLM2 on the shipped corpus, on CUDA, timed (goal: calibrate < 2 min)
    # QUALITY_TWICE=1: calibrate once more after eval, a later process with Triton's caches (compiled kernels,
    # autotune timings) warm
    mkdir -p "$OUT/calibrate"
    calibrate="calibrate $CQIL_SMOLLM2_GGUF --parallel 2 --max-ppl-increase 0.05 --out $OUT/calibrate/groups.json"
    cmds=("$calibrate" "eval $CQIL_SMOLLM2_GGUF --cqil $OUT/calibrate/groups.json")
    [ "${QUALITY_TWICE:-0}" = 1 ] && cmds+=("$calibrate")
    for cmd in "${cmds[@]}"; do
      start=$(date +%s%N)
      (TQDM_MININTERVAL=10 timeout ${QUALITY_TIMEOUT:-400} cqil $cmd --device cuda 2>&1; echo "exit $?") \
        | tee -a "$OUT/quality.log" | tail -15
      echo "cqil $cmd --device cuda: $(( ($(date +%s%N) - start) / 1000000 )) ms wall" | tee -a "$OUT/quality.log"
    done ;;
  kd)
    # issue 25, item 4: benchmarks/kd_domains.py on CUDA. KD_DOMAINS=<folder from benchmarks/domain_texts.py, carried>,
    # KD_GROUPS (from_range arguments, default "12 24 2"), KD_TRAIN (corpus or a file), KD_ARGS (the H100 run's
    # schedule: --steps 1500 --batch 16 --lora-rank 16; recompute is off by default). Training runs ~0.31 s a step
    # of 16 x 512 on the H100 (d1a3c1f); that run spent ~7 minutes before its first step (the measurements then ran
    # on the fused kernels; the torch backend since 825cfd5) and was cut at step 300 of 1200 by its 530 s timeout.
    # The script prints each phase's time and its rate every 100 steps. Where one call's limit is too short: the
    # adapter is always saved in /tmp/kd_adapter, and KD_ADAPTER=/tmp/kd_adapter in a later call of the same warm
    # machine measures it without training
    python3 -c "import sys; from cqil_kernels import CQILConfig; CQILConfig.from_range(*map(int, sys.argv[2:])).save(sys.argv[1])" \
      "$OUT/kd_groups.json" ${KD_GROUPS:-12 24 2}
    # Training in parts (one call each, on the same warm machine): KD_UNTIL=N trains steps 1..N into
    # /tmp/kd_checkpoint.st and stops; KD_RESUME=1 (with KD_UNTIL=M, or to the end, then measured) goes on from it
    if [ -n "${KD_ADAPTER:-}" ]; then kd_what="--adapter $KD_ADAPTER"
    else
      [ "${KD_RESUME:-0}" = 1 ] || rm -f /tmp/kd_checkpoint.st
      rm -rf /tmp/kd_adapter; kd_what="--train ${KD_TRAIN:-corpus} --adapter-out /tmp/kd_adapter"
      { [ -n "${KD_UNTIL:-}" ] || [ "${KD_RESUME:-0}" = 1 ]; } && kd_what="$kd_what --checkpoint /tmp/kd_checkpoint.st"
      [ -n "${KD_UNTIL:-}" ] && kd_what="$kd_what --until $KD_UNTIL"
      [ "${KD_RESUME:-0}" = 1 ] && kd_what="$kd_what --resume"
    fi
    (timeout ${KD_TIMEOUT:-540} python3 benchmarks/kd_domains.py "$CQIL_SMOLLM2_GGUF" --cqil "$OUT/kd_groups.json" \
      $kd_what --domains "$KD_DOMAINS" --device cuda --out "$OUT/kd_domains.json" ${KD_ARGS:-} 2>&1; \
      echo "exit $?") | tee "$OUT/kd.log" | tail -20 ;;
  host_ab|decode_ab|graph_launch_ab)
    ab_old=/tmp/ab_${HOST_AB_NAME:-old}  # one folder per older build: several A/Bs may run in one call
    [ -f $ab_old/cqil_kernels/__init__.py ] || CQIL_SKIP_EXTENSION=1 python3 -m pip install -q --no-deps \
      --no-build-isolation --target $ab_old "$HOST_AB_OLD" >> "$OUT/ab_install.log" 2>&1 \
      || { tail -20 "$OUT/ab_install.log"; exit 1; } ;;&
  decode_ab)
    for cfg in ${DECODE_AB_CONFIGS:-llama-7b/none smollm2-135m/none smollm2-135m/2-26:4}; do
      shape=${cfg%%/*}; groups=${cfg#*/}
      echo "== decode A/B $shape $groups" | tee -a "$OUT/decode_ab.log"
      timeout ${DECODE_AB_TIMEOUT:-300} python3 benchmarks/ab_trees.py --old $ab_old --old-name "${HOST_AB_NAME:-old}" \
        --script benchmarks/ab_decode.py --rounds ${ROUNDS:-4} \
        --out "$OUT/decode_ab_${shape}_${groups/:/-}${HOST_AB_NAME:+_vs_$HOST_AB_NAME}.json" -- \
        --shape $shape --groups $groups --variant base: ${DECODE_AB_ARGS:-} 2>&1 | grep -v "^ \|^{\|^}" | tee -a "$OUT/decode_ab.log"
    done ;;
  host_ab)
    timeout ${HOST_AB_TIMEOUT:-400} python3 benchmarks/ab_trees.py --old $ab_old --old-name "${HOST_AB_NAME:-old}" \
      --rounds ${ROUNDS:-3} --out "$OUT/host_ab${HOST_AB_NAME:+_vs_$HOST_AB_NAME}.json" -- \
      ${HOST_AB_ARGS:---shape smollm2-135m --rows 64 --rows 512 --rows 4096 --variant base: --repeats 5} 2>&1 \
      | grep -v "^ \|^{\|^}" | tee -a "$OUT/host_ab.log" ;;
  prefill)
    for shape in ${PREFILL_SHAPES:-smollm2-135m llama-7b}; do
      rows=""; for T in ${PREFILL_ROWS:-64 256 512 1024 4096}; do rows="$rows --rows $T"; done
      timeout ${PREFILL_TIMEOUT:-240} python3 benchmarks/prefill_rows.py --shape $shape $rows --variant base: \
        --rounds ${ROUNDS:-1} --repeats ${REPEATS:-5} --out "$OUT/prefill_rows_$shape.json" 2>&1 \
        | grep -v "^ \|^{\|^}" | tee -a "$OUT/prefill.log"
    done ;;
  boundaries)
    timeout ${SLOPE_TIMEOUT:-240} python3 benchmarks/layer_slope.py --shape ${SLOPE_SHAPE:-llama-7b} --tp 1 --tp 2 \
      --tp 4 --out "$OUT/layer_slope.json" 2>&1 | tee -a "$OUT/boundaries.log"
    for b in ${CHAIN_BATCHES:-1 8}; do
      timeout ${CHAIN_TIMEOUT:-120} python3 benchmarks/persistent_chain.py --batch $b ${CHAIN_ARGS:-} \
        --out "$OUT/persistent_chain_b$b.json" 2>&1 | tee -a "$OUT/boundaries.log"
    done
    for b in ${LAYERS_BATCHES:-1}; do
      timeout ${LAYERS_TIMEOUT:-360} python3 benchmarks/persistent_layers.py --shape llama-7b --run 4 --run 12 \
        --run 12/2-10:4 --tp 1 --tp 4 --batch $b ${LAYERS_ARGS:-} --out "$OUT/persistent_layers_llama-7b_b$b.json" \
        2>&1 | tee -a "$OUT/boundaries.log"
    done
    timeout ${LAYERS_TIMEOUT:-240} python3 benchmarks/persistent_layers.py --shape smollm2-135m --run 30 \
      --run 30/2-26:4 --block-k 64 ${LAYERS_ARGS:-} --out "$OUT/persistent_layers_smollm2.json" 2>&1 \
      | tee -a "$OUT/boundaries.log" ;;
  ring)
    (cd /tmp && timeout 300 python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_ring_chain.py" 2>&1) \
      | tail -3 | tee -a "$OUT/ring.log"
    # name:arguments, one record each: the 7B MLP's shapes, the 1B's, and the 7B TP4 shard's MLP (F / 4)
    for cfg in ${RING_CONFIGS:-7b: 1b:--dims,2048,8192,--layers,2,--layers,16 tp4:--dims,4096,2752,--block-k,64,--layers,2,--layers,16}; do
      name=${cfg%%:*}; args=${cfg#*:}
      timeout ${RING_TIMEOUT:-240} python3 benchmarks/ring_chain.py ${args//,/ } ${RING_ARGS:-} \
        --out "$OUT/ring_chain_$name.json" 2>&1 | tee -a "$OUT/ring.log"
    done ;;
  ring_batch)
    (cd /tmp && timeout 300 python3 -m pytest -q -rf -p no:cacheprovider "$REPO/tests/test_ring_batch.py" 2>&1) \
      | tail -40 | tee -a "$OUT/ring_batch.log"
    timeout ${RING_TIMEOUT:-300} python3 benchmarks/ring_batch.py ${RING_BATCH_ARGS:-} --out "$OUT/ring_batch.json" 2>&1 \
      | tee -a "$OUT/ring_batch.log" ;;
  ring_layer)
    (cd /tmp && timeout 300 python3 -m pytest -q -rf -p no:cacheprovider "$REPO/tests/test_ring_layer.py" 2>&1) \
      | tail -40 | tee -a "$OUT/ring_layer.log"
    # name:arguments, one record each (commas for spaces): SmolLM2, LLaMA-3.2-1B, LLaMA-7B and the 7B TP4 shard's layer
    for cfg in ${RING_LAYER_CONFIGS:-smollm2:--shape,smollm2-135m 1b:--shape,llama-3.2-1b 7b:--shape,llama-7b tp4:--shape,llama-7b,--tp,4}; do
      name=${cfg%%:*}; args=${cfg#*:}
      timeout ${RING_TIMEOUT:-300} python3 benchmarks/ring_layer.py ${args//,/ } ${RING_LAYER_ARGS:---diagnose --profile --per-head} \
        --out "$OUT/ring_layer_$name.json" 2>&1 | tee -a "$OUT/ring_layer.log"
    done ;;
  variant_ab)
    # settings compared in one process (benchmarks/ab_decode.py), e.g. the decode GEMM tuner against triton.autotune
    timeout ${VARIANT_AB_TIMEOUT:-400} python3 benchmarks/ab_decode.py ${VARIANT_AB_ARGS:---shape llama-7b --groups none \
      --variant tuner: --variant autotuner:GEMM_AUTOTUNED=all --variant head-autotuned:GEMM_AUTOTUNED=32000 \
      --variant width-4096-autotuned:GEMM_AUTOTUNED=4096 --rounds 4} --out "$OUT/variant_ab.json" 2>&1 | grep -v "^ \|^{\|^}" | tee -a "$OUT/variant_ab.log" ;;
  gemm_configs)
    timeout ${GEMM_TIMEOUT:-500} python3 benchmarks/gemm_configs.py ${GEMM_ARGS:---extra 16,32,128,8,4 --extra 16,16,512,8,4 \
      --extra 16,64,128,8,4} --out "$OUT/gemm_configs.json" 2>&1 \
      | tee -a "$OUT/gemm_configs.log" ;;
  attention_plans)
    timeout ${ATT_PLAN_TIMEOUT:-400} python3 benchmarks/attention_plans.py ${ATT_PLAN_ARGS:---shape llama-7b --rows 512 \
      --rows 2048 --rows 4096 --plan 64,64,8 --plan 64,128,8 --plan 128,64,8 --plan 128,128,8} \
      --out "$OUT/attention_plans.json" 2>&1 | tee -a "$OUT/attention_plans.log" ;;
  graph_launch)
    # issue 24: what a CUDA graph replay costs before the GPU starts (synthetic graphs and the prompt buckets)
    timeout ${GL_TIMEOUT:-240} python3 benchmarks/graph_launch.py --out "$OUT/graph_launch.json" 2>&1 \
      | tee -a "$OUT/graph_launch.log"
    # and what one launch costs the host by path (op, Triton's JIT, the compiled launcher, a graph)
    timeout 60 python3 benchmarks/launch_paths.py --out "$OUT/launch_paths.json" 2>&1 | tee -a "$OUT/graph_launch.log" ;;
  graph_launch_ab)
    for round in $(seq ${ROUNDS:-2}); do
      for who in new old; do
        if [ $who = old ]; then dir=$(cd "$REPO" && cd "$HOST_AB_OLD" && pwd); pp=$ab_old${PYTHONPATH:+:$PYTHONPATH}
          commit=${HOST_AB_NAME:-old}
        else dir=$REPO; pp=${PYTHONPATH:-}; commit=${CQIL_COMMIT:-unknown}; fi
        (cd "$dir" && PYTHONPATH=$pp CQIL_COMMIT=$commit timeout ${GL_TIMEOUT:-150} python3 benchmarks/graph_launch.py \
          ${GL_ARGS:---nodes 16 --shape smollm2-135m --rows 64 --repeats 12} --out "$OUT/graph_launch_${who}_$round.json" \
          2>&1 | tail -40 > "$OUT/graph_launch_${who}_$round.log")
        echo "== graph_launch $who ($commit), round $round" | tee -a "$OUT/graph_launch_ab.log"
        grep -E "prompt|check_inputs|generate\(|forward into|new_cache" "$OUT/graph_launch_${who}_$round.log" \
          | tee -a "$OUT/graph_launch_ab.log"
      done
    done ;;
  mix)
    # issue 24: first-token time over prompts of many lengths, by the prompt buckets kept (8 and 64)
    timeout ${MIX_TIMEOUT:-240} python3 benchmarks/prompt_mix.py --shape ${MIX_SHAPE:-smollm2-135m} \
      --out "$OUT/prompt_mix.json" 2>&1 | tee -a "$OUT/mix.log" ;;
  profile)
    for shape in ${PROFILE_SHAPES:-smollm2-135m}; do
      timeout ${PROFILE_TIMEOUT:-180} python3 benchmarks/profile_step.py --shape $shape --groups ${PROFILE_GROUPS:-none} \
        --prompt ${PROFILE_PROMPT:-512} --batch ${PROFILE_BATCH:-1} --rows 20 2>&1 | tee -a "$OUT/profile.log"
    done ;;
  demo)
    timeout 90 cqil demo --tiny --device cuda --dtype bfloat16 2>&1 | tee "$OUT/demo.log" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
if [ "${BUNDLE:-0}" = 1 ]; then  # the device tool brings back at most 8 files: everything as one archive
  tar -czf /tmp/gpu_check_results.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete \
    && mv /tmp/gpu_check_results.tgz "$OUT/results.tgz" && ls -l "$OUT"
fi
