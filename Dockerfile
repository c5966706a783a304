# parallel3d on a CUDA PyTorch base image; the entrypoint is the launcher (python -m launch → torchrun).
#   docker build -t parallel3d .
#   docker run --gpus all --ipc=host parallel3d --config configs/quickstart.yaml device=cuda
# The base is the torch CI tests (2.13.0, the floor in pyproject.toml) in the CUDA build PyPI's torch
# 2.13.0 wheel uses (CUDA 13.0, cuDNN 9); tags read <torch>-cuda<major.minor>-cudnn<major>-runtime.
# With an older torch in the base, `pip install` below would fetch a second, multi-GB torch.
FROM pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
WORKDIR /opt/parallel3d
COPY pyproject.toml README.md ./
COPY parallel ./parallel
COPY launch ./launch
COPY examples ./examples
COPY configs ./configs
RUN pip install --no-cache-dir -e ".[hf]"
ENV PYTHONPATH=/opt/parallel3d
ENTRYPOINT ["python", "-m", "launch"]
CMD ["--config", "configs/quickstart.yaml"]
