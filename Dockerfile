# syntax=docker/dockerfile:1
# One image for every role of the pipeline: `eventpipe bridge|worker|migrate|dlq`, the web API
# under gunicorn, and Flower. docker-compose.yml picks the command and defines health checks.
#
# Both stages use the same base so the venv's interpreter links stay valid. Bookworm, not the
# moving `3.11-slim` tag: Microsoft's apt repository is per Debian release.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# A compiler and the ODBC headers, for any dependency without a wheel for this platform.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential unixodbc-dev \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY . .
# gunicorn serves the web API (`eventpipe web` runs it too, with the same configuration).
RUN pip install --upgrade pip \
    && pip wheel --no-deps --wheel-dir /wheels . \
    && pip install /wheels/*.whl


FROM ${PYTHON_IMAGE} AS runtime

# Microsoft ODBC Driver 18 for SQL Server, from Microsoft's Debian repository.
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && . /etc/os-release \
    && curl -fsSL -o /tmp/packages-microsoft-prod.deb \
        "https://packages.microsoft.com/config/debian/${VERSION_ID}/packages-microsoft-prod.deb" \
    && dpkg -i /tmp/packages-microsoft-prod.deb \
    && rm /tmp/packages-microsoft-prod.deb \
    && apt-get update \
    && ACCEPT_EULA=Y apt-get install -y --no-install-recommends msodbcsql18 unixodbc \
    && apt-get purge -y --auto-remove curl \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 eventpipe \
    && useradd --system --uid 10001 --gid eventpipe --home-dir /app --shell /usr/sbin/nologin \
        eventpipe

COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
# For `alembic upgrade head` from /app (`eventpipe migrate` carries its own copy).
COPY --chown=root:root alembic.ini ./
COPY --chown=root:root alembic ./alembic

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER eventpipe:eventpipe

EXPOSE 8000 9101 9102 5555

# The metrics directory is named before gunicorn loads its configuration from the `web`
# package, whose import loads prometheus_client (see web/gunicorn_conf.py).
CMD ["env", "PROMETHEUS_MULTIPROC_DIR=/tmp/eventpipe-web-metrics", \
     "gunicorn", "--config", "python:web.gunicorn_conf", "web.wsgi:app"]
