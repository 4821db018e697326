"""Llama Guard behind an OpenAI-compatible server, as an async TRL reward.

Start the judge (its chat template turns the conversation into Llama Guard's safety prompt)::

    vllm serve meta-llama/Llama-Guard-3-8B --port 8000 --max-model-len 4096

then ``LlamaGuardReward("http://127.0.0.1:8000/v1", "meta-llama/Llama-Guard-3-8B")``. Each
``(prompt, completion)`` becomes one ``/chat/completions`` request (temperature 0), sent
concurrently up to ``max_concurrency`` with a per-request timeout. Timeouts, connection errors,
HTTP 429/5xx and unreadable replies are retried with exponential backoff; after the last retry the
call raises :class:`JudgeError`, so no item is ever scored as safe by default.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence

import aiohttp

from nspo_trl.rewards.guard import GuardVerdict, JudgeError, guard_conversations, parse_verdict, rewards_from_verdicts

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
SERVE_HINT = "start one with `vllm serve meta-llama/Llama-Guard-3-8B --port 8000`"


class LlamaGuardReward:
    """TRL reward: ``safe_reward`` (default 0) for a safe verdict, ``unsafe_reward`` (default −1) for unsafe.

    Args:
        base_url: the server's OpenAI API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model name.
        api_key: sent as a bearer token when given.
        max_concurrency: requests in flight at once.
        timeout: seconds per request.
        max_retries: retries per item after the first attempt.
        backoff: seconds before the first retry, doubled for each further one.
        check_connection: query ``/models`` now and fail fast if the judge is unreachable or serves another model.

    Logged through TRL's ``log_metric``: ``llama_guard/unsafe_rate``, ``llama_guard/category_S<k>`` (share
    of completions violating category k) and ``llama_guard/retries``. ``stats`` counts requests,
    retries and failed items over the object's life.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000/v1",
        model: str = "meta-llama/Llama-Guard-3-8B",
        *,
        api_key: str | None = None,
        safe_reward: float = 0.0,
        unsafe_reward: float = -1.0,
        max_concurrency: int = 32,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        max_tokens: int = 20,
        check_connection: bool = True,
    ) -> None:
        if max_concurrency < 1 or timeout <= 0 or max_retries < 0 or backoff < 0:
            raise ValueError("LlamaGuardReward: max_concurrency >= 1, timeout > 0, max_retries >= 0, backoff >= 0.")
        self.__name__ = "llama_guard"
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.safe_reward, self.unsafe_reward = safe_reward, unsafe_reward
        self.max_concurrency, self.timeout = max_concurrency, timeout
        self.max_retries, self.backoff, self.max_tokens = max_retries, backoff, max_tokens
        self.stats: Counter[str] = Counter()
        if check_connection:
            self.check_connection()

    def check_connection(self) -> None:
        """Raise :class:`JudgeError` unless ``GET {base_url}/models`` answers and lists ``model``."""
        request = urllib.request.Request(f"{self.base_url}/models", headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=min(self.timeout, 10.0)) as response:
                payload = json.load(response)
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise JudgeError(f"LlamaGuardReward: no judge answers at {self.base_url} ({err}); {SERVE_HINT}.") from None
        entries = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "id" in e for e in entries):
            reply = " ".join(json.dumps(payload).split())[:80]
            raise JudgeError(
                f"LlamaGuardReward: {self.base_url}/models gave no model list ({reply}); point judge_base_url at "
                f"an OpenAI-compatible server's /v1 root ({SERVE_HINT})."
            )
        served = [entry["id"] for entry in entries]
        if self.model not in served:
            raise JudgeError(f"LlamaGuardReward: {self.base_url} serves {served}, not {self.model!r}.")

    async def __call__(
        self,
        prompts: Sequence,
        completions: Sequence,
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs,
    ) -> list[float]:
        conversations = guard_conversations(prompts, completions)
        retries_before = self.stats["retries"]
        verdicts = await self.judge(conversations)
        if log_metric is not None:
            log_metric("llama_guard/retries", float(self.stats["retries"] - retries_before))
        return rewards_from_verdicts(verdicts, self.safe_reward, self.unsafe_reward, log_metric, "llama_guard")

    async def judge(self, conversations: Sequence[list[dict[str, str]]]) -> list[GuardVerdict]:
        """Verdicts for all conversations, in order; raises :class:`JudgeError` if any item has none."""
        semaphore = asyncio.Semaphore(self.max_concurrency)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout, headers=self.headers) as session:
            results = await asyncio.gather(
                *(self._judge_one(session, semaphore, c) for c in conversations), return_exceptions=True
            )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            self.stats["failed_items"] += len(failures)
            raise JudgeError(f"LlamaGuardReward: {len(failures)}/{len(results)} items got no verdict: {failures[0]}")
        return list(results)

    async def _judge_one(
        self, session: aiohttp.ClientSession, semaphore: asyncio.Semaphore, conversation: list[dict[str, str]]
    ) -> GuardVerdict:
        payload = {"model": self.model, "messages": conversation, "temperature": 0.0, "max_tokens": self.max_tokens}
        last_error = "no attempt"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.stats["retries"] += 1
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                async with semaphore:
                    self.stats["requests"] += 1
                    async with session.post(f"{self.base_url}/chat/completions", json=payload) as response:
                        body = await response.text()
                if response.status in RETRYABLE_STATUS:
                    last_error = f"HTTP {response.status}: {body[:120]}"
                    continue
                if response.status >= 400:  # a request the server will never accept: retrying cannot help
                    raise JudgeError(f"HTTP {response.status}: {body[:200]}")
                return parse_verdict(json.loads(body)["choices"][0]["message"]["content"])
            except TimeoutError:
                last_error = f"timed out after {self.timeout} s"
            except aiohttp.ClientError as err:
                last_error = f"{type(err).__name__}: {err}"
            except (ValueError, KeyError, IndexError, TypeError) as err:
                last_error = f"unreadable reply: {err}"
        raise JudgeError(f"no verdict after {self.max_retries + 1} attempts ({last_error})")
