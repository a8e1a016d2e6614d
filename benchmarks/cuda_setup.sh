#!/usr/bin/env bash
# Install MLX's CUDA backend and diffusers from carried files on an offline Linux CUDA machine whose python3 already
# has PyTorch (with its nvidia-* CUDA 13 libraries), then print the environment to use:
#   bash benchmarks/cuda_setup.sh DIR    # DIR holds mlx-*.whl, diffusers-*.whl, importlib_metadata-*.whl and the
#                                          mlx-cuda-13 wheel unpacked, tar.xz-compressed and split in parts
#   export PYTHONPATH=/tmp/site
#   python3 benchmarks/mmdit_step.py --device gpu --dtype bfloat16 --size 1024
set -euo pipefail
dir=$1
site=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$dir"/mlx-*.whl "$dir"/diffusers-*.whl \
    "$dir"/importlib_metadata-*.whl
cat "$dir"/mlxcuda.tar.xz.part-* | xz -d | tar x -C "$site"
# libmlx.so finds the CUDA libraries through $ORIGIN/../../nvidia: point that at PyTorch's copies.
nvidia=$(python3 -c "import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]) + '/nvidia')")
[ -e "$site/nvidia" ] || ln -s "$nvidia" "$site/nvidia"
PYTHONPATH=$site python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), mx.device_info())"
