"""Where a model's files are found: a local dir, or a repo's snapshot in the Hugging Face cache (and the
hub, unless offline), with errors that name the cache dir, the missing file and the offline setting.

>>> d = resolve_model_dir("org/router", ("config.json", "model.safetensors"), what="Router.from_pretrained")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (read now, and as huggingface_hub read it at import)."""
    from huggingface_hub.constants import HF_HUB_OFFLINE

    return bool(HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


LOCAL_PREFIXES = ("/", ".", "~", "runs/")  # runs/: where the scripts write their run folders


def looks_like_path(source: str) -> bool:
    """A source meant as a local path, not a hub repo id ``org/name``: it starts with / . ~ or runs/, has more than
    one '/' (a repo id has one), has the platform's own separator (Windows), or its first component is an existing
    local folder (``runs/quickstrat`` beside ``runs/``).

    >>> looks_like_path("./runs/x"), looks_like_path("runs/quickstrat"), looks_like_path("org/name")
    (True, True, False)
    """
    first = source.replace(os.sep, "/").split("/", 1)[0]
    return (source.startswith(LOCAL_PREFIXES) or source.count("/") > 1 or (os.sep != "/" and os.sep in source)
            or ("/" in source.replace(os.sep, "/") and bool(first) and Path(first).expanduser().is_dir()))


def missing_dir_error(what: str, path: Path) -> FileNotFoundError:
    """The error for a local folder that does not exist, with the nearest sibling's name when one is close."""
    import difflib

    parent = path.parent if str(path.parent) else Path(".")
    siblings = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
    near = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.6)
    hint = (f"; did you mean {str(parent / near[0])!r}?" if near else
            f" ({parent} holds {', '.join(siblings[:8])}{', ...' if len(siblings) > 8 else ''})" if siblings else
            "" if parent.is_dir() else f" ({parent} does not exist either)")
    return FileNotFoundError(f"{what}: no local folder {path}{hint} (taken as a path, not a hub repo id 'org/name')")


def repo_cache_dir(repo_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The HF cache folder of a model repo: ``<cache>/models--<org>--<name>``."""
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache_dir or HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def offline_note(local_only: bool) -> str:
    """How the network was used, for error messages."""
    if not local_only:
        return "looked in the cache and on the hub"
    if hub_offline():
        return "HF_HUB_OFFLINE is set, so not on the network"
    return "local_files_only=True, so not on the network"


def missing_files_error(what: str, where: Path, missing: Sequence[str], local_only: bool,
                        repo_id: str | None = None) -> FileNotFoundError:
    """The error for a dir or a cached snapshot that lacks files (a partial download, a wrong folder)."""
    if repo_id is None:
        return FileNotFoundError(f"{what}: {where} lacks {', '.join(missing)} (expected a save_pretrained dir)")
    return FileNotFoundError(
        f"{what}: the cached snapshot {where} of repo {repo_id!r} lacks {', '.join(missing)} (a partial download; "
        f"{offline_note(local_only)}). Download the whole repo on a machine with access "
        f"(`hf download {repo_id}`), or pass a local dir.")

def resolve_model_dir(name_or_path: str | os.PathLike, files: Sequence[str], *, what: str,
                      revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                      local_files_only: bool | None = None, token: str | bool | None = None) -> Path:
    """A local dir, or a repo id's snapshot (``snapshot_download``), that holds every name in `files`.

    Args:
        name_or_path: a directory, or a hub repo id ``"org/name"``.
        files: the file names that must be there; only these (and README.md) are downloaded.
        what: the caller, for error messages (``"Router.from_pretrained"``).
        revision, cache_dir, token: as in ``huggingface_hub.snapshot_download``.
        local_files_only: only the cache; None means "when HF_HUB_OFFLINE is set".
    """
    source = os.fspath(name_or_path)
    path = Path(source).expanduser()
    if path.is_dir() or isinstance(name_or_path, os.PathLike) or looks_like_path(source):
        if not path.exists():
            raise missing_dir_error(what, path)
        if not path.is_dir():
            raise FileNotFoundError(f"{what}: {path} is not a directory (and not a hub repo id 'org/name')")
        if missing := [f for f in files if not (path / f).is_file()]:
            raise missing_files_error(what, path, missing, local_only=True)
        return path
    from huggingface_hub import snapshot_download

    local_only = hub_offline() if local_files_only is None else bool(local_files_only)
    repo_dir = repo_cache_dir(source, cache_dir)
    try:
        snapshot = Path(snapshot_download(source, revision=revision, cache_dir=cache_dir, local_files_only=local_only,
                                          token=token, allow_patterns=[*files, "README.md"]))
    except Exception as e:  # not cached offline, no such repo, no access, no network: one error that says where
        at = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(
            f"{what}: {source!r} is neither a local directory nor a repo found{at} in the HF cache {repo_dir} "
            f"({offline_note(local_only)}). Cause: {type(e).__name__}: {e}") from e
    if missing := [f for f in files if not (snapshot / f).is_file()]:
        raise missing_files_error(what, snapshot, missing, local_only, repo_id=source)
    return snapshot


def resolve_model_file(repo_id: str, candidates: Sequence[str], *, what: str, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
                       token: str | bool | None = None) -> Path:
    """The first of `candidates` (file names, in order of preference) that repo `repo_id` has: from the HF cache,
    or downloaded (``hf_hub_download``) unless offline. None found is an error naming the cache dir, the
    candidates and the offline setting."""
    from huggingface_hub import hf_hub_download

    local_only = hub_offline() if local_files_only is None else bool(local_files_only)
    causes = []
    for name in candidates:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir,
                                        local_files_only=local_only, token=token))
        except Exception as e:  # not in the cache / not in the repo / no access: try the next name
            causes.append(f"{name}: {type(e).__name__}")
    raise FileNotFoundError(
        f"{what}: repo {repo_id!r} has none of {list(candidates)} in the HF cache {repo_cache_dir(repo_id, cache_dir)} "
        f"({offline_note(local_only)}; a partial download lacks its weights). Tried: {'; '.join(causes)}")
