"""Where a run's files live: a local directory or a URL (gs://bucket/run), written the same way.

A local workdir is resolved once (`~` expanded, made absolute: orbax refuses relative paths)
and written in place. A URL is never turned into a local path: orbax gets it as it is (it
writes buckets natively), and every other file of the run is written to a local mirror
(`$VLCAL_CACHE`, default `~/.cache/vlcal_jax/mirror/<scheme>/<bucket>/<path>`) and published
to the URL through fsspec (gcsfs for gs://), so metric logs, TensorBoard events, evaluation
reports, plots, the exported model and the summary all end up under the URL. A restarted run
on another machine fetches what it needs (tokenizer, metric log) back from the URL.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil

log = logging.getLogger("vlcal_jax.train")


def is_url(path: str) -> bool:
    """True for `scheme://...` paths (gs://, s3://, ...), which are never touched locally."""
    return "://" in str(path)


def resolve(path: str) -> str:
    """A URL unchanged; a local path with `~` expanded and made absolute."""
    path = os.fspath(path)
    if not path:
        raise ValueError("empty path: set config.workdir (a directory or a gs:// URL)")
    return path if is_url(path) else os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def _fs(url: str):
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        scheme = url.split("://", 1)[0]
        hint = " (pip install gcsfs for gs://)" if scheme in ("gs", "gcs") else ""
        raise ValueError(f"{url}: no filesystem for {scheme}:// is installed{hint}: {e}") from e
    return fs, path


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    return fs.exists(p)


def read_text(path: str) -> str:
    if not is_url(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    fs, p = _fs(path)
    with fs.open(p, "r", encoding="utf-8") as f:
        return f.read()


def mirror_dir(url: str) -> str:
    """The local directory that stands for `url` while the run writes."""
    cache = os.path.expanduser(os.environ.get("VLCAL_CACHE", os.path.join("~", ".cache", "vlcal_jax")))
    scheme, rest = url.split("://", 1)
    return os.path.join(cache, "mirror", scheme, *[p for p in rest.split("/") if p not in ("", ".", "..")])


def upload(local: str, url: str) -> None:
    """Copies a local file or directory tree to `url` (overwriting)."""
    fs, p = _fs(url)
    if os.path.isdir(local):
        for root, _, files in os.walk(local):
            rel = os.path.relpath(root, local)
            target = p if rel == "." else posixpath.join(p, *rel.split(os.sep))
            fs.makedirs(target, exist_ok=True)
            for name in files:
                fs.put_file(os.path.join(root, name), posixpath.join(target, name))
    else:
        fs.makedirs(posixpath.dirname(p), exist_ok=True)
        fs.put_file(local, p)


def download(url: str, local: str) -> bool:
    """Copies `url` (a file or a directory tree) to `local`; False when it does not exist."""
    fs, p = _fs(url)
    if not fs.exists(p):
        return False
    if fs.isdir(p):
        for path in fs.find(p):
            rel = posixpath.relpath(path, p)
            target = os.path.join(local, *rel.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fs.get_file(path, target)
    else:
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        fs.get_file(p, local)
    return True


class RunDir:
    """A run's directory: `path(...)` is where a file belongs (a URL for remote runs),
    `local(...)` where the process writes it, `publish(...)` makes the two agree."""

    def __init__(self, workdir: str):
        self.root = resolve(workdir)
        self.remote = is_url(self.root)
        self.local_root = mirror_dir(self.root) if self.remote else self.root
        os.makedirs(self.local_root, exist_ok=True)

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def local(self, *parts: str) -> str:
        return os.path.join(self.local_root, *parts)

    def publish(self, *parts: str) -> None:
        """Uploads local(*parts) to path(*parts) (a file or a directory); no-op for local runs."""
        if self.remote and os.path.exists(self.local(*parts)):
            upload(self.local(*parts), self.path(*parts))

    def fetch(self, *parts: str) -> bool:
        """Brings path(*parts) into local(*parts) for a remote run; True when local(*parts) exists."""
        if self.remote and not os.path.exists(self.local(*parts)):
            download(self.path(*parts), self.local(*parts))
        return os.path.exists(self.local(*parts))

    def write_text(self, name: str, text: str) -> str:
        """Writes a small file (config, summary) locally and publishes it; returns its path."""
        with open(self.local(name), "w", encoding="utf-8") as f:
            f.write(text)
        self.publish(name)
        return self.path(name)

    def reset_local(self, *parts: str) -> None:
        """Removes a stale local copy (a remote run whose mirror outlived the URL's content)."""
        target = self.local(*parts)
        if self.remote and os.path.exists(target):
            shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
