# Stand-in for python:3.11-slim (offline verification only; see README.md): Debian 12's Python 3.11 in a venv on
# PATH, so `python`, `pip` and installed console scripts resolve as in the official image (/usr/local/bin there).
FROM standin/debian:bookworm
ENV LANG=C.UTF-8 \
    PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN python3 -m venv /opt/python && python -m pip --version
CMD ["python3"]
