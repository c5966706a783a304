# parallel3d on a CUDA PyTorch base image; the entrypoint is the launcher (python -m launch → torchrun).
#   docker build -t parallel3d .
#   docker run --gpus all --ipc=host parallel3d --config configs/quickstart.yaml device=cuda
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
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
