"""Downloads from the Hugging Face hub, with every failure turned into one actionable ModelError.

Offline, huggingface_hub retries every file with a growing back-off (over a minute per model). So the
hub is asked at most once per process whether it answers (a short probe), and when it does not, or
when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set, files come from the local cache only: a cached
model loads at once and a missing one fails at once with one line saying what to do.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

from models.errors import ModelError, one_line

FileChoice = str | tuple[str, ...]
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
PROBE_TIMEOUT_S = 5.0  # one request to the hub's front page; any HTTP answer means it is reachable


def fetch(
    repo_id: str, files: Sequence[FileChoice], key: str, hint: str = "", what: str = "the weights",
    local_option: bool = True,
) -> list[Path]:
    """Download `files` of `repo_id` (each a name or a tuple of alternatives); their local paths.

    The files land in the hub cache's snapshot folder, laid out like the repository, so that folder
    loads exactly like a local --weights folder. Files already cached are used without a download;
    offline (see offline_reason), only cached files are used and nothing is retried.
    `hint`, `what` and `local_option` shape the error message (see hub_error).
    """
    return [
        Path(_fetch_one(repo_id, (c,) if isinstance(c, str) else tuple(c), key, (hint, what, local_option)))
        for c in files
    ]


def _fetch_one(repo_id: str, names: tuple[str, ...], key: str, message: tuple[str, str, bool]) -> str:
    """The local path of the first of `names` that the repository (or, offline, the cache) has."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    offline = offline_reason()
    first_error: Exception | None = None
    for name in names:
        try:
            return hf_hub_download(repo_id=repo_id, filename=name, local_files_only=offline is not None)
        except RemoteEntryNotFoundError:
            continue  # the repository exists but stores this file under another name
        except (OSError, ValueError) as error:  # not cached offline, gated, private, bad id: reported below
            first_error = first_error or error
    if first_error is None:
        raise ModelError(
            f"hf-hub:{repo_id} has none of {', '.join(names)}, needed by model {key}; "
            "download the weights yourself and pass --weights PATH"
        )
    raise hub_error(repo_id, first_error, key, *message, offline=offline) from first_error


def offline_reason() -> str | None:
    """Why the hub is not used in this process (an offline variable, or no answer to the probe); None if it is."""
    from huggingface_hub import constants

    for variable in OFFLINE_VARIABLES:
        if _is_true(os.environ.get(variable)):
            return f"{variable}={os.environ[variable]} is set"
    endpoint = constants.ENDPOINT
    if endpoint not in _PROBED and constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if not hub_reachable(endpoint):
        return f"no internet: {endpoint} cannot be reached"
    return None


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().upper() in {"1", "ON", "YES", "TRUE"}


_PROBED: dict[str, bool] = {}  # endpoint -> answered; the probe runs once per endpoint and process


def hub_reachable(endpoint: str) -> bool:
    """Whether `endpoint` answers one HTTP request within PROBE_TIMEOUT_S (asked once per process).

    The request goes through huggingface_hub's own client, so its proxy and certificate settings apply.
    It runs in a daemon thread, so that a name lookup that hangs cannot hold the caller longer. When the
    hub does not answer, huggingface_hub is switched to offline mode for this process, so that the
    libraries that fetch files themselves (transformers, open_clip tokenizers) read their caches at
    once instead of retrying.
    """
    if endpoint in _PROBED:
        return _PROBED[endpoint]
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    answered: list[bool] = []

    def probe() -> None:
        try:
            get_session().head(endpoint, timeout=PROBE_TIMEOUT_S, follow_redirects=False)
            answered.append(True)
        except Exception:  # any failure to get an answer means: not reachable
            answered.append(False)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 1.0)
    _PROBED[endpoint] = bool(answered and answered[0])
    if not _PROBED[endpoint]:
        constants.HF_HUB_OFFLINE = True
    return _PROBED[endpoint]


def download_command(repo_id: str) -> str:
    """The shell command that downloads a repository into a folder, for this huggingface_hub version."""
    import huggingface_hub

    cli = "hf" if int(huggingface_hub.__version__.split(".")[0]) >= 1 else "huggingface-cli"
    return f"`{cli} download {repo_id} --local-dir DIR`"


def hub_error(
    repo_id: str, error: Exception, key: str, hint: str = "", what: str = "the weights", local_option: bool = True,
    offline: str | None = None,
) -> ModelError:
    """A one-line ModelError naming the hub id, what went wrong and how to provide the files.

    hint: extra advice for this repository (e.g. how to get access to a gated model);
    local_option: whether passing --weights PATH is a way out; offline: why the hub was not asked.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    source = f"cannot get {what} of model {key} from hf-hub:{repo_id}"
    if isinstance(error, (LocalEntryNotFoundError, ConnectionError)):
        reason = offline or "no internet, or HF_HUB_OFFLINE=1"
        why = f"they are not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub cannot be used ({reason})"
        online = "connect to the internet once so that they are cached" + (f" ({hint})" if hint else "")
        if local_option:
            how = (f"{online}, or, where there is no internet, download them elsewhere with "
                   f"{download_command(repo_id)} and pass --weights PATH (that folder, or a checkpoint file)")
        else:
            how = f"{online}, or copy a Hugging Face cache that holds them into {constants.HF_HUB_CACHE}"
        return ModelError(f"{source}: {why}; {how}")
    if isinstance(error, GatedRepoError):
        why = "access to this gated repository has not been granted to you"
        how = hint or f"request access on https://huggingface.co/{repo_id} and log in with `huggingface-cli login`"
    elif isinstance(error, RepositoryNotFoundError):
        why = "repository not found, or private and you are not logged in"
        how = hint or "check the id and log in with `huggingface-cli login`"
    else:
        why = one_line(error)
        how = hint or "retry later"
    tail = ", or download the files elsewhere and pass --weights PATH (a file or the downloaded folder)"
    suffix = tail if local_option else ""
    return ModelError(f"{source}: {why}; {how}{suffix}")
