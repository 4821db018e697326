"""NSPO state in checkpoints: written once, copied, committed with checksums, verified on resume.

Layout of ``checkpoint-N/nspo/`` (one file per rank for what that rank owns, found by tensor name
on load, so a checkpoint resumes on any number of ranks)::

    projector/projector.json, projector/factors-rank*.safetensors
    reference-rank*.safetensors                       # W_ref
    COMMITTED                                         # written last

``COMMITTED`` is JSON: ``global_step``, the SHA-256 and size of *every* file of ``checkpoint-N``
(model, optimizer, trainer state and ``nspo/``) and the projector's metadata. A checkpoint counts
only when that file exists and every listed file still has its digest: a save interrupted before
the commit, or a file damaged afterwards (truncated, garbled, or rewritten with its header intact),
is never resumed from.

The state never changes during a run, so it is written once under ``output_dir/_nspo_state`` with
its digests taken *then*; each checkpoint gets a **copy** (never a hard link, which would let damage
to one file reach every checkpoint), and each copy is checked against those first digests, so
damage to ``_nspo_state`` between saves is caught instead of copied and re-signed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from nspo_trl.nullspace.build import describe_differences, differing_fields

logger = logging.getLogger(__name__)

NSPO_STATE_DIR = "nspo"
STATE_SOURCE_DIR = "_nspo_state"  # "_*" is never uploaded by push_to_hub
REFERENCE_PATTERN = "reference-rank{rank:05d}-of-{world:05d}.safetensors"  # W_ref of the layers a rank owns
COMMIT_MARKER = "COMMITTED"
CHECKPOINT_PREFIX = "checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message is one line naming the file and the fix."""


def file_digest(path: Path) -> dict[str, int | str]:
    """``{"sha256": hex, "bytes": size}`` of one file (streamed)."""
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    return {"sha256": digest, "bytes": path.stat().st_size}


def tree_digests(root: Path, skip: Iterable[str] = ()) -> dict[str, dict[str, int | str]]:
    """Digests of every regular file under ``root``, keyed by POSIX path relative to ``root``."""
    skipped = set(skip)
    return {
        path.relative_to(root).as_posix(): file_digest(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() not in skipped
    }


def write_json_atomically(path: Path, payload: Mapping) -> None:
    """Write, flush to disk, then rename: readers see the old file or the whole new one."""
    staging = path.with_name(f".{path.name}.tmp")
    with staging.open("w") as handle:
        json.dump(payload, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def copy_verified(source: Path, target: Path, digests: Mapping[str, Mapping]) -> None:
    """Copy the state tree ``source`` to ``target`` (through a staging folder) and check every copied
    file against ``digests`` taken when the state was written; a mismatch raises :class:`CheckpointError`
    and leaves no ``target``."""
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    copied = tree_digests(staging)
    if copied != dict(digests):
        shutil.rmtree(staging, ignore_errors=True)
        changed = sorted(set(copied) ^ set(digests) | {k for k in copied if copied[k] != digests.get(k)})
        raise CheckpointError(
            f"{source}: {', '.join(changed)} changed since this run wrote it (damaged on disk); "
            "the checkpoint was not written. Check the disk, then resume from the last committed checkpoint."
        )
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def commit(checkpoint: Path, global_step: int, projector_metadata: Mapping) -> None:
    """Write ``checkpoint/nspo/COMMITTED`` last: the step, every file's digest, the projector's metadata."""
    marker = checkpoint / NSPO_STATE_DIR / COMMIT_MARKER
    files = tree_digests(checkpoint, skip=[f"{NSPO_STATE_DIR}/{COMMIT_MARKER}"])
    write_json_atomically(
        marker, {"global_step": global_step, "files": files, "projector_metadata": dict(projector_metadata)}
    )


def read_commit(checkpoint: Path) -> dict | None:
    """The parsed ``COMMITTED`` record, or None when the checkpoint was never committed."""
    marker = checkpoint / NSPO_STATE_DIR / COMMIT_MARKER
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{marker}: not a valid commit record ({err}).") from None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise CheckpointError(f"{marker}: not a valid commit record (no file digests).")
    return record


def damage(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be trusted (one phrase naming the file), or None when it verifies."""
    try:
        record = read_commit(checkpoint)
    except CheckpointError as err:
        return str(err)
    if record is None:
        return f"{checkpoint / NSPO_STATE_DIR / COMMIT_MARKER} is missing (the save was interrupted)"
    for name, expected in sorted(record["files"].items()):
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected.get("bytes") or file_digest(path)["sha256"] != expected.get("sha256"):
            return f"{path} does not match its checksum (damaged after it was saved)"
    return None


def resume_refusal(problem: str) -> str:
    """The one-line refusal to resume from a checkpoint that :func:`damage` found ``problem`` in."""
    return (
        f"resume_from_checkpoint: {problem}; pass --resume_from_checkpoint true to resume from the newest "
        "intact checkpoint, or an older checkpoint's path."
    )


def checkpoint_steps(output_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` folder, oldest first."""
    found = []
    for path in output_dir.glob(f"{CHECKPOINT_PREFIX}-*"):
        suffix = path.name.rsplit("-", 1)[1]
        if path.is_dir() and suffix.isdigit():
            found.append((int(suffix), path))
    return sorted(found)


def newest_intact(output_dir: Path) -> Path | None:
    """The newest checkpoint that is committed and verifies. Newer ones that fail are renamed
    ``incomplete-checkpoint-N`` (never committed) or ``damaged-checkpoint-N`` (committed, then
    damaged), kept for inspection and out of the way of later saves. Run it on one process."""
    for _, path in reversed(checkpoint_steps(output_dir)):
        problem = damage(path)
        if problem is None:
            return path
        committed = (path / NSPO_STATE_DIR / COMMIT_MARKER).is_file()
        prefix = "damaged" if committed else "incomplete"
        logger.warning("NSPO: not resuming from %s: %s; setting it aside as %s-%s.", path, problem, prefix, path.name)
        os.replace(path, path.with_name(f"{prefix}-{path.name}"))
    return None


WRITE_FAILURE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)
# torch's zip writer turns a failed write into a RuntimeError ("PytorchStreamWriter failed writing file ...")
TORCH_WRITE_FAILURE = ("PytorchStreamWriter failed", "file write failed", "No space left on device")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full or read-only); its partial folder has been removed."""


def is_write_failure(err: BaseException) -> bool:
    """Whether ``err`` is a full or read-only disk, as ``OSError`` or as torch's writer reports it."""
    if isinstance(err, OSError):
        return err.errno in WRITE_FAILURE_ERRNOS
    return isinstance(err, RuntimeError) and any(text in str(err) for text in TORCH_WRITE_FAILURE)


def state_bytes(tensors) -> int:
    """Bytes of the tensors in a (nested) state: a model's parameters, an optimizer's ``state``."""
    import torch

    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, Mapping):
        return sum(state_bytes(v) for v in tensors.values())
    if isinstance(tensors, list | tuple):
        return sum(state_bytes(v) for v in tensors)
    return 0


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def write_failure(checkpoint: Path, err: BaseException, needed: int) -> CheckpointWriteError:
    """Remove the partial ``checkpoint`` and return the one-line error naming it, the bytes it needs and the
    bytes free there. Committed checkpoints are untouched."""
    shutil.rmtree(checkpoint, ignore_errors=True)
    existing = checkpoint
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0][:120]
    return CheckpointWriteError(
        errno.ENOSPC,
        f"could not write the checkpoint ({reason}); it needs about {needed / 2**30:.2f} GiB and "
        f"{free / 2**30:.2f} GiB are free there, so free space or set save_total_limit; the partial "
        "checkpoint was removed",
        str(checkpoint),
    )


class CheckpointingMixin:
    """The NSPO state in a ``Trainer``'s checkpoints (mixed into :class:`~nspo_trl.trainer.NSPOTrainer`).

    Uses the trainer's ``projector``, ``constrained_update``, ``accelerator``, ``args`` and ``state``; saving
    goes through ``Trainer._save_checkpoint`` (the one place transformers writes a checkpoint) and resuming
    through ``train(resume_from_checkpoint=...)``.
    """

    _state_digests: dict | None = None  # digests of output_dir/_nspo_state once written (main process)

    def projector_identity(self) -> dict:
        """What this run's projector was built from and by which rule: equal identities mean the same ``P``."""
        return {**self.projector.metadata, "rule": self.projector.rule.to_dict()}

    def save_nspo_state(self, directory: str | os.PathLike) -> None:
        """Write the projector, the reference weights and the probes under ``directory/nspo``, then commit.

        The state never changes during a run: this trainer writes it once under
        ``output_dir/_nspo_state`` (each rank the part it owns), takes its digests then, and copies it
        into each checkpoint, checking the copy against those digests (see ``nspo_trl.trainer.checkpointing``).
        ``nspo/COMMITTED``, with the digest of every file of the checkpoint, is written last. Collective.
        """
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        main = self.accelerator.is_main_process
        source = Path(self.args.output_dir) / STATE_SOURCE_DIR
        if self._state_digests is None:
            staging = source.with_name(f"{STATE_SOURCE_DIR}.tmp")
            if main:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            self.projector.save(staging / "projector")
            reference = {k: v.detach().cpu().contiguous() for k, v in self.constrained_update.reference.items()}
            save_file(reference, str(staging / REFERENCE_PATTERN.format(rank=rank, world=world)))
            self.accelerator.wait_for_everyone()
            if main:
                shutil.rmtree(source, ignore_errors=True)
                os.replace(staging, source)
            self._state_digests = tree_digests(source) if main else {}
        self.accelerator.wait_for_everyone()  # every rank's share of the checkpoint is on disk before the digests
        if main:
            checkpoint = Path(directory)
            copy_verified(source, checkpoint / NSPO_STATE_DIR, self._state_digests)
            commit(checkpoint, self.state.global_step, self.projector_identity())
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, model, trial) -> None:
        """Commit each checkpoint before any older one is rotated away.

        transformers writes ``checkpoint-N`` in place and then deletes checkpoints beyond
        ``save_total_limit``. Here rotation waits until ``checkpoint-N/nspo/COMMITTED`` exists (written
        last, after the NSPO state), so a crash mid-save always leaves a committed checkpoint to resume.
        """
        self.leakage()  # collective: refresh the figures the model card reports
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        checkpoint = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
            self.save_nspo_state(checkpoint)
        except (OSError, RuntimeError) as err:  # a full or read-only disk: one line, no partial checkpoint
            if not is_write_failure(err):
                raise
            needed = state_bytes(dict(self.model.state_dict())) + folder_bytes(
                Path(self.args.output_dir) / STATE_SOURCE_DIR
            )
            if self.optimizer is not None:
                needed += state_bytes(self.optimizer.state_dict()["state"])
            raise write_failure(checkpoint, err, needed) from None
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=self.args.output_dir,
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def load_nspo_state(self, checkpoint: str | os.PathLike, verified: bool = False) -> None:
        """Restore projector, ``W_ref`` and probes saved by [`save_nspo_state`] in ``checkpoint``.

        The checkpoint must verify against its commit record, and its projector must have been built
        from the same model, preservation data and rule as this run's (else one-line
        ``CheckpointError`` naming the differing fields). Each rank loads what it owns now, whatever
        number of ranks wrote the checkpoint. ``verified``: the caller has just checked the digests.
        """
        checkpoint = Path(checkpoint)
        state = checkpoint / NSPO_STATE_DIR
        if not state.is_dir():
            raise CheckpointError(
                f"resume_from_checkpoint: {checkpoint} has no {NSPO_STATE_DIR}/ state (not an NSPO checkpoint)."
            )
        if not verified:
            problem = [damage(checkpoint) if self.accelerator.is_main_process else None]
            broadcast_object_list(problem)  # one rank reads the files; every rank gets the verdict
            if problem[0] is not None:
                raise CheckpointError(resume_refusal(problem[0]))
        saved_identity = read_commit(checkpoint)["projector_metadata"]
        if differing_fields(saved_identity, self.projector_identity()):
            raise CheckpointError(
                f"resume_from_checkpoint: {checkpoint} was trained with another projector: "
                f"{describe_differences(saved_identity, self.projector_identity())}. Resume with the "
                "settings it was trained with, or start a new run in another output_dir."
            )
        self.projector = self.constrained_update.projector = self.load_projector(
            state / "projector", field="resume_from_checkpoint"
        )
        wanted = set(self.constrained_update.reference)
        reference: dict[str, torch.Tensor] = {}
        for shard in sorted(state.glob("reference-rank*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                reference.update({key: handle.get_tensor(key) for key in handle.keys() if key in wanted})  # noqa: SIM118
        self.constrained_update.load_reference(reference)
        self._state_digests = None  # the next checkpoint carries the restored state

    def last_committed_checkpoint(self) -> str | None:
        """The newest checkpoint in ``output_dir`` that is committed and verifies; newer ones that do not
        are set aside (see :func:`nspo_trl.trainer.newest_intact`)."""
        found = [None]
        if self.accelerator.is_main_process:
            newest = newest_intact(Path(self.args.output_dir))
            found = [None if newest is None else str(newest)]
        broadcast_object_list(found)  # one rank reads and sets aside; every rank resumes from its choice
        return found[0]

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``resume_from_checkpoint=True`` (or ``"last"``) resumes from the newest intact checkpoint."""
        checkpoint, verified = resume_from_checkpoint, False
        if checkpoint is True or (isinstance(checkpoint, str) and checkpoint.lower() in ("true", "last")):
            checkpoint = self.last_committed_checkpoint()
            if checkpoint is None:
                raise CheckpointError(
                    f"resume_from_checkpoint: no intact committed checkpoint in {self.args.output_dir}."
                )
            verified = True
        if isinstance(checkpoint, str):
            self.load_nspo_state(checkpoint, verified=verified)
        return super().train(checkpoint, *args, **kwargs)
