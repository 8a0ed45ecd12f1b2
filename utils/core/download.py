"""Fetching the course's data files, online or offline (hand-written; no notebook builds it).

`fetch(name)` returns the local path of an asset from `utils.core.assets`, looking in order at:

1. the cache, `data/` at the top of the repository (or the folder in `$LLM_COURSE_DATA`);
2. an offline mirror folder, if `$LLM_COURSE_MIRROR` names one (same file layout as `data/`);
3. the network: the canonical URL, then the backup URL, each with a timeout and retries.

Every copy is checked against the registry's size and sha256 before it is used; a file that
passed is stamped (size and modification time, in a hidden `.NAME.verified` file beside it),
so later cache hits skip re-hashing it until the file changes (`verify=True` forces a full
check). Downloads go to `NAME.part` and are renamed only when complete and verified, so an
interrupted download never leaves a file that looks finished; the next call continues the
`.part` file where the server allows it. Processes that fetch the same file at once (two
notebooks, DDP ranks) take turns through a lock file: one downloads, the others then find
the verified copy; a copy that vanishes or changes while a process looks at it without the
lock is looked at again under the lock. A damaged cached copy is kept for inspection under a
name no earlier one has (`NAME.corrupt`, then `NAME.corrupt.1`, ...). Temporary files of
fetches that died are removed by the next process that holds the lock (a `.part` file only
once a good copy is in place: until then it is a download to continue). With
`$LLM_COURSE_OFFLINE=1` the network is never touched, and with `$LLM_COURSE_MAX_DOWNLOAD_MB=N`
no file larger than N MB is downloaded (the tests set 100, so that a test run never starts a
download of model weights). An asset that needs an access token (a gated model on the
Hugging Face Hub) names an environment variable, `HF_TOKEN`; its value is sent as a bearer
token to the asset's own host only (also after a redirect within that host), never to the
storage servers the host redirects to.
`share_with_tiktoken` leaves a fetched tokenizer file where tiktoken's own loader finds it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import itertools
import json
import os
import re
import shutil
import tempfile
import time
import uuid
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from pathlib import Path

from tqdm import tqdm

from utils.core.assets import Asset, get_asset
from utils.core.env import env_flag, env_number
from utils.core.paths import REPO_ROOT, shown_path

__all__ = [
    "fetch", "fetch_refusal", "verify_file", "default_data_dir", "offline_mode", "share_with_tiktoken",
    "AssetUnavailableError", "MirrorNotFoundError",
    "ENV_DATA_DIR", "ENV_MIRROR", "ENV_OFFLINE", "ENV_MAX_DOWNLOAD_MB",
]

ENV_DATA_DIR = "LLM_COURSE_DATA"  # overrides the cache folder
ENV_MIRROR = "LLM_COURSE_MIRROR"  # a folder laid out like data/, consulted before the network
ENV_OFFLINE = "LLM_COURSE_OFFLINE"  # "1": never use the network
ENV_MAX_DOWNLOAD_MB = "LLM_COURSE_MAX_DOWNLOAD_MB"  # larger files: cache or mirror only
PROGRESS_MIN_BYTES = 1 << 20  # files below 1 MiB download without a progress bar
_CHUNK = 1 << 20
_STALE_S = 600.0  # a temporary file untouched this long belongs to no running fetch
_MISSING = "not there"


class AssetUnavailableError(RuntimeError):
    """No good copy of an asset could be found or downloaded."""


class MirrorNotFoundError(FileNotFoundError):
    """The configured offline mirror folder does not exist."""


class _DownloadError(Exception):
    """One URL failed; the message says how (kept for the final report)."""


def default_data_dir() -> Path:
    """The cache folder: `$LLM_COURSE_DATA`, else `data/` beside the `utils` package."""
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env) if env else REPO_ROOT / "data"


def offline_mode() -> bool:
    """True when `$LLM_COURSE_OFFLINE` is set to 1/true/yes/on."""
    return env_flag(ENV_OFFLINE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify_file(path: Path, asset: Asset) -> str | None:
    """Return None if `path` is a good copy of `asset`, else a short description of the fault."""
    size = path.stat().st_size
    if asset.size is not None and size != asset.size:
        return f"size {size} bytes, expected {asset.size}"
    digest = _sha256(path)
    if digest != asset.sha256:
        return f"sha256 {digest[:12]}..., expected {asset.sha256[:12]}..."
    return None


def _stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def _file_id(path: Path, asset: Asset) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": asset.sha256}


def _verify_cached(path: Path, asset: Asset, full: bool) -> str | None:
    """`verify_file`, skipped when the stamp says this very file passed before."""
    stamp = _stamp_path(path)
    if not full:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(stamp.read_text()) == _file_id(path, asset):
                return None
    fault = verify_file(path, asset)
    if fault is None:
        with contextlib.suppress(OSError):  # a read-only cache just means re-hashing next time
            tmp = stamp.with_name(f"{stamp.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps(_file_id(path, asset)))
            os.replace(tmp, stamp)
    return fault


@contextlib.contextmanager
def _exclusive(dest: Path, wait: bool = True):
    """Hold a lock file beside `dest` while one process fetches it; others wait their turn.
    Yields whether the lock is held: where the filesystem cannot lock, go ahead without
    (temporary names are unique anyway); with `wait=False`, a lock held by another process
    is not waited for either."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = open(dest.with_name(f".{dest.name}.lock"), "a+b")
    locked = False
    try:
        try:
            if os.name == "nt":
                import msvcrt
                while True:
                    try:
                        msvcrt.locking(lock.fileno(),
                                       msvcrt.LK_LOCK if wait else msvcrt.LK_NBLCK, 1)
                        break
                    except OSError:  # LK_LOCK gives up after 10 s: keep waiting
                        if not wait:
                            raise
            else:
                import fcntl
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            locked = True
        except OSError:
            pass
        yield locked
    finally:
        if locked and os.name != "nt":
            import fcntl
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        elif locked:
            import msvcrt
            with contextlib.suppress(OSError):
                lock.seek(0)
                msvcrt.locking(lock.fileno(), msvcrt.LK_UNLCK, 1)
        lock.close()


def _unique_tmp(dest: Path) -> Path:
    """A temporary name beside `dest`; only the lock holder writes one (see _leftovers)."""
    return dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _leftovers(dest: Path) -> dict[str, list[Path]]:
    """The temporary files of earlier fetches of `dest`, by kind: "copy" (a copy or
    extraction, `_unique_tmp`; written only under the lock), "stamp" (a stamp being written,
    by any process, for a moment) and "partial" (a download to continue, `NAME.part`)."""
    name = re.escape(dest.name)
    kinds = {"copy": re.compile(rf"\.{name}\.\d+\.[0-9a-f]{{8}}\.tmp"),
             "stamp": re.compile(rf"\.{name}\.verified\.[0-9a-f]{{8}}\.tmp"),
             "partial": re.compile(rf"{name}(\.zip)?\.part")}
    found: dict[str, list[Path]] = {kind: [] for kind in kinds}
    with contextlib.suppress(OSError), os.scandir(dest.parent) as entries:
        for entry in entries:
            for kind, pattern in kinds.items():
                if pattern.fullmatch(entry.name):
                    found[kind].append(Path(entry.path))
    return found


def _untouched_for(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def _clean_leftovers(dest: Path, locked: bool, good_copy: bool) -> None:
    """Remove what earlier fetches of `dest` left behind and no running fetch still writes.
    The lock holder knows every copy file is stale (only a lock holder writes one, and it is
    the holder now), and every partial download once `good_copy` is in place (nothing is left
    to continue); anything else goes only when untouched for `_STALE_S` seconds (a file being
    written keeps a fresh modification time)."""
    found = _leftovers(dest)
    stale = [p for p in found["stamp"] if _untouched_for(p, _STALE_S)]
    stale += found["copy"] if locked else [p for p in found["copy"] if _untouched_for(p, _STALE_S)]
    if locked and good_copy:
        stale += found["partial"]
    for path in stale:
        with contextlib.suppress(OSError):
            path.unlink()


def _cached_fault(dest: Path, asset: Asset, full: bool) -> str | None:
    """`_verify_cached` for a file another process may move aside meanwhile: a file that
    vanishes while it is being looked at is reported `_MISSING`, not raised."""
    try:
        return _verify_cached(dest, asset, full) if dest.exists() else _MISSING
    except FileNotFoundError:
        return _MISSING


def _move_aside(dest: Path) -> Path | None:
    """Rename the damaged `dest` to the first free name of NAME.corrupt, NAME.corrupt.1, ...
    (never over an earlier one; the caller holds the lock). None if it is gone already."""
    for n in itertools.count():
        aside = dest.with_name(f"{dest.name}.corrupt" + (f".{n}" if n else ""))
        if aside.exists() or aside.is_symlink():
            continue
        try:
            os.replace(dest, aside)  # kept for inspection rather than deleting anything
        except FileNotFoundError:  # another process (without a lock) moved it first
            return None
        return aside


def _mirror_dir(mirror: str | os.PathLike | None) -> Path | None:
    source = "the mirror argument" if mirror is not None else f"${ENV_MIRROR}"
    value = mirror if mirror is not None else os.environ.get(ENV_MIRROR, "")
    if not str(value).strip():
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise MirrorNotFoundError(
            f"The offline mirror folder {path} (from {source}) does not exist or is not a "
            f"folder. Fix the path so it points at a folder laid out like data/, or unset "
            f"{ENV_MIRROR} to use the cache and the network only."
        )
    return path


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message)


def fetch(name: str, *, data_dir: str | os.PathLike | None = None,
          mirror: str | os.PathLike | None = None, offline: bool | None = None,
          progress: bool = True, timeout: float = 30.0, retries: int = 3,
          verify: bool = False) -> Path:
    """Return the local path of asset `name`: cache, then offline mirror, then network.
    `verify=True` re-hashes a cached copy even if it passed before."""
    asset = get_asset(name)
    dest = Path(data_dir or default_data_dir()) / asset.filename
    if _cached_fault(dest, asset, full=verify) is None:  # the common case: no lock, no hashing
        if any(_leftovers(dest).values()):  # rare: tidy up, if nobody holds the lock now
            with contextlib.suppress(OSError), _exclusive(dest, wait=False) as locked:
                _clean_leftovers(dest, locked, good_copy=True)  # (a read-only cache: leave it)
        return dest
    with _exclusive(dest) as locked:  # one process at a time fetches this file
        _clean_leftovers(dest, locked, good_copy=False)
        path = _fetch_locked(asset, dest, mirror, offline_mode() if offline is None else offline,
                             progress, timeout, retries)
        _clean_leftovers(dest, locked, good_copy=True)
        return path


def fetch_refusal(name: str) -> str | None:
    """Why `fetch(name)` would fail here without trying: the file is neither in the cache
    nor in the mirror, and the network may not be used for it (offline mode, or larger than
    the download limit). None when it is on this machine or may be downloaded."""
    asset = get_asset(name)
    refusal = _network_refusal(asset, offline_mode())
    if refusal is None:
        return None
    mirror = _mirror_dir(None)
    places = [default_data_dir()] + ([mirror] if mirror is not None else [])
    if any((place / asset.filename).is_file() for place in places):
        return None
    return f"{asset.filename} is not on this machine and {refusal}"


def _fetch_locked(asset: Asset, dest: Path, mirror, offline: bool, progress: bool,
                  timeout: float, retries: int) -> Path:
    looked: list[str] = []
    # looked at again under the lock: another process may have fetched it (or moved a
    # damaged copy aside) while this one waited
    fault = _cached_fault(dest, asset, full=True)
    if fault is None:
        return dest
    aside = _move_aside(dest) if fault != _MISSING else None
    if aside is not None:
        warnings.warn(f"The cached {shown_path(dest)} was damaged ({fault}); it was moved to "
                      f"{shown_path(aside)} and a fresh copy is being fetched.", stacklevel=3)
        looked.append(f"cache {dest}: damaged ({fault}), moved to {aside}")
    else:
        looked.append(f"cache {dest}: not there")

    mirror_dir = _mirror_dir(mirror)
    if mirror_dir is None:
        looked.append(f"offline mirror: none configured (${ENV_MIRROR} is not set)")
    else:
        source = mirror_dir / asset.filename
        fault = verify_file(source, asset) if source.is_file() else "not there"
        if fault is None:
            _copy_atomically(source, dest)
            _verify_cached(dest, asset, full=True)  # stamps the copy
            return dest
        looked.append(f"offline mirror {source}: {fault}")

    refusal = _network_refusal(asset, offline)
    if refusal:
        looked.append(f"network: not tried, {refusal}")
    else:
        for url in asset.urls:
            try:
                _download(asset, url, dest, progress=progress, timeout=timeout, retries=retries)
                _verify_cached(dest, asset, full=True)
                _say(progress, f"Downloaded {asset.filename} from {url}")
                return dest
            except _DownloadError as exc:
                looked.append(f"{url}: {exc}")
    raise AssetUnavailableError(_explain(asset, dest, looked, offline))


def _network_refusal(asset: Asset, offline: bool) -> str | None:
    """Why the network must not be used for `asset` here, or None."""
    if offline:
        return f"offline mode is on (${ENV_OFFLINE}=1)"
    limit = env_number(ENV_MAX_DOWNLOAD_MB)
    if limit is None:
        return None
    if asset.size is None:  # the registry does not know it: only an explicit yes fetches it
        return (f"its size is not known in advance and ${ENV_MAX_DOWNLOAD_MB}={limit:g} "
                f"allows downloads up to {limit:g} MB")
    if asset.size > limit * 1e6:
        return (f"the file is {asset.size / 1e6:,.0f} MB and ${ENV_MAX_DOWNLOAD_MB}={limit:g} "
                f"allows downloads up to {limit:g} MB")
    return None


def _explain(asset: Asset, dest: Path, looked: list[str], offline: bool) -> str:
    how = f"download {asset.url}"
    if asset.backup_url:
        how += f" (or the backup {asset.backup_url})"
    if asset.archive_member:
        how += f", extract the file {asset.archive_member!r} from the zip,"
    lines = [f"Could not get the asset {asset.name!r} ({asset.filename}).", "Looked at:"]
    lines += [f"  - {item}" for item in looked]
    lines += ["What you can do:",
              f"  - {how} and save it as {dest}",
              f"  - or set {ENV_MIRROR} to a folder that holds {asset.filename}"]
    if asset.token_env:
        lines.append(f"  - this file is gated: accept the license on the model's page while "
                     f"logged in, create an access token and set ${asset.token_env} to it")
    if offline:
        lines.append(f"  - or unset {ENV_OFFLINE} on a machine with internet access")
    elif _network_refusal(asset, offline):
        lines.append(f"  - or unset {ENV_MAX_DOWNLOAD_MB} to allow this download")
    else:
        lines.append("  - or check your internet connection and run the cell again")
    return "\n".join(lines)


def _copy_atomically(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _unique_tmp(dest)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest)  # whole or not at all; a concurrent winner wrote the same bytes
    finally:
        tmp.unlink(missing_ok=True)


def _download(asset: Asset, url: str, dest: Path, *, progress: bool,
              timeout: float, retries: int) -> None:
    """Download `url` into `dest` via a `.part` file (continuing one left by an earlier,
    interrupted attempt); raise _DownloadError on failure. The caller holds the lock."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + (".zip.part" if asset.archive_member else ".part"))
    continued = _download_with_retries(url, part, asset, progress, timeout, retries)
    try:
        fault = _finish(asset, part, dest)
        if fault and continued:  # the earlier partial file may have been stale
            part.unlink(missing_ok=True)  # so download the whole file again, once
            _download_with_retries(url, part, asset, progress, timeout, retries)
            fault = _finish(asset, part, dest)
    finally:
        part.unlink(missing_ok=True)  # complete or rejected: either way the partial file goes
    if fault:
        raise _DownloadError(f"rejected the download: {fault}")


def _download_with_retries(url: str, part: Path, asset: Asset, progress: bool,
                           timeout: float, retries: int) -> bool:
    """Stream `url` into `part`, continuing after dropped connections. Returns True if an
    existing partial file was continued rather than downloaded from the start."""
    resumed = part.exists() and part.stat().st_size > 0
    last_error = ""
    for attempt in range(1, retries + 1):
        try:
            _stream(url, part, asset, progress, timeout)
            return resumed
        except urllib.error.HTTPError as exc:
            if exc.code == 416:  # our partial file is bigger than the remote one: start over
                part.unlink(missing_ok=True)
            elif exc.code < 500 and exc.code not in (408, 429):
                raise _DownloadError(f"HTTP {exc.code} {exc.reason}"
                                     f"{_access_hint(asset, exc.code)}") from exc
            last_error = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            last_error = str(getattr(exc, "reason", None) or exc) or type(exc).__name__
        resumed = resumed or part.exists()
        if attempt < retries:
            time.sleep(min(2.0 ** (attempt - 1), 8.0) * 0.5)
    raise _DownloadError(f"failed after {retries} attempts ({last_error})")


class _TokenOnSameHost(urllib.request.HTTPRedirectHandler):
    """Follows redirects, keeping the access token where the redirect stays on the same host
    (the Hub moves small files within huggingface.co) and dropping it everywhere else."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        token = req.unredirected_hdrs.get("Authorization")
        same_host = urllib.parse.urlsplit(newurl).hostname == \
            urllib.parse.urlsplit(req.full_url).hostname
        if new is not None and token and same_host:
            new.add_unredirected_header("Authorization", token)
        return new


def _access_hint(asset: Asset, code: int) -> str:
    """What a refused download of a gated asset means, for the error message."""
    if asset.token_env is None or code not in (401, 403):
        return ""
    if os.environ.get(asset.token_env, "").strip():
        return (f" (${asset.token_env} is set, but its token was refused: check it, and that "
                f"its account has accepted this model's license)")
    return (f" (a gated file: set ${asset.token_env} to an access token of an account that "
            f"has accepted this model's license)")


def _stream(url: str, part: Path, asset: Asset, progress: bool, timeout: float) -> None:
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "llm-from-scratch-course"}
    if start:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)
    token = os.environ.get(asset.token_env, "").strip() if asset.token_env else ""
    open_url = urllib.request.urlopen
    if token:  # for this host only: the storage server the Hub redirects to must not see it
        request.add_unredirected_header("Authorization", f"Bearer {token}")
        open_url = urllib.request.build_opener(_TokenOnSameHost()).open
    with open_url(request, timeout=timeout) as resp:
        if start and resp.status != 206:  # the server ignored the range: take it all again
            start = 0
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        show = progress and (total or asset.size or 0) >= PROGRESS_MIN_BYTES
        with open(part, "ab" if start else "wb") as f, \
                tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=Path(asset.filename).name, disable=not show) as bar:
            while block := resp.read(_CHUNK):
                f.write(block)
                bar.update(len(block))
    got = part.stat().st_size
    if total is not None and got < total:
        raise http.client.IncompleteRead(b"", total - got)


def _finish(asset: Asset, part: Path, dest: Path) -> str | None:
    """Verify the downloaded `part` (extracting the archive member if needed) and move it
    into place. Returns None on success, else the fault; `dest` is only ever written whole."""
    if asset.archive_member is None:
        fault = verify_file(part, asset)
        if fault is None:
            os.replace(part, dest)
        return fault
    tmp = _unique_tmp(dest)
    try:
        with zipfile.ZipFile(part) as archive:
            members = [m for m in archive.namelist() if Path(m).name == asset.archive_member]
            if not members:
                return f"the zip holds no {asset.archive_member!r} (it has {archive.namelist()})"
            with archive.open(members[0]) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
        fault = verify_file(tmp, asset)
        if fault is None:
            os.replace(tmp, dest)
        return fault
    except zipfile.BadZipFile:
        return "the download is not a valid zip file"
    finally:
        tmp.unlink(missing_ok=True)


def share_with_tiktoken(name: str, path: Path) -> None:
    """Copy the fetched asset `name` (its file at `path`) to where tiktoken's own loader looks
    for the asset's URL: tiktoken's cache folder, one file per URL named by the URL's sha1. Then
    `tiktoken.get_encoding(...)` finds it without a download. Does nothing if the user switched
    that cache off (`TIKTOKEN_CACHE_DIR=""`) or the folder cannot be written."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache == "":
        return
    folder = Path(cache) if cache else Path(tempfile.gettempdir()) / "data-gym-cache"
    target = folder / hashlib.sha1(get_asset(name).url.encode()).hexdigest()
    if target.exists():
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)  # whole or not at all
    except OSError:
        pass  # a read-only temp folder: tiktoken will download the file itself when asked
