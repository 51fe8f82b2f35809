# Hotfix Studio, laid out like the Hugging Face Docker Spaces template (a user with uid 1000,
# the app in $HOME/app, port 7860). Local use:
#   docker build -t hotfix .                                  # CPU-only torch wheels (default)
#   docker build --build-arg TORCH_VARIANT=cuda -t hotfix .   # torch from the default index (CUDA on Linux x86_64)
#   docker run -p 7860:7860 -v hotfix-data:/data hotfix       # runs persist in the hotfix-data volume
FROM python:3.11-slim

# cpu: install torch/torchvision from TORCH_INDEX first (falls back to the default index when that
# index cannot be reached); cuda (or anything else): torch comes from the default index with the rest.
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

RUN useradd -m -u 1000 user \
    && mkdir -p /data/runs \
    && chown -R user:user /data

USER user
ENV HOME=/home/user \
    PATH=/home/user/.local/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    HOTFIX_RUNS_DIR=/data/runs
WORKDIR $HOME/app

# Dependencies first (a layer that survives code edits): the matched torch/torchvision pair, pinned
# in requirements.txt, then requirements.txt itself (already-installed `+cpu` builds satisfy `==` pins).
COPY --chown=user requirements.txt ./
RUN if [ "$TORCH_VARIANT" = "cpu" ]; then \
        pip install --index-url "$TORCH_INDEX" --extra-index-url https://pypi.org/simple \
            $(grep -E '^(torch|torchvision)==' requirements.txt) \
        || echo "CPU torch index $TORCH_INDEX not reachable: torch comes from the default index"; \
    fi \
    && pip install -r requirements.txt

COPY --chown=user . $HOME/app
RUN pip install --no-deps -e .

# Run folders (jobs, adapters, logs) live here; mount a volume to keep them across containers.
VOLUME /data
EXPOSE 7860
CMD ["python", "app.py"]
