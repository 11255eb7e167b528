# The HTTP-overhead part of the serving bench on the GPU machine's 16 idle cores (CPU replica).
source bench/device/setup.sh
timeout 560 python3 bench/bench_serve.py --parts http 2>&1 | tee $OUT/serve.log
