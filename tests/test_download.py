"""Cached, checksummed, atomic downloads (file:// URLs stand in for the CDN)."""

import hashlib
import os

import pytest

from t2f.download import DownloadError, WeightSource, fetch


def source_for(path, sha):
    return WeightSource(url=path.as_uri(), filename="weights.pkl", sha256=(sha,), licence="test", flag="--generator")


def test_download_verifies_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("T2F_OFFLINE", "0")
    payload = os.urandom(3 << 20)
    remote = tmp_path / "remote.pkl"
    remote.write_bytes(payload)
    cache = tmp_path / "cache"
    got = fetch(source_for(remote, hashlib.sha256(payload).hexdigest()), cache, progress=False)
    assert got == cache / "weights.pkl" and got.read_bytes() == payload
    remote.unlink()  # a second call uses the cache, not the network
    assert fetch(source_for(remote, "unused"), cache, progress=False) == got


def test_checksum_mismatch_caches_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("T2F_OFFLINE", "0")
    remote = tmp_path / "remote.pkl"
    remote.write_bytes(b"not the published file")
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="not the published checksum"):
        fetch(source_for(remote, "0" * 64), cache, progress=False)
    assert list(cache.iterdir()) == []


def test_unreachable_url_names_file_url_and_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("T2F_OFFLINE", "0")
    missing = tmp_path / "nowhere.pkl"
    with pytest.raises(DownloadError) as info:
        fetch(source_for(missing, "0" * 64), tmp_path / "cache", progress=False)
    message = str(info.value)
    assert "weights.pkl" in message and missing.as_uri() in message and "--generator" in message
    assert list((tmp_path / "cache").iterdir()) == []


def test_offline_mode_fails_at_once(tmp_path):
    with pytest.raises(DownloadError, match="T2F_OFFLINE=1"):
        fetch(source_for(tmp_path / "x.pkl", "0" * 64), tmp_path / "cache", progress=False)
