# masqd container image. Build it with scripts/docker-build, which makes the base
# image locally (debootstrap bookworm minbase + python3 + iproute2, `docker import`)
# and puts wheels of masqd and its dependencies in the build context: nothing is
# fetched during the build (pip runs with --no-index).
#
# Run (needs CAP_NET_ADMIN and /dev/net/tun for the TAP devices; masqd itself then
# runs as the unprivileged user "masqd" with only CAP_NET_ADMIN):
#   docker run --cap-add NET_ADMIN --device /dev/net/tun --network lan ... masqd:latest
#   docker network connect wan <container>
ARG BASE=masqd-base:bookworm
FROM ${BASE}

COPY wheels/ /tmp/wheels/
RUN python3 -m venv /opt/masqd \
 && /opt/masqd/bin/pip install --no-index --no-cache-dir --disable-pip-version-check \
      --find-links /tmp/wheels masqd \
 && rm -rf /tmp/wheels \
 && useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin masqd \
 && mkdir -p /etc/masqd /run/masqd

COPY deploy/docker-entrypoint.py /usr/local/bin/masqd-entrypoint

ENV PATH=/opt/masqd/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    MASQD_METRICS_LISTEN=0.0.0.0:9598

EXPOSE 9598
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python3", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9598/healthz', timeout=2).status == 200 else 1)"]

ENTRYPOINT ["python3", "/usr/local/bin/masqd-entrypoint"]
CMD ["run"]
