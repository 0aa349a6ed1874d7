"""The project's gunicorn settings without the access log, for every server the benchmark
starts (bare Flask and the hub alike): logging each request is not what is measured."""

from pathlib import Path

exec((Path(__file__).resolve().parent.parent / "gunicorn.conf.py").read_text())  # noqa: S102
accesslog = None
