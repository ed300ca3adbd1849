# The saber image: one wheel, three entry points (`saber operator`, `saber sidecar`,
# `saber emulator`), run as a non-root user. Build: docker build -t ghcr.io/saber-serving/saber:0.1.0 .
FROM python:3.11-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2
COPY pyproject.toml README.md ./
COPY cli ./cli
COPY emulator ./emulator
COPY sidecar ./sidecar
COPY operator ./operator
COPY bench ./bench
RUN python -m build --wheel --outdir /wheels

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1
COPY --from=build /wheels /wheels
RUN pip install "$(ls /wheels/saber-*.whl)[sidecar,operator,emulator]" && rm -rf /wheels \
    && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin saber
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8080
ENTRYPOINT ["saber"]
CMD ["--help"]
