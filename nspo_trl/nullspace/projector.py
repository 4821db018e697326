"""Null-space projectors in factor form, and their storage.

For one group of linear layers that read the same input ``x ∈ R^n`` the covariance
``C = U Λ Uᵀ`` (``torch.linalg.eigh``, eigenvalues ascending) splits ``R^n`` into the null
space ``U_0 = U[:, :k]`` (eigenvalues the rule calls negligible) and the range
``U_r = U[:, k:]``. The projector is ``P = U_0 U_0ᵀ = I − U_r U_rᵀ`` (``n × n``, symmetric,
idempotent). It is never stored densely: a :class:`SubspaceFactor` keeps whichever basis is
thinner, ``U_0`` (``n × k``) when ``k ≤ n − k`` and ``U_r`` (``n × (n − k)``) otherwise, and
applies ``D ↦ D P`` to any ``D`` of shape ``(…, n)`` in ``O(|D| · min(k, n − k))``.

Under data parallelism only the group's owner rank (``sharding.py``) holds the basis; every
rank knows every group's spectrum, null dimension and kind (a few floats per input feature),
so decisions such as which layers to freeze are the same everywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nspo_trl.nullspace.contrast import CONTRAST_RIDGE, contrast_basis_from_eigh, dim_within_budget, energy_curve
from nspo_trl.nullspace.rule import NullSpaceRule
from nspo_trl.nullspace.sharding import all_gather_objects, barrier, rank_and_world
from nspo_trl.utils import progress_bar_disabled

FORMAT_VERSION = 2
METADATA_FILE = "projector.json"
SHARD_PATTERN = "factors-rank{rank:05d}-of-{world:05d}.safetensors"  # one file per owner rank


@dataclass
class SubspaceFactor:
    """``P`` for one input space, as a thin orthonormal basis.

    Attributes:
        basis: ``(n, d)`` with orthonormal columns, ``d = min(k, n − k)``; None on ranks that do
            not own the group.
        kind: ``"null"`` when ``basis = U_0`` (``P = B Bᵀ``), ``"range"`` when ``basis = U_r``
            (``P = I − B Bᵀ``).
        eigenvalues: ``(n,)`` float64 eigenvalues of ``C``, ascending (kept for stats/plots).
        null_dim: ``k``.
        fit_energy: for a subspace chosen by contrast (:meth:`from_contrast`), the share of the
            protected inputs' energy ``tr(P C)/tr(C)`` it holds (``C``: the pencil's right side, the
            preservation covariance plus, with ``nspo_contrast_protect_benign``, the benign prompts');
            ``None`` for NSPO's null space, where that share is the sum of the ``k`` smallest eigenvalues.
    """

    basis: torch.Tensor | None
    kind: Literal["null", "range"]
    eigenvalues: torch.Tensor
    null_dim: int
    fit_energy: float | None = None

    @property
    def in_features(self) -> int:
        return self.eigenvalues.numel()

    @property
    def stored_dim(self) -> int:
        return self.null_dim if self.kind == "null" else self.in_features - self.null_dim

    def without_basis(self) -> SubspaceFactor:
        """The same factor as seen by a rank that does not own it."""
        return dataclasses.replace(self, basis=None)

    @classmethod
    def from_covariance(
        cls, covariance: torch.Tensor, rule: NullSpaceRule, basis_dtype: torch.dtype = torch.float32
    ) -> SubspaceFactor:
        """Eigendecompose a symmetric PSD ``(n, n)`` covariance (in float64) and keep the thin basis."""
        cov = covariance.detach().to(torch.float64)
        # eigh reads only the lower triangle, so accumulation round-off above it is irrelevant and no
        # symmetrized n × n copy is needed (at n = 18944 that copy alone is 2.7 GiB in float64)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        n = cov.shape[0]
        k = rule.null_dim(eigenvalues)
        if k <= n - k:
            basis, kind = eigenvectors[:, :k], "null"
        else:
            basis, kind = eigenvectors[:, k:], "range"
        return cls(basis.to(basis_dtype).contiguous(), kind, eigenvalues.cpu(), k)

    @classmethod
    def from_contrast(
        cls,
        c_general: torch.Tensor,
        c_target: torch.Tensor,
        heldout_rows: torch.Tensor,
        budget: float,
        ridge: float = CONTRAST_RIDGE,
        basis_dtype: torch.dtype = torch.float32,
    ) -> SubspaceFactor:
        """The contrast subspace of one input group (``nspo_subspace: contrast``).

        ``Q`` = :func:`~nspo_trl.nullspace.contrast.contrast_basis` of the pencil ``(C_target, C_general + εI)``
        (``(n, n)``, leading columns most target-specific; ``C_general`` is eigendecomposed once, for ``Q`` and
        the stored eigenvalues); ``k`` is the largest dimension whose share of the
        held-out preservation energy ``‖Q_{:k}ᵀ Xᵀ‖² / ‖X‖²`` (``heldout_rows``: ``(t, n)``) stays within
        ``budget``. ``P = Q_{:k} Q_{:k}ᵀ``, stored as ``Q_{:k}`` or, when thinner, as its complement ``Q_{k:}``.
        """
        c_general = c_general.to(torch.float64)
        eigenvalues, eigenvectors = torch.linalg.eigh(c_general)
        basis = contrast_basis_from_eigh(eigenvalues, eigenvectors, c_target, ridge)
        rows = heldout_rows.to(torch.float64)
        k = dim_within_budget(energy_curve(basis, rows.T @ rows), budget)
        fit_energy = float(energy_curve(basis[:, :k], c_general)[-1]) if k else 0.0
        kept, kind = (basis[:, :k], "null") if k <= basis.shape[0] - k else (basis[:, k:], "range")
        return cls(kept.to(basis_dtype).contiguous(), kind, eigenvalues.cpu(), k, fit_energy)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SubspaceFactor:
        basis = None if self.basis is None else self.basis.to(device=device, dtype=dtype)
        return dataclasses.replace(self, basis=basis)

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        """Return ``delta @ P`` for ``delta`` of shape ``(…, n)``, in ``delta``'s dtype and device."""
        if self.basis is None:
            raise RuntimeError("this rank does not own the projector basis (apply it on the owner rank)")
        basis = self.basis.to(device=delta.device, dtype=delta.dtype)
        along_basis = (delta @ basis) @ basis.T
        return along_basis if self.kind == "null" else delta - along_basis

    def null_basis(self) -> torch.Tensor:
        """An orthonormal basis ``U₀`` ``(n, k)`` of the null space itself (``P = U₀ U₀ᵀ``).

        The stored basis when it is ``U₀``; otherwise the complement of the stored range basis, from a
        complete QR of it (``O(n³)`` once, an ``n × n`` temporary).
        """
        if self.basis is None:
            raise RuntimeError("this rank does not own the projector basis (ask the owner rank)")
        if self.kind == "null":
            return self.basis
        complete, _ = torch.linalg.qr(self.basis.double(), mode="complete")
        return complete[:, self.stored_dim :].to(self.basis.dtype).contiguous()

    def dense(self) -> torch.Tensor:
        """The explicit ``(n, n)`` projector (for tests and small layers only)."""
        eye = torch.eye(self.in_features, dtype=self.basis.dtype, device=self.basis.device)
        return self.apply(eye)

    def stats(self) -> dict:
        lam = self.eigenvalues.clamp_min(0.0)
        lam_max = float(lam[-1])
        k = self.null_dim
        return {
            "in_features": self.in_features,
            "null_dim": k,
            "null_fraction": k / self.in_features,
            "stored": self.kind,
            "stored_dim": self.stored_dim,
            "lambda_max": lam_max,
            # largest eigenvalue declared null, relative to λmax (≤ alpha by construction; none for contrast)
            "null_lambda_rel": float(lam[k - 1]) / lam_max if k and self.fit_energy is None else None,
            # fraction of the preservation energy tr(C) that lies in the null space
            "null_energy_fraction": (
                self.fit_energy if self.fit_energy is not None else float(lam[:k].sum() / lam.sum()) if k else 0.0
            ),
        }


@dataclass
class NullSpaceProjector:
    """Projectors for every protected layer of a model.

    ``factors`` maps a *group* (the first module of a set of layers that read the same input,
    e.g. ``gate_proj``/``up_proj`` in Llama/Qwen MLPs) to its :class:`SubspaceFactor`;
    ``groups`` maps each protected module name to its group. ``metadata`` records what the
    projector was built from (rule, model fingerprint, data hash, token counts) so a cached one
    is only reused for the same inputs. ``probes`` holds reference-model input rows per split
    (``"fit"``: the data ``C`` was built from; ``"heldout"``: preservation data it never saw),
    ``{split: {group: (t, n) float32}}``, for measuring leakage during training; like the bases,
    only a group's owner holds its probes. ``owners`` maps each group to its owner rank (absent:
    rank 0, the only rank of a single process).
    """

    factors: dict[str, SubspaceFactor]
    groups: dict[str, str]
    rule: NullSpaceRule
    metadata: dict = field(default_factory=dict)
    probes: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    owners: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_covariances(
        cls,
        covariances: Mapping[str, torch.Tensor],
        groups: Mapping[str, str],
        rule: NullSpaceRule,
        metadata: dict | None = None,
        probes: dict[str, dict[str, torch.Tensor]] | None = None,
        progress: bool = False,
        owners: Mapping[str, int] | None = None,
    ) -> NullSpaceProjector:
        """Build the factor of every group whose ``(n, n)`` covariance this rank holds.

        Distributed, each rank passes the covariances of the groups it owns (``owners``); the
        eigendecompositions then run in parallel, and the spectra are exchanged so that every rank
        knows every group's null dimension. Collective when ``torch.distributed`` is initialised.
        """
        from tqdm.auto import tqdm

        local = {
            group: SubspaceFactor.from_covariance(cov, rule)
            for group, cov in tqdm(
                covariances.items(), desc="NSPO eigendecompositions", disable=progress_bar_disabled(progress)
            )
        }
        return cls.from_local_factors(local, groups, rule, metadata, probes, owners)

    @classmethod
    def from_local_factors(
        cls,
        local: Mapping[str, SubspaceFactor],
        groups: Mapping[str, str],
        rule: NullSpaceRule,
        metadata: dict | None = None,
        probes: dict[str, dict[str, torch.Tensor]] | None = None,
        owners: Mapping[str, int] | None = None,
    ) -> NullSpaceProjector:
        """Assemble a projector from the factors this rank built (those of the groups it owns).

        The spectra are exchanged so that every rank knows every group's null dimension; only the
        owners keep bases. Collective when ``torch.distributed`` is initialised.
        """
        shared: dict[str, SubspaceFactor] = {}
        for part in all_gather_objects({g: f.without_basis() for g, f in local.items()}):
            shared.update(part)
        factors = {group: local.get(group, shared[group]) for group in dict.fromkeys(groups.values())}
        return cls(factors, dict(groups), rule, dict(metadata or {}), dict(probes or {}), dict(owners or {}))

    def owner_of(self, group: str) -> int:
        return self.owners.get(group, 0)

    def factor_for(self, module_name: str) -> SubspaceFactor:
        return self.factors[self.groups[module_name]]

    def apply(self, module_name: str, delta: torch.Tensor) -> torch.Tensor:
        """``delta @ P`` for the projector of ``module_name`` (``delta``: ``(out, in)`` or ``(r, in)``)."""
        return self.factor_for(module_name).apply(delta)

    def modules(self) -> Iterator[str]:
        return iter(self.groups)

    def frozen_modules(self) -> list[str]:
        """Modules whose null space is empty (``P = 0``): they cannot change at all."""
        return [m for m, g in self.groups.items() if self.factors[g].null_dim == 0]

    def to(self, device: torch.device | str) -> NullSpaceProjector:
        factors = {g: f.to(device) for g, f in self.factors.items()}
        return NullSpaceProjector(factors, self.groups, self.rule, self.metadata, self.probes, self.owners)

    def stats(self) -> dict[str, dict]:
        """Per-group statistics, with the member modules listed."""
        members: dict[str, list[str]] = {}
        for module, group in self.groups.items():
            members.setdefault(group, []).append(module)
        return {g: {**f.stats(), "modules": members[g]} for g, f in self.factors.items()}

    def summary(self) -> dict:
        """Totals over all groups (whichever rank holds them): null dimensions and storage."""
        total_in = sum(f.in_features for f in self.factors.values())
        total_null = sum(f.null_dim for f in self.factors.values())
        stored = sum(f.in_features * f.stored_dim for f in self.factors.values())
        dense = sum(f.in_features**2 for f in self.factors.values())
        return {
            "groups": len(self.factors),
            "modules": len(self.groups),
            "frozen_modules": len(self.frozen_modules()),
            "null_dim_total": total_null,
            "in_features_total": total_in,
            "null_fraction": total_null / total_in if total_in else 0.0,
            "stored_elements": stored,
            "dense_elements": dense,
        }

    def describe(self) -> str:
        """One line: layers, input groups, null dimensions, frozen layers and storage (for logs and the CLI)."""
        s = self.summary()
        return (
            f"{s['modules']} layers in {s['groups']} input groups, null dims {s['null_dim_total']} / "
            f"{s['in_features_total']} ({100 * s['null_fraction']:.1f}%), {s['frozen_modules']} frozen, "
            f"stored {s['stored_elements'] / 1e6:.2f} M elements (dense P: {s['dense_elements'] / 1e6:.2f} M)"
        )

    # ------------------------------------------------------------------ storage
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``projector.json`` and one ``factors-rank*.safetensors`` per rank, atomically.

        Each rank writes the bases, spectra and probes of the groups it owns; rank 0 then writes the
        metadata and moves the finished directory into place, so a crash never leaves a half-written
        projector behind. Collective when distributed (``directory`` must be on a shared filesystem).
        """
        directory = Path(directory)
        rank, world = rank_and_world()
        staging = directory.with_name(f".{directory.name}.staging")
        if rank == 0:
            directory.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        barrier()
        tensors: dict[str, torch.Tensor] = {}
        for group, factor in self.factors.items():
            if factor.basis is not None:
                tensors[f"basis/{group}"] = factor.basis.detach().cpu().contiguous()
                tensors[f"eigenvalues/{group}"] = factor.eigenvalues.detach().cpu().contiguous()
        for split, by_group in self.probes.items():
            for group, rows in by_group.items():
                tensors[f"probes/{split}/{group}"] = rows.detach().cpu().contiguous()
        save_file(tensors, str(staging / SHARD_PATTERN.format(rank=rank, world=world)))
        barrier()
        if rank == 0:
            meta = {
                "format_version": FORMAT_VERSION,
                "rule": self.rule.to_dict(),
                "groups": self.groups,
                "factors": [
                    {"group": g, "kind": f.kind, "null_dim": f.null_dim, "fit_energy": f.fit_energy}
                    for g, f in self.factors.items()
                ],
                "splits": sorted(self.probes),
                "metadata": self.metadata,
                "stats": self.stats(),
            }
            (staging / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            _replace_directory(staging, directory)
        barrier()
        return directory

    @staticmethod
    def read_groups(directory: str | os.PathLike) -> dict[str, str]:
        """Module → group map of a saved projector (to decide ownership before loading any tensor)."""
        meta_path = Path(directory) / METADATA_FILE
        if not meta_path.is_file():
            raise ValueError(f"{directory} holds no NSPO projector ({METADATA_FILE} is missing); {_REBUILD}")
        return _read_metadata(meta_path)["groups"]

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        device: torch.device | str = "cpu",
        owners: Mapping[str, int] | None = None,
    ) -> NullSpaceProjector:
        """Load a saved projector; this rank keeps the bases and probes of the groups ``owners`` gives it.

        The files may have been written by any number of ranks: tensors are found by name.
        """
        directory = Path(directory)
        meta_path = directory / METADATA_FILE
        shards = sorted(directory.glob("factors-rank*.safetensors"))
        if not meta_path.is_file() or not shards:
            raise ValueError(f"{directory} holds no NSPO projector ({METADATA_FILE} + factors-rank*); {_REBUILD}")
        meta = _read_metadata(meta_path)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: projector format {meta.get('format_version')} != {FORMAT_VERSION}; rebuild it "
                "(delete the directory or point nspo_projector_path elsewhere)."
            )
        owners = dict(owners or {})
        rank, _ = rank_and_world()
        mine = {entry["group"] for entry in meta["factors"] if owners.get(entry["group"], 0) == rank}
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            try:
                with safe_open(str(shard), framework="pt", device=str(device)) as handle:
                    for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                        kind, rest = key.split("/", 1)
                        group = rest.split("/", 1)[-1]
                        if kind == "eigenvalues" or group in mine:
                            tensors[key] = handle.get_tensor(key)
            except (OSError, ValueError, RuntimeError, SafetensorError) as err:
                raise ValueError(f"{shard}: {_UNREADABLE} ({_one_line(err)}); {_REBUILD}") from None
        factors = {}
        for entry in meta["factors"]:
            group = entry["group"]
            if f"eigenvalues/{group}" not in tensors or (group in mine and f"basis/{group}" not in tensors):
                raise ValueError(f"{directory}: the factors of input group {group!r} are missing; {_REBUILD}")
            basis = tensors.get(f"basis/{group}") if group in mine else None
            eigenvalues = tensors[f"eigenvalues/{group}"].cpu()
            fit_energy = entry.get("fit_energy")  # set for a contrast subspace only
            factors[group] = SubspaceFactor(basis, entry["kind"], eigenvalues, entry["null_dim"], fit_energy)
        probes: dict[str, dict[str, torch.Tensor]] = {}
        for key, rows in tensors.items():
            if key.startswith("probes/"):
                _, split, group = key.split("/", 2)
                probes.setdefault(split, {})[group] = rows.cpu()
        return cls(factors, meta["groups"], NullSpaceRule(**meta["rule"]), meta["metadata"], probes, owners)


_UNREADABLE = "not a readable NSPO projector file"
_REBUILD = "delete the projector directory to rebuild it, or point nspo_projector_path elsewhere."


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _read_metadata(path: Path) -> dict:
    """``projector.json`` parsed and checked for the keys a load needs; one-line ValueError naming it otherwise."""
    try:
        meta = json.loads(path.read_text())
        missing = [key for key in ("groups", "factors", "rule", "metadata") if key not in meta]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as err:
        raise ValueError(f"{path}: {_UNREADABLE} ({_one_line(err)}); {_REBUILD}") from None
    if missing:
        raise ValueError(f"{path}: {_UNREADABLE} (no {', '.join(missing)}); {_REBUILD}")
    return meta


def _replace_directory(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``, replacing an existing directory without a window where neither exists."""
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
        os.replace(staging, target)
        for child in backup.iterdir():
            child.unlink()
        backup.rmdir()
    else:
        os.replace(staging, target)


def tensor_digest(tensors: Mapping[str, torch.Tensor], sample: int = 4096) -> str:
    """A cheap, deterministic fingerprint of named tensors: names, shapes, dtypes and an even sample of values."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        flat = tensor.reshape(-1)
        if flat.numel():
            # float32 spacing rounds the last index up to numel past 2^24 elements (a 7B MLP weight); the clamp keeps
            # every smaller tensor's digest, and so every stored projector and checkpoint, as it was
            index = torch.linspace(0, flat.numel() - 1, min(sample, flat.numel())).long().clamp_(max=flat.numel() - 1)
            index = index.to(flat.device)
            digest.update(flat[index].to(torch.float64).cpu().numpy().tobytes())
    return digest.hexdigest()
