# The CPU training benches on the GPU machine's 16 idle cores (results under $OUT).
source bench/device/setup.sh
python3 -c 'import ray, mlflow, deepspeed, torch; print(ray.__version__, mlflow.__version__, deepspeed.__version__, torch.__version__)'
timeout 250 python3 bench/bench_train.py --rounds 2 2>&1 | tee $OUT/train.log
timeout 280 python3 bench/bench_startup.py --runs 2 2>&1 | tee $OUT/startup.log
