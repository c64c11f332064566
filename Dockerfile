# The cluster image: CUDA, the project's pinned versions, `deepspeed launch/run.py` as the way in.
#   docker build -t distill-engine .
#   docker run --gpus all --ipc=host -v /data:/data -v $PWD/runs:/work/runs distill-engine \
#       --num_gpus 8 launch/run.py --spec jobs/fd_clip_vitb.yaml
# Ubuntu 22.04 ships python3.11 (the version the pins are tested with); 24.04 does not.
FROM nvidia/cuda:13.0.0-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev build-essential git openssh-client pdsh \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /work
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python3.11 -m venv /opt/venv && pip install --upgrade pip setuptools wheel ninja

# Same pins as scripts/bootstrap.sh: torch first, then deepspeed built against it.
COPY requirements/ requirements/
RUN pip install -r requirements/torch.txt
# CUDA ops that distillation uses are built into the image so that no rank compiles at start-up.
RUN DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 DS_BUILD_UTILS=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    pip install --no-build-isolation -r requirements/deepspeed.txt

COPY pyproject.toml README.md ./
COPY distill_engine/ distill_engine/
COPY data_shards/ data_shards/
RUN pip install -e .
COPY launch/ launch/
COPY ds_configs/ ds_configs/
COPY jobs/ jobs/

# Multi-node: mount a hostfile and pass --hostfile /etc/hostfile (see README).
ENTRYPOINT ["deepspeed"]
CMD ["--num_gpus", "1", "launch/run.py", "--spec", "jobs/quickstart.yaml", "--check"]
