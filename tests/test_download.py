"""The asset registry and `fetch`: cache, offline mirror, network, every failure path, a
hundred fetches of one file at once, and the stamp that spares a cached file rehashing."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import re
import threading
import time
import warnings
import zipfile
from pathlib import Path

import pytest

import utils.core.download as download
from utils.core.paths import REPO_ROOT
from utils.core.assets import ASSETS, Asset, UnknownAssetError, get_asset
from utils.core.download import AssetUnavailableError, MirrorNotFoundError, fetch

BODY = bytes(range(256)) * 16 * 1024  # 4 MiB: big enough for several read chunks
GOOD = hashlib.sha256(BODY).hexdigest()


def register(monkeypatch, name="test-file", **fields) -> Asset:
    """Put a test asset into the registry for the duration of one test."""
    defaults = dict(name=name, filename=f"sub/{name}.bin", url="http://127.0.0.1:9/none",
                    size=len(BODY), sha256=GOOD)
    asset = Asset(**{**defaults, **fields})
    monkeypatch.setitem(ASSETS, name, asset)
    return asset


def leftovers(folder: Path) -> list[str]:
    """Files in `folder` apart from the fetcher's bookkeeping (its lock and verified stamp)."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file()
                  and not (p.name.startswith(".") and p.suffix in (".lock", ".verified")))


def test_good_download(monkeypatch, tmp_path, http_server):
    http_server.routes["/f"] = (200, BODY, "ok")
    register(monkeypatch, url=http_server.url("/f"))
    path = fetch("test-file", data_dir=tmp_path, mirror="", offline=False, progress=False)
    assert path == tmp_path / "sub" / "test-file.bin"
    assert path.read_bytes() == BODY
    assert leftovers(tmp_path) == ["test-file.bin"]  # no .part or .tmp left


def test_checksum_mismatch_is_rejected_and_leaves_nothing(monkeypatch, tmp_path, http_server):
    tampered = b"X" + BODY[1:]  # same size, different bytes
    http_server.routes["/f"] = (200, tampered, "ok")
    register(monkeypatch, url=http_server.url("/f"))
    with pytest.raises(AssetUnavailableError, match="sha256"):
        fetch("test-file", data_dir=tmp_path, mirror="", offline=False, progress=False)
    assert leftovers(tmp_path) == []


def test_dropped_connection_leaves_no_complete_file_then_resumes(monkeypatch, tmp_path,
                                                                 http_server):
    http_server.routes["/f"] = (200, BODY, "drop")
    register(monkeypatch, url=http_server.url("/f"))
    with pytest.raises(AssetUnavailableError, match="failed after 2 attempts"):
        fetch("test-file", data_dir=tmp_path, mirror="", offline=False, progress=False,
              retries=2)
    dest = tmp_path / "sub" / "test-file.bin"
    assert not dest.exists()
    part = dest.with_name("test-file.bin.part")
    assert 0 < part.stat().st_size < len(BODY)  # only a partial file, named as such

    http_server.routes["/f"] = (200, BODY, "ok")  # the connection is back
    http_server.requests.clear()
    path = fetch("test-file", data_dir=tmp_path, mirror="", offline=False, progress=False)
    assert path.read_bytes() == BODY
    # each dropped attempt delivered half of what remained (1/2, then 3/4 of the file),
    # and the next download asked only for the rest
    assert [(r.path, r.headers.get("Range")) for r in http_server.requests] == \
        [("/f", f"bytes={len(BODY) * 3 // 4}-")]
    assert leftovers(tmp_path) == ["test-file.bin"]


def test_server_that_ignores_range_restarts_cleanly(monkeypatch, tmp_path, http_server):
    http_server.routes["/f"] = (200, BODY, "no-range")
    register(monkeypatch, url=http_server.url("/f"))
    dest = tmp_path / "sub" / "test-file.bin"
    dest.parent.mkdir(parents=True)
    dest.with_name("test-file.bin.part").write_bytes(b"stale partial bytes")
    assert fetch("test-file", data_dir=tmp_path, mirror="", offline=False,
                 progress=False).read_bytes() == BODY


def _fetch_many(url: str, data_dir: str, threads: int, queue) -> None:
    """In a child process: register the test asset, then fetch it from several threads."""
    ASSETS["race"] = Asset("race", "race/file.bin", url, len(BODY), GOOD)
    results = []

    def one():
        try:
            path = fetch("race", data_dir=data_dir, mirror="", offline=False, progress=False)
            results.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
        except Exception as exc:  # reported to the parent, which fails the test
            results.append(f"{type(exc).__name__}: {exc}")

    workers = [threading.Thread(target=one) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    queue.put(results)


def test_100_concurrent_fetches_download_once_and_all_get_the_verified_file(tmp_path, http_server):
    http_server.routes["/race"] = (200, BODY, "ok")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fetch_many, args=(http_server.url("/race"), str(tmp_path), 10,
                                                   queue)) for _ in range(10)]
    for p in procs:
        p.start()
    results = [r for _ in procs for r in queue.get(timeout=300)]
    for p in procs:
        p.join(timeout=60)
    assert len(results) == 100
    assert set(results) == {GOOD}, [r for r in results if r != GOOD][:3]
    assert [r.path for r in http_server.requests] == ["/race"]  # downloaded once
    files = sorted(p.name for p in (tmp_path / "race").iterdir())
    assert files == [".file.bin.lock", ".file.bin.verified", "file.bin"]  # no temporary files


def test_a_cache_hit_is_not_rehashed_until_the_file_changes(monkeypatch, tmp_path, http_server):
    http_server.routes["/f"] = (200, BODY, "ok")
    register(monkeypatch, url=http_server.url("/f"))
    path = fetch("test-file", data_dir=tmp_path, mirror="", offline=False, progress=False)
    hashed = []
    real = download._sha256
    monkeypatch.setattr(download, "_sha256", lambda p: hashed.append(p) or real(p))
    assert fetch("test-file", data_dir=tmp_path, mirror="", offline=True) == path
    assert hashed == []  # the stamp vouched for it
    fetch("test-file", data_dir=tmp_path, mirror="", offline=True, verify=True)
    assert hashed == [path]  # asked to verify: hashed
    data = bytearray(path.read_bytes())
    data[100] ^= 1  # damaged on disk: same size, new modification time
    path.write_bytes(bytes(data))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.warns(UserWarning, match="was damaged"):
        fetched = fetch("test-file", data_dir=tmp_path, mirror="", offline=False, progress=False)
    assert fetched.read_bytes() == BODY  # fetched again
    assert path.with_name("test-file.bin.corrupt").read_bytes() == bytes(data)  # kept aside


def _damaged_cache_and_mirror(tmp_path, body: bytes) -> tuple[Path, Path]:
    """A cached copy with the right size and the wrong bytes, and a mirror with a good one."""
    cached = tmp_path / "cache" / "sub" / "test-file.bin"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(bytes(255 - b for b in body))
    mirror = tmp_path / "mirror"
    (mirror / "sub").mkdir(parents=True)
    (mirror / "sub" / "test-file.bin").write_bytes(body)
    return cached, mirror


def _fetch_when_all_are_ready(barrier, delay, data_dir, mirror, queue) -> None:
    """In a forked child: wait for all the others, then `delay` seconds more (processes
    started together never all start at the same instant), then fetch and report the file's
    sha256. The machine is busy: between a look at the file and reading it, the process gives
    up the CPU, so that another one may move the file meanwhile."""
    real = download.verify_file

    def verify_on_a_busy_machine(path, asset):
        time.sleep(0)  # another process may run here
        return real(path, asset)

    download.verify_file = verify_on_a_busy_machine  # in this child only
    try:
        barrier.wait(timeout=60)
        time.sleep(delay)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the one that moves the damaged copy aside warns
            path = fetch("test-file", data_dir=data_dir, mirror=mirror, offline=True,
                         progress=False)
        queue.put(hashlib.sha256(Path(path).read_bytes()).hexdigest())
    except BaseException as exc:  # reported to the parent, which fails the test
        queue.put(f"{type(exc).__name__}: {exc}")


def test_50_processes_fetching_over_a_damaged_copy_all_get_the_good_file(monkeypatch, tmp_path):
    body = BODY[: 64 * 1024]  # small: fifty processes hash it, most of them twice
    good = hashlib.sha256(body).hexdigest()
    register(monkeypatch, size=len(body), sha256=good)
    cached, mirror = _damaged_cache_and_mirror(tmp_path, body)
    damaged = cached.read_bytes()
    ctx = multiprocessing.get_context("fork")  # cheap to start; the children never use torch
    barrier, queue = ctx.Barrier(50), ctx.Queue()
    procs = [ctx.Process(target=_fetch_when_all_are_ready,
                         args=(barrier, i * 0.0004, str(tmp_path / "cache"), str(mirror), queue))
             for i in range(50)]  # all within 20 ms
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [r for r in results if r != good] == []  # no FileNotFoundError, no damaged copy
    assert cached.read_bytes() == body
    files = sorted(p.name for p in cached.parent.iterdir())
    assert files == [".test-file.bin.lock", ".test-file.bin.verified", "test-file.bin",
                     "test-file.bin.corrupt"]  # moved aside once; no temporary files left
    assert cached.with_name("test-file.bin.corrupt").read_bytes() == damaged


def test_a_cached_copy_moved_aside_while_it_is_checked_is_fetched_not_an_error(monkeypatch,
                                                                                tmp_path):
    register(monkeypatch)
    cached, mirror = _damaged_cache_and_mirror(tmp_path, BODY)
    real, moved = download.verify_file, []

    def another_process_moves_it_first(path, asset):
        if not moved:  # between this process's look at the file and its reading it
            os.replace(path, path.with_name("elsewhere"))
            moved.append(path)
        return real(path, asset)

    monkeypatch.setattr(download, "verify_file", another_process_moves_it_first)
    path = fetch("test-file", data_dir=tmp_path / "cache", mirror=mirror, offline=True,
                 progress=False)
    assert path == cached and path.read_bytes() == BODY


def test_each_damaged_copy_is_kept_under_its_own_name(monkeypatch, tmp_path):
    register(monkeypatch)
    cached, mirror = _damaged_cache_and_mirror(tmp_path, BODY)
    kept = []
    for damage in (b"first damage", b"second damage", b"third damage"):
        cached.write_bytes(damage)
        with pytest.warns(UserWarning, match="was damaged") as caught:
            assert fetch("test-file", data_dir=tmp_path / "cache", mirror=mirror, offline=True,
                         progress=False).read_bytes() == BODY
        kept.append(str(caught[0].message).split("moved to ")[1].split(" and ")[0])
    assert kept == ["test-file.bin.corrupt", "test-file.bin.corrupt.1", "test-file.bin.corrupt.2"]
    for name, damage in zip(kept, (b"first damage", b"second damage", b"third damage")):
        assert cached.with_name(name).read_bytes() == damage  # none overwritten


def test_temporary_files_of_dead_fetches_are_cleaned_but_a_running_one_is_kept(monkeypatch,
                                                                             tmp_path):
    register(monkeypatch)
    folder = tmp_path / "sub"
    folder.mkdir()
    (folder / "test-file.bin").write_bytes(BODY)  # a good copy, and what died beside it:
    dead = [folder / ".test-file.bin.4242.0badc0de.tmp",  # a copy from the mirror
            folder / "test-file.bin.part",  # a download, finished since by another way
            folder / ".test-file.bin.verified.1234abcd.tmp"]  # a stamp, an hour ago
    running = folder / ".test-file.bin.verified.5678abcd.tmp"  # a stamp being written now
    for path in dead + [running]:
        path.write_bytes(b"partial")
    an_hour_ago = time.time() - 3600
    os.utime(dead[2], (an_hour_ago, an_hour_ago))
    path = fetch("test-file", data_dir=tmp_path, mirror="", offline=True)
    assert path == folder / "test-file.bin"
    assert [p.name for p in dead if p.exists()] == [] and running.exists()


def test_backup_url_used_when_primary_fails(monkeypatch, tmp_path, http_server):
    http_server.routes["/primary"] = (500, b"server error", "ok")
    http_server.routes["/backup"] = (200, BODY, "ok")
    register(monkeypatch, url=http_server.url("/primary"), backup_url=http_server.url("/backup"))
    path = fetch("test-file", data_dir=tmp_path, mirror="", offline=False, progress=False,
                 retries=2)
    assert path.read_bytes() == BODY
    assert [r.path for r in http_server.requests] == ["/primary", "/primary", "/backup"]


def test_client_error_is_not_retried(monkeypatch, tmp_path, http_server):
    register(monkeypatch, url=http_server.url("/gone"))  # unrouted: 404
    with pytest.raises(AssetUnavailableError, match="HTTP 404"):
        fetch("test-file", data_dir=tmp_path, mirror="", offline=False, progress=False)
    assert len(http_server.requests) == 1


def test_cached_file_is_reused_without_network(monkeypatch, tmp_path, http_server, no_network):
    register(monkeypatch, url=http_server.url("/f"))  # unrouted, and never asked
    cached = tmp_path / "sub" / "test-file.bin"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(BODY)
    assert fetch("test-file", data_dir=tmp_path, mirror="", offline=False) == cached
    assert http_server.requests == []


def test_no_network_and_no_mirror_gives_a_clear_error(monkeypatch, tmp_path):
    register(monkeypatch, url="https://example.invalid/f", backup_url="https://b.invalid/f")
    with pytest.raises(AssetUnavailableError) as err:
        fetch("test-file", data_dir=tmp_path, mirror="", offline=True)
    message = str(err.value)
    for expected in ["'test-file'", str(tmp_path / "sub" / "test-file.bin"), "not there",
                     "none configured", "offline mode is on", "LLM_COURSE_MIRROR",
                     "https://example.invalid/f", "https://b.invalid/f", "unset LLM_COURSE_OFFLINE"]:
        assert expected in message, expected


def test_unreachable_network_names_each_url(monkeypatch, tmp_path, no_network):
    register(monkeypatch, url="https://example.invalid/f")
    with pytest.raises(AssetUnavailableError, match=r"https://example.invalid/f: failed after 1"):
        fetch("test-file", data_dir=tmp_path, mirror="", offline=False, retries=1)


def test_mirror_is_used_and_copied_into_cache(monkeypatch, tmp_path, no_network):
    register(monkeypatch)
    mirror = tmp_path / "mirror"
    (mirror / "sub").mkdir(parents=True)
    (mirror / "sub" / "test-file.bin").write_bytes(BODY)
    path = fetch("test-file", data_dir=tmp_path / "cache", mirror=mirror, offline=True,
                 progress=False)
    assert path == tmp_path / "cache" / "sub" / "test-file.bin" and path.read_bytes() == BODY


def test_corrupt_mirror_copy_is_rejected(monkeypatch, tmp_path):
    register(monkeypatch)
    mirror = tmp_path / "mirror"
    (mirror / "sub").mkdir(parents=True)
    (mirror / "sub" / "test-file.bin").write_bytes(BODY[:-1])
    with pytest.raises(AssetUnavailableError, match=r"size 4194303 bytes, expected 4194304"):
        fetch("test-file", data_dir=tmp_path / "cache", mirror=mirror, offline=True)
    assert leftovers(tmp_path / "mirror") == ["test-file.bin"]
    assert not (tmp_path / "cache").exists() or leftovers(tmp_path / "cache") == []


def test_corrupt_cache_file_is_kept_aside_and_replaced(monkeypatch, tmp_path):
    register(monkeypatch)
    cached = tmp_path / "cache" / "sub" / "test-file.bin"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    mirror = tmp_path / "mirror"
    (mirror / "sub").mkdir(parents=True)
    (mirror / "sub" / "test-file.bin").write_bytes(BODY)
    with pytest.warns(UserWarning, match="was damaged"):
        path = fetch("test-file", data_dir=tmp_path / "cache", mirror=mirror, offline=True,
                     progress=False)
    assert path.read_bytes() == BODY
    assert cached.with_name("test-file.bin.corrupt").read_bytes() == b"truncated"


def test_missing_mirror_folder_is_a_clear_error(monkeypatch, tmp_path):
    register(monkeypatch)
    with pytest.raises(MirrorNotFoundError, match="does not exist.*unset LLM_COURSE_MIRROR"):
        fetch("test-file", data_dir=tmp_path, mirror=tmp_path / "no-such-folder", offline=True)


def test_unknown_asset_name_suggests_the_right_one():
    with pytest.raises(UnknownAssetError, match="Did you mean 'the-verdict'"):
        get_asset("the-verdikt")
    with pytest.raises(UnknownAssetError, match="Choose one of: the-verdict"):
        fetch("nothing-like-it")


def _zip_with(member: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme", "not this one")
        archive.writestr(member, data)
    return buffer.getvalue()


def test_zip_asset_extracts_its_member(monkeypatch, tmp_path, http_server):
    http_server.routes["/a.zip"] = (200, _zip_with("SMSSpamCollection", BODY), "ok")
    register(monkeypatch, filename="spam.tsv", url=http_server.url("/a.zip"),
             archive_member="SMSSpamCollection")
    path = fetch("test-file", data_dir=tmp_path, mirror="", offline=False, progress=False)
    assert path.read_bytes() == BODY
    assert leftovers(tmp_path) == ["spam.tsv"]  # the zip itself is not kept


def test_zip_without_the_member_is_rejected(monkeypatch, tmp_path, http_server):
    http_server.routes["/a.zip"] = (200, _zip_with("other-name", BODY), "ok")
    register(monkeypatch, filename="spam.tsv", url=http_server.url("/a.zip"),
             archive_member="SMSSpamCollection")
    with pytest.raises(AssetUnavailableError, match="holds no 'SMSSpamCollection'"):
        fetch("test-file", data_dir=tmp_path, mirror="", offline=False, progress=False)
    assert leftovers(tmp_path) == []


# --- the real registry ------------------------------------------------------------------

def test_registry_entries_are_well_formed():
    for name, asset in ASSETS.items():
        assert asset.name == name
        assert re.fullmatch(r"[0-9a-f]{64}", asset.sha256), name
        assert asset.url.startswith("https://"), name
        assert asset.size is None or asset.size > 0, name


def test_data_readme_lists_every_asset():
    readme = (REPO_ROOT / "data" / "README.md").read_text()
    for asset in ASSETS.values():
        assert asset.name in readme and asset.sha256 in readme and asset.url in readme, asset.name


def test_mirror_copies_match_the_registry(mirror_dir, tmp_path, no_network):
    """Every asset the mirror holds passes verification (the GPT-2 weights are not in it)."""
    found = [a for a in ASSETS.values() if (mirror_dir / a.filename).is_file()]
    assert {a.name for a in found} >= {"the-verdict", "sms-spam-collection", "instruction-data",
                                       "gpt2-encoder-json", "gpt2-vocab-bpe"}
    for asset in found:
        path = fetch(asset.name, data_dir=tmp_path, mirror=mirror_dir, offline=True,
                     progress=False)
        assert path.stat().st_size == asset.size


def test_the_download_limit_refuses_large_files_but_uses_local_copies(monkeypatch, tmp_path,
                                                                      http_server):
    http_server.routes["/f"] = (200, BODY, "ok")
    register(monkeypatch, url=http_server.url("/f"))  # 4.2 MB
    monkeypatch.setenv("LLM_COURSE_MAX_DOWNLOAD_MB", "4")
    with pytest.raises(AssetUnavailableError, match=r"the file is 4 MB and "
                       r"\$LLM_COURSE_MAX_DOWNLOAD_MB=4 allows downloads up to 4 MB(.|\n)*"
                       r"unset LLM_COURSE_MAX_DOWNLOAD_MB to allow this download"):
        fetch("test-file", data_dir=tmp_path / "cache", mirror="", offline=False)
    assert http_server.requests == []  # not even asked
    monkeypatch.setenv("LLM_COURSE_DATA", str(tmp_path / "cache"))
    monkeypatch.setenv("LLM_COURSE_MIRROR", "")
    monkeypatch.delenv("LLM_COURSE_OFFLINE", raising=False)
    assert download.fetch_refusal("test-file") == (
        "sub/test-file.bin is not on this machine and the file is 4 MB and "
        "$LLM_COURSE_MAX_DOWNLOAD_MB=4 allows downloads up to 4 MB")
    mirror = tmp_path / "mirror"
    (mirror / "sub").mkdir(parents=True)
    (mirror / "sub" / "test-file.bin").write_bytes(BODY)
    assert fetch("test-file", data_dir=tmp_path / "cache", mirror=mirror).read_bytes() == BODY
    monkeypatch.setenv("LLM_COURSE_MAX_DOWNLOAD_MB", "5")  # big enough: downloaded
    assert fetch("test-file", data_dir=tmp_path / "other", mirror="", offline=False,
                 progress=False).read_bytes() == BODY


def test_the_test_settings_never_download_model_weights(monkeypatch, tmp_path):
    from utils.core.runinfo import SAVED_OUTPUT_SETTINGS
    monkeypatch.setenv("LLM_COURSE_DATA", str(tmp_path))  # nothing cached
    monkeypatch.setenv("LLM_COURSE_MIRROR", "")
    monkeypatch.delenv("LLM_COURSE_OFFLINE", raising=False)  # online
    for name, value in SAVED_OUTPUT_SETTINGS.items():
        monkeypatch.setenv(name, value)
    weights = [a.name for a in ASSETS.values() if a.size is None or a.size > 100e6]
    assert len(weights) >= 6  # GPT-2 in four sizes, Qwen3-0.6B, Llama 3.2 1B
    for name in weights:
        assert "allows downloads up to 100 MB" in download.fetch_refusal(name), name  # or size
        # unknown (GPT-2 large and XL): under a limit, only a known size is fetched
    assert download.fetch_refusal("the-verdict") is None  # small files still download


def test_share_with_tiktoken_copies_where_tiktoken_looks_unless_switched_off(monkeypatch, tmp_path):
    import hashlib
    from utils.core.download import share_with_tiktoken
    source = tmp_path / "vocab.bpe"
    source.write_bytes(BODY)
    url = get_asset("gpt2-vocab-bpe").url
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # the user's switch: no tiktoken cache
    share_with_tiktoken("gpt2-vocab-bpe", source)
    assert not list(tmp_path.glob("*/*"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    share_with_tiktoken("gpt2-vocab-bpe", source)
    assert (tmp_path / "tiktoken" / hashlib.sha1(url.encode()).hexdigest()).read_bytes() == BODY
