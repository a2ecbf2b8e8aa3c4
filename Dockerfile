# aded_ray image for KubeRay, CPU variant: Ray 2.60 (Python 3.11), the project with its pinned runtime
# dependencies, the default model converted to safetensors and the default ShareGPT store, all baked in
# (nothing is fetched at run time). For the head group and for CPU-only clusters:
#   docker build -t aded-ray:0.1.0 .
# The GPU worker group runs the CUDA variant, Dockerfile.cuda (aded-ray:0.1.0-cu128). The two files differ
# only in these comments, the base image and the torch wheel (tests/test_k8s.py keeps it that way).
FROM rayproject/ray:2.60.0-py311-cpu

ENV ADED_CACHE_DIR=/opt/aded/cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_NO_CACHE_DIR=1
WORKDIR /opt/aded/src
COPY requirements.txt requirements-nodeps.txt pyproject.toml README.md ./
# Test and benchmark tools stay out of the image: it installs requirements.txt less DEV_ONLY (jsonschema
# remains as Ray's own dependency, at the base image's version).
ARG DEV_ONLY="pytest scipy jsonschema kubernetes-validate matplotlib draftretriever"
# torch first, the CPU build of the pinned version from PyTorch's CPU index (PyPI's Linux wheel is a CUDA
# build); the requirements' torch==2.13.0 is then already satisfied by 2.13.0+cpu.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && grep -vE "^($(echo $DEV_ONLY | tr ' ' '|'))==" requirements.txt > /tmp/requirements-image.txt \
 && pip install -r /tmp/requirements-image.txt \
 && pip install --no-deps -r requirements-nodeps.txt \
 && python -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0' and torch.version.cuda is None, torch.__version__"
COPY aded_ray ./aded_ray
COPY deployments ./deployments
RUN pip install --no-deps . \
 && python -c "from aded_ray.verify.loading import resolve_model; print(resolve_model())" \
 && aded build-store --corpus sharegpt --quiet \
 && python -c "import aded_ray.draft.best, aded_ray.draft.mcts"
EXPOSE 8000 8080 8265 6379 10001
