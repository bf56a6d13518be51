"""training.storage: workdirs as users write them (relative, ~, gs:// URLs)."""

import os

import pytest

from vlcal_jax.training import storage


def test_local_paths_are_resolved_once_and_urls_never_touched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.resolve("outputs/cpu_demo") == str(tmp_path / "outputs" / "cpu_demo")
    assert storage.resolve("~/runs/a") == str(tmp_path / "home" / "runs" / "a")
    for url in ("gs://bucket/runs/a", "gs://bucket/runs/a/", "s3://b/x"):
        assert storage.resolve(url) == url
    assert storage.join("gs://bucket/run", "checkpoints", "2") == "gs://bucket/run/checkpoints/2"
    with pytest.raises(ValueError, match="workdir"):
        storage.resolve("")


def test_a_url_run_writes_to_a_local_mirror_and_publishes(tmp_path, monkeypatch):
    """memory:// (fsspec's in-memory filesystem) stands in for a bucket."""
    monkeypatch.setenv("VLCAL_CACHE", str(tmp_path / "cache"))
    run = storage.RunDir("memory://bucket/run")
    assert run.remote and run.local_root == str(tmp_path / "cache" / "mirror" / "memory" / "bucket" / "run")
    assert run.path("model", "config.json") == "memory://bucket/run/model/config.json"
    os.makedirs(run.local("model"))
    with open(run.local("model", "config.json"), "w") as f:
        f.write("{}")
    run.publish("model")
    assert run.write_text("summary.json", '{"a": 1}') == "memory://bucket/run/summary.json"
    assert storage.read_text("memory://bucket/run/summary.json") == '{"a": 1}'
    assert storage.exists("memory://bucket/run/model/config.json")
    # another machine: an empty mirror fetches from the URL
    monkeypatch.setenv("VLCAL_CACHE", str(tmp_path / "cache2"))
    other = storage.RunDir("memory://bucket/run")
    assert not os.path.exists(other.local("model"))
    assert other.fetch("model") and os.path.exists(other.local("model", "config.json"))
    assert not other.fetch("missing")


def test_local_run_writes_in_place(tmp_path):
    run = storage.RunDir(str(tmp_path / "w"))
    assert not run.remote and run.local("x") == run.path("x") == str(tmp_path / "w" / "x")
    run.write_text("a.json", "1")
    assert (tmp_path / "w" / "a.json").read_text() == "1"
    run.publish("a.json")  # a no-op
