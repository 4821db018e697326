"""``nspo-trl judge INPUT.jsonl``: judge (prompt, response) pairs, one JSON object per input line, in order.

Each input line is a JSON object with ``prompt`` (a string, or a conversation whose last user turn is
the request) and ``response`` (a string), and optionally ``is_harmful`` (true/false). Each output line
has ``unsafe`` and ``refused`` (booleans; ``refused`` is null for Llama Guard) and their scores
(``unsafe_score``, ``refused_score``; the learned judge adds ``fulfils_score`` and
``harmful_prompt_score``). Every line is read and checked before anything is judged: a bad line stops
the command with one line naming its number and exit code 2, and nothing is printed as if judged.

    nspo-trl judge answers.jsonl                     # the learned judge
    nspo-trl judge answers.jsonl --judge strict      # keyword, strict, llama_guard
    cat answers.jsonl | nspo-trl judge -
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from nspo_trl.eval.judges import JUDGE_NAMES, pair_judge
from nspo_trl.judge.rules import prompt_text
from nspo_trl.utils import progress_bar_disabled


class InputError(ValueError):
    """A line of the input that is not a (prompt, response) pair."""


def read_pairs(lines: list[str], source: str) -> tuple[list[str], list[str], list[bool | None]]:
    """``(prompts, responses, is_harmful)`` of every non-blank line, or :class:`InputError` on the first bad one."""
    prompts, responses, harmful = [], [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise InputError(f"{source} line {number}: blank line; every line must be one JSON object.")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{source} line {number}: not JSON ({err.msg} at column {err.colno}).") from None
        if not isinstance(row, dict):
            raise InputError(f"{source} line {number}: a JSON {type(row).__name__}; expected an object with "
                             "'prompt' and 'response'.")  # fmt: skip
        prompt, response = row.get("prompt"), row.get("response")
        if not isinstance(prompt, (str, list)) or (isinstance(prompt, list) and not _is_conversation(prompt)):
            raise InputError(f"{source} line {number}: 'prompt' must be a string or a list of chat messages.")
        if not isinstance(response, str):
            raise InputError(f"{source} line {number}: 'response' must be a string.")
        flag = row.get("is_harmful")
        if flag is not None and not isinstance(flag, bool):
            raise InputError(f"{source} line {number}: 'is_harmful' must be true, false or absent.")
        prompts.append(prompt_text(prompt))
        responses.append(response)
        harmful.append(flag)
    return prompts, responses, harmful


def _is_conversation(value: list) -> bool:
    return all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
               for m in value)  # fmt: skip


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Judge (prompt, response) pairs from a JSON-lines file.")
    p.add_argument("input", help="JSON lines with 'prompt' and 'response' ('-' reads standard input)")
    p.add_argument("--judge", default="learned", choices=JUDGE_NAMES, help="which judge (default: learned)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=64, help="pairs judged per call")
    p.add_argument("--judge_base_url", default="http://127.0.0.1:8000/v1", help="llama_guard: the server")
    p.add_argument("--judge_model", default="meta-llama/Llama-Guard-3-8B", help="llama_guard: the served model")
    p.add_argument("--judge_api_key_env", default=None, help="llama_guard: variable holding the API key")
    return p


def main(argv: list[str] | None = None, prog: str = "nspo-trl judge") -> int:
    args = parser(prog).parse_args(argv)

    def fail(message: str) -> int:
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2

    if args.batch_size < 1:
        return fail(f"--batch_size: must be at least 1, got {args.batch_size}.")
    try:
        if args.input == "-":
            text, source = sys.stdin.read(), "<stdin>"
        else:
            text, source = Path(args.input).read_text(encoding="utf-8"), args.input
    except (OSError, UnicodeDecodeError) as err:
        return fail(f"{args.input}: cannot read it ({err.__class__.__name__}: {err}).")
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing newline or blank tail is not a pair
    try:
        prompts, responses, harmful = read_pairs(lines, source)
        api_key = os.environ.get(args.judge_api_key_env) if args.judge_api_key_env else None
        judge = pair_judge(args.judge, args.judge_base_url, args.judge_model, api_key)
    except (InputError, ValueError, ImportError) as err:
        return fail(str(err))
    from tqdm.auto import tqdm

    results: list[dict] = []
    try:
        for start in tqdm(range(0, len(prompts), args.batch_size), desc="judging", unit="batch",
                          disable=progress_bar_disabled(len(prompts) > args.batch_size)):  # fmt: skip
            end = start + args.batch_size
            results += judge(prompts[start:end], responses[start:end], harmful[start:end])
    except Exception as err:  # a judge that fails prints nothing as if judged
        return fail(f"--judge {args.judge}: {err.__class__.__name__}: {err}")
    sys.stdout.write("".join(json.dumps(r) + "\n" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
