# aded_ray image for KubeRay: Ray 2.60 (Python 3.11), the project with its pinned dependencies, the default
# model converted to safetensors and the default ShareGPT store, all baked in (nothing is fetched at run time).
#   docker build -t aded-ray:0.1.0 .
# For GPU nodes use a CUDA base (e.g. rayproject/ray:2.60.0-py311-cu128) and a CUDA torch 2.13.0 wheel
# in place of the CPU pin (see requirements.txt).
FROM rayproject/ray:2.60.0-py311-cpu

ENV ADED_CACHE_DIR=/opt/aded/cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_NO_CACHE_DIR=1
WORKDIR /opt/aded/src
COPY requirements.txt requirements-nodeps.txt pyproject.toml README.md ./
RUN pip install torch==2.13.0 -r requirements.txt \
 && pip install --no-deps -r requirements-nodeps.txt
COPY aded_ray ./aded_ray
COPY deployments ./deployments
RUN pip install --no-deps . \
 && python -c "from aded_ray.verify.loading import resolve_model; print(resolve_model())" \
 && aded build-store --corpus sharegpt --quiet \
 && python -c "import aded_ray.draft.best, aded_ray.draft.mcts"
EXPOSE 8000 8080 8265 6379 10001
