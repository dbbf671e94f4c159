# NVLM-D on NVIDIA's PyTorch container (CUDA, cuDNN, NCCL and a tuned PyTorch; flash-attn where the image has it).
# Build:  docker build -t nvlm-d .
# Run:    docker run --gpus all --rm nvlm-d                       (the demo, on the built-in tiny model)
#         docker run --gpus all --rm -v ~/.cache/huggingface:/root/.cache/huggingface nvlm-d \
#             chat --model nvidia/NVLM-D-72B --gpus 8 "Hello, who are you?"
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.10-py3
FROM ${BASE_IMAGE}

WORKDIR /opt/nvlm-d
COPY . .
# The base image pins its own PyTorch build (pip constraints); the package only adds what that image lacks.
RUN python -m pip install --no-cache-dir . && nvlm-d --help > /dev/null

ENTRYPOINT ["nvlm-d"]
CMD ["demo"]
