"""Downloads from the Hugging Face hub, with every failure turned into one actionable ModelError."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from models.errors import ModelError, one_line

FileChoice = str | tuple[str, ...]


def fetch(
    repo_id: str, files: Sequence[FileChoice], key: str, hint: str = "", what: str = "the weights",
    local_option: bool = True,
) -> list[Path]:
    """Download `files` of `repo_id` (each a name or a tuple of alternatives); their local paths.

    The files land in the hub cache's snapshot folder, laid out like the repository, so that folder
    loads exactly like a local --weights folder. Files already cached are used without a download.
    `hint`, `what` and `local_option` shape the error message (see hub_error).
    """
    return [
        Path(_fetch_one(repo_id, (c,) if isinstance(c, str) else tuple(c), key, (hint, what, local_option)))
        for c in files
    ]


def _fetch_one(repo_id: str, names: tuple[str, ...], key: str, message: tuple[str, str, bool]) -> str:
    """The local path of the first of `names` that the repository has."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    first_error: Exception | None = None
    for name in names:
        try:
            return hf_hub_download(repo_id=repo_id, filename=name)
        except RemoteEntryNotFoundError:
            continue  # the repository exists but stores this file under another name
        except (OSError, ValueError) as error:  # offline, gated, private, bad id: reported below
            first_error = first_error or error
    if first_error is None:
        raise ModelError(
            f"hf-hub:{repo_id} has none of {', '.join(names)}, needed by model {key}; "
            "download the weights yourself and pass --weights PATH"
        )
    raise hub_error(repo_id, first_error, key, *message) from first_error


def hub_error(
    repo_id: str, error: Exception, key: str, hint: str = "", what: str = "the weights", local_option: bool = True,
) -> ModelError:
    """A one-line ModelError naming the hub id, what went wrong and how to provide the files.

    hint: extra advice for this repository (e.g. how to get access to a gated model);
    local_option: whether passing --weights PATH is a way out.
    """
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(error, GatedRepoError):
        why = "access to this gated repository has not been granted to you"
        how = hint or f"request access on https://huggingface.co/{repo_id} and log in with `huggingface-cli login`"
    elif isinstance(error, RepositoryNotFoundError):
        why = "repository not found, or private and you are not logged in"
        how = hint or "check the id and log in with `huggingface-cli login`"
    elif isinstance(error, (LocalEntryNotFoundError, ConnectionError)):
        why = "the hub cannot be reached (no internet, or HF_HUB_OFFLINE=1) and the files are not in the cache"
        how = "connect to the internet once so that they are cached" + (f" ({hint})" if hint else "")
    else:
        why = one_line(error)
        how = hint or "retry later"
    tail = ", or download the files elsewhere and pass --weights PATH (a file or the downloaded folder)"
    suffix = tail if local_option else ""
    return ModelError(f"cannot get {what} of model {key} from hf-hub:{repo_id}: {why}; {how}{suffix}")
