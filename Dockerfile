# One image for every freshtower component; docker-compose.yml picks the
# subcommand per service.
FROM python:3.11-slim
WORKDIR /app
# CPU build of torch, pinned, before anything else can pull a CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY freshtower freshtower
COPY streams streams
COPY trainer trainer
COPY publisher publisher
RUN pip install --no-cache-dir .
ENV FRESHTOWER_DATA_DIR=/data
ENTRYPOINT ["freshtower"]
