"""Mappers on the Hugging Face Hub (`hf-hub:ORG/NAME[@REVISION]`): the Hugging Face cache offline, with no network call;
an in-process Hub behind huggingface_hub's own client online; one line for every failure."""

import hashlib
import json
import os
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import constants
from huggingface_hub.utils import _http

from helpers import assert_one_error_line, tiny_run
from t2f.bank import save_bank
from t2f.engine import load_pipeline
from t2f.engine.cli import main as infer_main
from t2f.engine.serve import main as serve_main
from t2f.export.cli import main as export_main
from t2f.hub import HubError, HubId, HubIdError, parse

REPO = "t2f-test/tiny-run"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CPU = dict(device="cpu", backend="torch", precision="fp32", progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_clip):
    """A run directory (mapper, bank and a file t2f does not read) to publish."""
    run = tiny_run(tmp_path_factory.mktemp("runs") / "run")
    save_bank(run / "bank.safetensors", torch.randn([64, tiny_clip.embed_dim], generator=torch.Generator().manual_seed(0)),
              tiny_clip.name, tiny_clip.fingerprint)
    (run / "README.md").write_text("a card\n")
    return run


def published(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in ("config.json", "model.safetensors", "bank.safetensors", "README.md")}


# ----------------------------------------------------------------------------
# The Hugging Face cache, laid out as huggingface_hub lays it out.


def blob_id(name: str, data: bytes) -> str:
    """A blob's name in the cache: an LFS file's (weights) sha256, any other file's git blob id."""
    if name.endswith(".safetensors"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lay_out(hub_cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT, tree: bool = True) -> Path:
    """models--ORG--NAME/{blobs/ID, snapshots/COMMIT/FILE -> ../../blobs/ID, refs/main (the commit), trees/COMMIT.json}."""
    storage = hub_cache / ("models--" + repo_id.replace("/", "--"))
    for name, data in files.items():
        (storage / "blobs").mkdir(parents=True, exist_ok=True)
        (storage / "blobs" / blob_id(name, data)).write_bytes(data)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../../blobs") / blob_id(name, data))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    if tree:      # huggingface_hub >= 2 records the commit's file list, and refuses a snapshot that lacks a listed file
        listing = {name: dict(size=len(data), blob_id=blob_id(name, data)) for name, data in files.items()}
        (storage / "trees").mkdir(parents=True, exist_ok=True)
        (storage / "trees" / f"{commit}.json").write_text(json.dumps(dict(format_version=1, files=listing)))
    return storage / "snapshots" / commit


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """HF_HOME in a temporary directory, set now (huggingface_hub read its own value at import: t2f reads it per call)."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


@pytest.fixture
def hf_offline(hf_home, monkeypatch):
    """Downloads off through HF_HUB_OFFLINE=1 alone: huggingface_hub's own import-time flag is off, T2F_OFFLINE unset."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("T2F_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return hf_home


def test_hub_ids():
    assert parse("hf-hub:org/name") == HubId("org/name")
    assert parse("hf-hub:Org_1/na.me-2@v1.0") == HubId("Org_1/na.me-2", "v1.0")
    assert parse(f"hf-hub:org/name@{COMMIT}").revision == COMMIT and parse("hf-hub:org/name@refs/pr/3").revision == "refs/pr/3"
    assert str(parse("hf-hub:org/name@main")) == "hf-hub:org/name@main"
    for bad in ("hf-hub:", "hf-hub:name", "hf-hub:a/b/c", "hf-hub:-a/b", "hf-hub:a/b.", "hf-hub:a--b/c", "hf-hub:a..b/c",
                "hf-hub:a/b.git", "hf-hub:a/" + "b" * 97, "hf-hub:a/b c", "hf-hub:a/b@", "hf-hub:a/b@../x", "hf-hub:a/b@x/../../y",
                "hf-hub:a/b@.x", "hf-hub:a/b@x//y", "hf-hub:a/b@x.lock", "hf-hub:a/b@-x", "runs/ffhq"):
        with pytest.raises(HubIdError):
            parse(bad)


def test_a_cached_hub_mapper_loads_offline_with_no_network_call(run, hf_offline, no_network):
    snapshot = lay_out(hf_offline / "hub", REPO, published(run))
    local = load_pipeline(run, **CPU)
    for source in (f"hf-hub:{REPO}", f"hf-hub:{REPO}@main", f"hf-hub:{REPO}@{COMMIT}"):
        hub = load_pipeline(source, bank="", **CPU)
        assert hub.sources.mapper == str(snapshot) and hub.sources.label == source
        a, b = local("a smiling woman", n=3, seed=2), hub("a smiling woman", n=3, seed=2)
        assert torch.equal(a.images, b.images) and torch.equal(a.ws, b.ws)
        assert hub("a smiling woman", n=2, mode="knn").images.shape[0] == 2              # the Hub mapper's bank
    assert no_network == [] and os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE is False


def test_t2f_offline_alone_reads_the_cache_and_sets_no_variable(run, hf_home, monkeypatch, no_network):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    lay_out(hf_home / "hub", REPO, published(run))
    assert load_pipeline(f"hf-hub:{REPO}", **CPU)("a face").images.shape[0] == 1
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is False and no_network == []


def test_t2f_infer_with_a_hub_mapper_gives_the_local_run_s_images(run, hf_offline, tmp_path, run_cli, no_network):
    lay_out(hf_offline / "hub", REPO, published(run))
    args = ["a smiling woman", "--n", 2, "--backend", "torch", "--precision", "fp32"]
    run_cli(infer_main, ["--mapper", f"hf-hub:{REPO}", *args, "--out", "hub.png", "--save-ws", "hub.npy"], tmp_path, expect=0)
    run_cli(infer_main, ["--mapper", run, *args, "--out", "local.png", "--save-ws", "local.npy"], tmp_path, expect=0)
    assert (tmp_path / "hub.npy").read_bytes() == (tmp_path / "local.npy").read_bytes()
    assert no_network == []


def test_an_uncached_id_offline_is_one_line(hf_offline, tmp_path, run_cli, no_network):
    result = run_cli(infer_main, ["--mapper", "hf-hub:t2f-test/missing", "a"], tmp_path)
    assert_one_error_line(result, 1, "hf-hub:t2f-test/missing is not in the Hugging Face cache", str(hf_offline / "hub"),
                          "HF_HUB_OFFLINE=1", "--mapper DIR")
    assert os.listdir(tmp_path) == [] and no_network == []          # nothing written, not even the cache


def test_t2f_serve_resolves_the_hub_mapper_before_triton_starts(hf_offline, tmp_path, run_cli, no_network):
    result = run_cli(serve_main, ["--mapper", "hf-hub:t2f-test/missing", "--device", "cpu"], tmp_path)
    assert_one_error_line(result, 1, "hf-hub:t2f-test/missing is not in the Hugging Face cache")
    # For another machine (NVIDIA's Triton container) the id is written as given, and each pod fetches it.
    run_cli(serve_main, ["--mapper", "hf-hub:t2f-test/missing", "--device", "cpu", "--write-repository", "repo"], tmp_path, expect=0)
    assert '\\"mapper\\": \\"hf-hub:t2f-test/missing\\"' in (tmp_path / "repo" / "t2f" / "config.pbtxt").read_text()


@pytest.mark.parametrize("command", [infer_main, export_main])
@pytest.mark.parametrize("source", ["hf-hub:no-org", "hf-hub:a/b@../../x", "hf-hub:a/b c"])
def test_a_malformed_id_is_a_usage_error(command, source, tmp_path, run_cli, no_network):
    args = ["--mapper", source] + (["--out", "out"] if command is export_main else ["a"])
    assert_one_error_line(run_cli(command, args, tmp_path), 2, "--mapper", source.split("@")[0])
    with pytest.raises(ValueError, match="Hub id|malformed revision"):
        load_pipeline(source)
    assert no_network == []


@pytest.mark.parametrize("tree,fragment", [(False, "holds no model.safetensors"), (True, "is not in the Hugging Face cache")])
def test_a_cached_snapshot_without_the_weights_is_one_line(run, hf_offline, tree, fragment):
    files = published(run)
    snapshot = lay_out(hf_offline / "hub", REPO, files, tree=tree)
    (snapshot / "model.safetensors").unlink()     # an interrupted download; with the commit's listing, hub calls it incomplete
    with pytest.raises(HubError, match=fragment):
        load_pipeline(f"hf-hub:{REPO}", **CPU)


@pytest.mark.parametrize("damage,fragment", [
    (lambda files: files.update({"model.safetensors": files["model.safetensors"][:100]}), "truncated or corrupt"),
    (lambda files: files.update({"config.json": b'{"kind": "t2f-generator"}'}), "not a 't2f-mapper'"),
    (lambda files: files.update({"config.json": b"[" * 100 + b"]" * 100}), "nested deeper"),
])
def test_a_hub_mapper_goes_through_the_local_checks(run, hf_offline, damage, fragment):
    from t2f.io import WeightsError

    files = published(run)
    damage(files)
    lay_out(hf_offline / "hub", REPO, files)
    with pytest.raises(WeightsError, match=fragment):
        load_pipeline(f"hf-hub:{REPO}", **CPU)


# ----------------------------------------------------------------------------
# Online: a Hub served in this process, behind huggingface_hub's own HTTP client.


class MockHub:
    """The Hub's repository info, tree listing and file endpoints for the repositories in `repos`; `fail` answers all."""

    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.fail = None
        self.requests = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        if self.fail == "connect":
            raise httpx2.ConnectError("connection refused", request=request)
        if self.fail is not None:
            status, code = self.fail
            return httpx2.Response(status, headers={"X-Error-Code": code, "X-Error-Message": code}, request=request)
        parts = request.url.path.strip("/").split("/")
        api = parts[0] == "api"
        repo = "/".join(parts[2:4] if api else parts[0:2])
        if repo not in self.repos:
            return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"}, request=request)
        files = self.repos[repo]
        if api and parts[4] == "revision":
            return httpx2.Response(200, json=dict(id=repo, sha=COMMIT, siblings=[dict(rfilename=f) for f in files]), request=request)
        if api and parts[4] == "tree":
            listing = [dict(type="file", path=f, size=len(d), oid=blob_id(f, d)) for f, d in files.items()]
            return httpx2.Response(200, json=listing, request=request)
        name = "/".join(parts[4:])                 # ORG/NAME/resolve/COMMIT/FILE
        data = files[name]
        headers = {"ETag": f'"{blob_id(name, data)}"', "X-Repo-Commit": COMMIT, "Content-Length": str(len(data))}
        return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data, request=request)


@pytest.fixture
def online_hub(hf_home, monkeypatch):
    monkeypatch.delenv("T2F_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub = MockHub()
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub), follow_redirects=True))
    yield hub
    _http.set_client_factory(_http.default_client_factory)


def test_online_the_mapper_is_fetched_into_the_cache_as_huggingface_hub_lays_it_out(run, online_hub, hf_home, tmp_path, monkeypatch):
    online_hub.repos[REPO] = published(run)
    pipe = load_pipeline(f"hf-hub:{REPO}", **CPU)
    assert sorted(os.listdir(pipe.sources.mapper)) == ["config.json", "model.safetensors"]       # only what t2f reads
    assert not any("bank" in r or "README" in r for r in online_hub.requests if "/resolve/" in r)
    # What huggingface_hub wrote is what the offline tests lay out by hand.
    hand = tmp_path / "hand"
    lay_out(hand, REPO, {k: v for k, v in published(run).items() if k in ("config.json", "model.safetensors")})
    storage = hf_home / "hub" / f"models--{REPO.replace('/', '--')}"
    for path in (hand / storage.name).rglob("*"):
        theirs = storage / path.relative_to(hand / storage.name)
        assert theirs.exists(), theirs
        if path.is_symlink():
            assert os.readlink(theirs) == os.readlink(path)
        elif path.is_file() and path.parent.name != "trees":
            assert theirs.read_bytes() == path.read_bytes()
    # Then offline, from that cache alone.
    monkeypatch.setenv("T2F_OFFLINE", "1")
    online_hub.fail = "connect"
    assert torch.equal(load_pipeline(f"hf-hub:{REPO}", **CPU)("a").ws, pipe("a").ws)


@pytest.mark.parametrize("fail,fragment", [
    ((404, "RepoNotFound"), f"hf-hub:{REPO}: no such model repository on the Hugging Face Hub"),
    ((403, "GatedRepo"), f"hf-hub:{REPO} is gated: accept its conditions on https://huggingface.co/{REPO}"),
    ((404, "RevisionNotFound"), f"hf-hub:{REPO}@v9: the repository {REPO} has no revision 'v9'"),
    ("connect", f"cannot reach the Hugging Face Hub for hf-hub:{REPO}"),
])
def test_online_failures_are_one_line(online_hub, fail, fragment, tmp_path, run_cli):
    online_hub.fail = fail
    source = f"hf-hub:{REPO}" + ("@v9" if "RevisionNotFound" in fail else "")
    with pytest.raises(HubError, match=fragment.replace(".", r"\.").replace("'", ".")):
        load_pipeline(source)
    assert_one_error_line(run_cli(infer_main, ["--mapper", source, "a"], tmp_path), 1, fragment)


def test_online_a_repository_without_weights_is_one_line(online_hub, run):
    online_hub.repos[REPO] = {"config.json": published(run)["config.json"], "README.md": b"a card\n"}
    with pytest.raises(HubError, match=f"hf-hub:{REPO} holds no model.safetensors: a t2f mapper repository holds"):
        load_pipeline(f"hf-hub:{REPO}")




def test_an_http_clients_own_error_is_named_once(online_hub, monkeypatch):
    """A transport error huggingface_hub lets through: its type and first line, once ("ConnectError: ...")."""
    import huggingface_hub

    from t2f.hub import download, parse

    def snapshot_download(*args, **kwargs):
        raise httpx2.ConnectError("connection refused\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(HubError) as info:
        download(parse(f"hf-hub:{REPO}"), ("config.json",))
    assert str(info.value) == f"cannot reach the Hugging Face Hub for hf-hub:{REPO}: ConnectError: connection refused"
