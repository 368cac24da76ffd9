# Source on the GPU box (the recipe: BENCHMARKS.md §4): installs the carried wheels (.whl/ or /tmp/w),
# makes qllm_kernels importable, and joins a model sent in parts to /tmp/q (p00, p01, ...) into /tmp/q/model.gguf.
#   . benchmarks/gpu_box.sh && quickllama_bench --model /tmp/q/model.gguf --device cuda ...
set -e
mkdir -p /tmp/w && cp .whl/*.whl /tmp/w/ 2>/dev/null || true  # the wheels may have come in an earlier call
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/w/*.whl
ln -sfn "$PWD/kernels" /tmp/site/qllm_kernels
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
if ls /tmp/q/p?? >/dev/null 2>&1 && [ ! -f /tmp/q/model.gguf ]; then
  cat /tmp/q/p?? > /tmp/q/model.gguf && sha256sum /tmp/q/model.gguf | cut -c1-16
fi
quickllama_bench() { python3 -m benchmarks.cli "$@"; }
set +e
