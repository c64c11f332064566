# One Dockerfile, two images; `deepspeed launch/run.py` is the way into both.
#
# The cluster image (the default): CUDA base, DeepSpeed's CUDA ops built in.
#   docker build -t distill-engine .
#   docker run --gpus all --ipc=host -v /data:/data -v $PWD/runs:/work/runs distill-engine \
#       --num_gpus 8 launch/run.py --spec jobs/fd_clip_vitb.yaml
#
# The CPU image: a plain Debian bookworm base (python3.11), DeepSpeed's shared-memory
# all-reduce op built in, CPU ranks with gloo. scripts/build_image.sh builds it without a
# registry (the base from Debian packages) and runs the quickstart in it.
#   docker build -t distill-engine:cpu --build-arg BASE=debian:bookworm \
#       --build-arg DS_ACCELERATOR=cpu --build-arg DS_OPS=SHM_COMM .
#
# Build arguments:
#   BASE            the base image; it must offer python3.11 through apt (Ubuntu 22.04, Debian 12)
#   DS_ACCELERATOR  the accelerator DeepSpeed builds its ops for: cuda or cpu. It is set
#                   explicitly because a build has no GPU, and DeepSpeed would otherwise
#                   fall back to its CPU accelerator and build CPU ops into the CUDA image.
#   DS_OPS          the DeepSpeed ops to build at install time (DS_BUILD_<OP>=1 each), so that
#                   no rank compiles them at start-up; any op not listed is JIT-built if used.
#   TORCH_CUDA_ARCH_LIST  GPU architectures of the CUDA ops (A100: 8.0, H100: 9.0).
ARG BASE=nvidia/cuda:13.0.0-cudnn-devel-ubuntu22.04
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 LANG=C.UTF-8
# gcc, python3.11-dev and ninja stay in both images: DeepSpeed JIT-builds any op not built here.
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev build-essential git openssh-client pdsh \
    && apt-get clean && rm -rf /var/lib/apt/lists/*

WORKDIR /work
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python3.11 -m venv /opt/venv && pip install --upgrade pip setuptools wheel ninja

# Same pins as scripts/bootstrap.sh: torch first, then deepspeed built against it.
COPY requirements/ requirements/
RUN pip install -r requirements/torch.txt
# Declared here, not above, so that both images share the layers before this one.
ARG DS_ACCELERATOR=cuda
ARG DS_OPS="FUSED_ADAM UTILS"
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
# The build fails unless every op in DS_OPS ends up installed.
RUN export DS_BUILD_OPS=0 DS_ACCELERATOR="$DS_ACCELERATOR" TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" \
    && for op in $DS_OPS; do export "DS_BUILD_$op=1"; done \
    && pip install --no-build-isolation -r requirements/deepspeed.txt \
    && python -c "import os, sys; \
from deepspeed.git_version_info import installed_ops; \
from deepspeed.ops.op_builder.all_ops import ALL_OPS; \
names = {b.BUILD_VAR.removeprefix('DS_BUILD_'): b.name for b in ALL_OPS.values()}; \
missing = [op for op in os.environ['DS_OPS'].split() if not installed_ops.get(names.get(op))]; \
print('DeepSpeed ops built in for', os.environ['DS_ACCELERATOR'] + ':', os.environ['DS_OPS']); \
sys.exit('not built: ' + ' '.join(missing) if missing else 0)"

COPY pyproject.toml README.md ./
COPY distill_engine/ distill_engine/
COPY data_shards/ data_shards/
RUN pip install -e .
COPY launch/ launch/
COPY ds_configs/ ds_configs/
COPY jobs/ jobs/

# Multi-node: mount a hostfile and pass --hostfile /etc/deepspeed/hostfile (see README).
ENTRYPOINT ["deepspeed"]
CMD ["--num_gpus", "1", "launch/run.py", "--spec", "jobs/quickstart.yaml", "--check"]
