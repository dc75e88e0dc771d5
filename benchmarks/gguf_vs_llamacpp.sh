#!/usr/bin/env bash
# perfxlm beside llama.cpp on the same GGUF files, one sitting, engines alternating over ROUNDS
# rounds: decode (32-token prompt, 128 out) and 512-token prefill, then the machine's roofline.
# The figures in docs/performance.md ("1B-class GGUF files beside llama.cpp") come from it.
#   PEERS=~/peers benchmarks/gguf_vs_llamacpp.sh llama1b-Q4_K_M.gguf llama1b-Q8_0.gguf
# Files are looked up in $PEERS; llama.cpp's tools in $PEERS/llamacpp/bin
# (../shared/peers/build_llamacpp.sh builds them, make_llama1b.py makes the 1B model).
set -euo pipefail
PEERS=${PEERS:-$HOME/peers}
ROUNDS=${ROUNDS:-2}
LLAMA_BENCH=$PEERS/llamacpp/bin/llama-bench
[ -x "$LLAMA_BENCH" ] || { echo "no llama-bench in $PEERS/llamacpp/bin: run ../shared/peers/build_llamacpp.sh" >&2; exit 2; }
[ $# -gt 0 ] || { echo "usage: $0 FILE.gguf [FILE.gguf ...] (names in \$PEERS or paths)" >&2; exit 2; }
path() { if [ -f "$1" ]; then echo "$1"; else echo "$PEERS/$1"; fi; }
for round in $(seq "$ROUNDS"); do
    for f in "$@"; do
        model=$(path "$f")
        echo "== round $round $f perfxlm"
        perfxlm bench latency --model "$model" --input-len 32 --output-len 128 --batch-size 1 \
            --num-iters 2 --num-iters-warmup 1 2>&1 | grep -E "TTFT|TPOT|Decode"
        perfxlm bench latency --model "$model" --input-len 512 --output-len 1 --batch-size 1 \
            --num-iters 2 --num-iters-warmup 1 2>&1 | grep -E "TTFT"
        echo "== round $round $f llama.cpp"
        "$LLAMA_BENCH" -m "$model" -p 512 -n 128 -t 2 -fa 0,1 -r 2 2>&1 | grep -E "^\| .*(pp|tg)[0-9]"
    done
done
echo "== roofline"
perfxlm bench roofline --model "$(path "$1")" 2>&1 | grep -v INFO
