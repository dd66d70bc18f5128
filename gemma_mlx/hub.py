"""Checkpoints named by Hugging Face Hub id: `org/name` or `org/name@revision` (branch, tag or
commit). Downloaded once into the standard Hugging Face cache with huggingface_hub (only the files
a checkpoint needs, resumable, with its progress bars), honouring `HF_HUB_OFFLINE`, `HF_HOME` /
`HF_HUB_CACHE` and the saved token. One resolver for `--model`, `--draft` and `convert SRC`.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .safetensors_file import CheckpointError

# What a checkpoint directory needs: config, weights, tokenizer, templates, processor configs.
PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def parse_repo_id(text: str) -> tuple[str, str | None] | None:
    """`org/name[@revision]` -> (repo id, revision or None); None when `text` is not one."""
    repo, at, revision = text.partition("@")
    if not REPO_ID.match(repo) or repo.startswith(".") or (at and not revision):
        return None
    return repo, revision or None


def resolve(source: str | Path, what: str = "checkpoint") -> Path:
    """A local `what` directory as it is, or a Hub id's snapshot in the Hugging Face cache
    (downloaded if missing). Every failure is one `CheckpointError` line saying what to do."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    parsed = None if path.exists() else parse_repo_id(str(source))
    if parsed is None:
        raise CheckpointError(
            f"{source}: no such {what} directory (nor a Hub repo id like 'org/name' or 'org/name@revision')"
        )
    repo, revision = parsed
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=PATTERNS))
    except GatedRepoError:
        raise CheckpointError(
            f"{source}: gated on the Hub; accept its licence on https://huggingface.co/{repo} and log in "
            "(`hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{source}: the Hub repo {repo} has no revision '{revision}'") from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{source}: no such local directory and no such Hub repo (check the spelling; a private repo "
            "needs `hf auth login`)"
        ) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise CheckpointError(
            f"{source}: not in the Hugging Face cache and the Hub cannot be reached (offline: HF_HUB_OFFLINE "
            "is set or there is no network); download it once online, or pass a local directory"
        ) from None
    except HFValidationError as e:
        raise CheckpointError(f"{source}: not a valid Hub repo id ({e})") from None
    except OSError as e:  # HTTP and connection errors, incomplete snapshots
        raise CheckpointError(f"{source}: download from the Hugging Face Hub failed ({e}); retry") from None
