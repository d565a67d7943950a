"""The one batched generation engine: critique-revise, pair sampling, CoT feedback and PPO rollouts all use it.

- Requests are chat messages (rendered with the tokenizer's chat template) or raw text.
- Batches are sorted by prompt length (less padding), left-padded, and generated with the KV cache; the
  beginning all prompts of a batch share (a system prompt) is computed once (cai.runtime.decode).
- Each batch is seeded from the recipe seed and its item ids, so the same seed and recipe give the same
  text on CPU, also after a resume.
- `Engine.run(..., out_path=...)` appends each finished batch to a JSONL file; a rerun skips finished ids.

Generation settings come from the recipe alone: a model's own generation_config.json never applies (see
`recipe_settings_only`). Backends implement `generate_ids`. `HFBackend` uses `transformers.generate`, with
cai.runtime.decode's linears, attention and sampler; `VLLMBackend`
a vLLM engine in this process (cai.runtime.vllm_engine), started from the model's folder.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cai.errors import UserError
from cai.hashing import derive_seed
from cai.runtime import distributed as dist
from cai.runtime import vllm_engine
from cai.runtime.decode import (
    ResponseStopStrings,
    cut_responses,
    end_token_ids,
    grouped_kv_attention,
    merged_lora_linears,
    packed_linears,
    sampling_processors,
    shared_prefix_inputs,
    text_before_stop,
)
from cai.runtime.forward import pad as left_pad
from cai.runtime.models import load_for_inference, load_tokenizer, resolve
from cai.runtime.rundir import append_jsonl, resumed_rows

SHARE_PREFIX = True  # HFBackend computes a batch's shared beginning once (decode.shared_prefix_inputs)


@dataclass
class Sampling:
    """Sampling settings for one call (built from a recipe's GenerationConfig or PPO block)."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg) -> Sampling:
        return cls(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            repetition_penalty=getattr(cfg, "repetition_penalty", 1.0),
        )


@dataclass
class Generated:
    """A batch of generations as tensors: left-padded prompts, right-padded responses (pad after EOS)."""

    prompt_ids: object  # LongTensor [B, P]
    prompt_mask: object  # LongTensor [B, P]
    response_ids: object  # LongTensor [B, R]
    response_mask: object  # LongTensor [B, R], 1 up to and including EOS
    finished: object  # BoolTensor [B]: ended with an end id (decode.end_token_ids) or a stop string
    logits: object = None  # FloatTensor [B, R, V]: raw next-token logits, with_logits only

    @classmethod
    def concat(cls, parts: list[Generated], pad_id: int) -> Generated:
        """Several generated batches as one: prompts left-padded and responses right-padded to the widest."""
        import torch
        import torch.nn.functional as F

        P = max(g.prompt_ids.shape[1] for g in parts)
        R = max(g.response_ids.shape[1] for g in parts)

        def left(x, value):
            return F.pad(x, (P - x.shape[1], 0), value=value)

        def right(x, value):
            return F.pad(x, (0, R - x.shape[1]), value=value)

        logits = None
        if parts[0].logits is not None:
            logits = torch.cat([F.pad(g.logits, (0, 0, 0, R - g.logits.shape[1])) for g in parts])
        return cls(
            torch.cat([left(g.prompt_ids, pad_id) for g in parts]),
            torch.cat([left(g.prompt_mask, 0) for g in parts]),
            torch.cat([right(g.response_ids, pad_id) for g in parts]),
            torch.cat([right(g.response_mask, 0) for g in parts]),
            torch.cat([g.finished for g in parts]),
            logits,
        )


class Backend(Protocol):
    def generate_ids(self, prompts: list[list[int]], sampling: Sampling, seed: int | list) -> Generated: ...


class HFBackend:
    """Generation through `model.generate` with the KV cache; works for any HF causal LM (or peft wrapper)."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def generate_ids(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        seed: int | list[int],
        with_logits: bool = False,
        autocast=None,
    ) -> Generated:
        """Sample responses from exactly the distribution `sampling` describes, seeded by `seed` (or one seed per
        prompt: a row's tokens then do not depend on its batchmates); `with_logits` also returns the raw logits
        of every step; `autocast` is a context (cai.runtime.settings) to generate under."""
        import torch
        from transformers import StoppingCriteriaList

        tok = self.tokenizer
        pad, ends = tok.pad_token_id, end_token_ids(tok, self.model)  # before recipe_settings_only
        device = next(self.model.parameters()).device
        ids, mask = left_pad(prompts, pad)
        P = ids.shape[1]
        config = generation_config(sampling, tok, with_logits, ends)
        stops = ResponseStopStrings(tok, sampling.stop_strings, P) if sampling.stop_strings else None
        kwargs = {"stopping_criteria": StoppingCriteriaList([stops])} if stops else {}
        was_training = self.model.training
        self.model.eval()
        rows = None if isinstance(seed, int) else list(seed)  # one seed per prompt
        torch.manual_seed(seed if rows is None else derive_seed(repr(rows)))
        with (
            torch.no_grad(),
            recipe_settings_only(self.model),
            autocast or contextlib.nullcontext(),
            packed_linears(self.model),
            merged_lora_linears(self.model),
            grouped_kv_attention(),
        ):
            shared = shared_prefix_inputs(self.model, prompts, pad, device) if SHARE_PREFIX else None
            if shared:
                given, given_mask, kwargs["past_key_values"] = shared
            else:
                given, given_mask = ids.to(device), mask.to(device)
            out = self.model.generate(
                input_ids=given,
                attention_mask=given_mask,
                generation_config=config,
                logits_processor=sampling_processors(sampling, prompts, rows),
                **kwargs,
            )
        logits = None
        if with_logits:
            logits = torch.stack(out.logits, 1).float()
            out = out.sequences
        if was_training:
            self.model.train()
        stopped = stops.ends if stops is not None else None
        resp, rmask, finished = cut_responses(out[:, P:].cpu(), ends, pad, stopped)
        return Generated(ids, mask, resp, rmask, finished, logits)


def generation_config(sampling: Sampling, tokenizer, with_logits: bool = False, end_ids=None):
    """The transformers GenerationConfig of `sampling` for `HFBackend`: the length, the end ids (default the
    tokenizer's EOS), and transformers' own sampling and repetition penalty off: `decode.sampling_processors`
    applies the penalty (over each row's own tokens), temperature, top-k and top-p and draws the token."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=False,
        repetition_penalty=1.0,  # the recipe's is decode.RowRepetitionPenalty's, over each row's own tokens
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=list(end_ids) if end_ids else tokenizer.eos_token_id,
        use_cache=True,
        output_logits=with_logits,
        return_dict_in_generate=with_logits,
    )


@contextlib.contextmanager
def recipe_settings_only(model):
    """While generating, the model's own generation_config.json (a published repetition penalty, top-k, ...)
    is set aside (its end ids are read before: decode.end_token_ids): transformers would otherwise fill every
    setting we leave unset from it, sampling from another distribution than the recipe's (and PPO optimises)."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


class VLLMBackend:
    """Generation through a vLLM engine in this process (cai.runtime.vllm_engine), packed as HFBackend packs its
    output; each prompt is sampled with its own seed, derived from the batch seed and its place. `ends_from`:
    the model, folder or hub id whose generation_config names end ids beside the tokenizer's EOS."""

    def __init__(self, llm, tokenizer, ends_from=None):
        self.llm, self.tokenizer = llm, tokenizer
        self.end_ids = end_token_ids(tokenizer, ends_from)

    def generate_ids(
        self,
        prompts: list[list[int]],
        sampling: Sampling,
        seed: int | list[int],
        with_logits: bool = False,
        autocast=None,
    ) -> Generated:
        """As HFBackend.generate_ids, without logits (a forward pass computes log-probs); `autocast` does not
        apply (the engine runs in its own dtype)."""
        import torch

        if with_logits:
            raise ValueError("the vLLM backend does not return logits: compute log-probs with a forward pass")
        responses, stopped = vllm_engine.generate(self.llm, prompts, sampling, seed, self.end_ids)
        pad, ends = self.tokenizer.pad_token_id, set(self.end_ids)
        ids, mask = left_pad(prompts, pad)
        cut = [r[: next((k + 1 for k, t in enumerate(r) if t in ends), len(r))] for r in responses]
        resp, rmask = left_pad(cut, pad, side="right")
        # finish_reason 'stop' (an end id or a stop string), as HF's cut_responses marks them
        return Generated(ids, mask, resp, rmask, torch.tensor(stopped, dtype=torch.bool))


def make_backend(name: str, model, tokenizer, settings=None, memory: float | None = None) -> Backend:
    """The backend a recipe names. For 'vllm', `model` is a model folder (or hub id), or a loaded HF model whose
    folder the engine starts from."""
    if name == "hf":
        return HFBackend(model, tokenizer)
    if name == "vllm":
        return VLLMBackend(vllm_engine.start_for(model, settings, memory), tokenizer, model)
    raise UserError(f"generation.backend '{name}': 'hf' or 'vllm' expected")


def batch_seed(seed: int, ids: list[str]) -> int:
    """The sampling seed of a batch: from the recipe seed and its item ids, so a batch samples the same text
    whichever process generates it and after a resume."""
    return derive_seed(str(seed) + "\x00" + "\x00".join(ids))


class Engine:
    """Renders requests, batches them by length, generates, decodes, and streams results to JSONL."""

    def __init__(
        self,
        model,
        tokenizer,
        sampling: Sampling,
        *,
        batch_size: int = 16,
        seed: int = 0,
        backend: str = "hf",
        settings=None,
        memory: float | None = None,
    ):
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.batch_size = batch_size
        self.seed = seed
        self.backend = make_backend(backend, model, tokenizer, settings, memory)

    @classmethod
    def for_config(cls, model, tokenizer, gen, seed: int, settings=None) -> Engine:
        """The engine a generation block asks for (a recipe's `generation`, with a stage's overrides merged):
        its sampling settings, batch size and backend."""
        return cls(
            model,
            tokenizer,
            Sampling.from_config(gen),
            batch_size=gen.batch_size,
            seed=seed,
            backend=gen.backend,
            settings=settings,
            memory=gen.vllm_memory,
        )

    @classmethod
    def load(cls, ref: str, settings, gen, seed: int) -> Engine:
        """The engine of a generation block on a model reference: the HF model is loaded only for the 'hf'
        backend; 'vllm' starts its engine from the model's folder (an alias's cached folder, a local folder or
        a hub id)."""
        if gen.backend != "vllm":
            model, tok = load_for_inference(ref, settings)
            return cls.for_config(model, tok, gen, seed, settings)
        vllm_engine.require("generation.backend 'vllm'")
        where = resolve(ref)
        if where.kind == "gguf":  # its folder may hold another model vLLM would start on
            raise UserError(vllm_engine.gguf_refusal(ref))
        return cls.for_config(where.path, load_tokenizer(ref, settings), gen, seed, settings)

    def encode(self, request: dict) -> list[int]:
        """Token ids of a request: {'messages': [...]} through the chat template, or {'text': ...} as is."""
        tok = self.tokenizer
        if "messages" in request:
            text = tok.apply_chat_template(request["messages"], tokenize=False, add_generation_prompt=True)
            if request.get("assistant_prefix"):
                text += request["assistant_prefix"]
        else:
            text = request["text"]
        return tok(text, add_special_tokens=False)["input_ids"]

    def run(
        self,
        requests: list[dict],
        out_path: str | Path | None = None,
        desc: str = "generate",
        show: bool = True,
    ) -> list[dict]:
        """Generate for every request (each needs a unique 'id'); return result rows in request order.

        Each row: id, text, prompt_tokens, new_tokens, finish ('eos' or 'length'), plus the request's 'meta'.
        With `out_path`, finished rows are read back and skipped, and each new batch is appended.
        """
        from tqdm.auto import tqdm

        ids = [r["id"] for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("generation requests need unique ids")
        done: dict[str, dict] = {}
        if out_path is not None:
            done = {row["id"]: row for row in resumed_rows(out_path)}
        encoded = [self.encode(r) for r in requests]
        for r, e in zip(requests, encoded):  # an empty prompt: a crash alone, padding read as one in a batch
            if not e:
                raise UserError(f"generation request '{r['id']}': empty prompt (no tokens to continue)")
        order = sorted(range(len(requests)), key=lambda i: (-len(encoded[i]), i))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        todo = sum(1 for r in requests if r["id"] not in done)
        bar = tqdm(
            total=len(requests),
            initial=len(requests) - todo,
            desc=desc,
            unit="item",
            disable=not show or not dist.is_main(),
            dynamic_ncols=True,
        )
        new_tokens, t0 = 0, time.time()
        # Under several processes, rank r takes every W-th pending batch; the rows are gathered after each
        # round and only the main process appends them. Seeds depend on item ids, so content is identical
        # to a single-process run.
        W, r = dist.world_size(), dist.rank()
        # a batch with rows left to do runs whole (its seed, its batchmates): a torn one samples as if never torn
        pending_batches = [b for b in batches if any(ids[i] not in done for i in b)]
        # the HF backend's decode weights (packed linears, merged LoRA) made once for all batches, not per batch
        with contextlib.ExitStack() as held:
            if isinstance(self.backend, HFBackend):
                held.enter_context(packed_linears(self.backend.model))
                held.enter_context(merged_lora_linears(self.backend.model))
            for start in range(0, len(pending_batches), W):
                group = pending_batches[start : start + W]
                mine = group[r] if r < len(group) else []
                rows = self._generate_rows(mine, requests, encoded, ids) if mine else []
                rows = [row for row in rows if row["id"] not in done]
                all_rows = [row for part in dist.gather_objects(rows) for row in part]
                if out_path is not None and dist.is_main():
                    append_jsonl(out_path, all_rows)
                done.update({row["id"]: row for row in all_rows})
                new_tokens += sum(row["new_tokens"] for row in all_rows)
                bar.update(len(all_rows))
                bar.set_postfix(tok_s=f"{new_tokens / max(time.time() - t0, 1e-9):.1f}")
        bar.close()
        return [done[i] for i in ids]

    def _generate_rows(self, batch: list[int], requests, encoded, ids) -> list[dict]:
        gen = self.backend.generate_ids(
            [encoded[i] for i in batch], self.sampling, batch_seed(self.seed, [ids[i] for i in batch])
        )
        rows = []
        for j, i in enumerate(batch):
            n = int(gen.response_mask[j].sum())
            resp = gen.response_ids[j, :n].tolist()
            text, _ = text_before_stop(self.tokenizer, resp, self.sampling.stop_strings)
            row = {
                "id": ids[i],
                "text": text.strip(),
                "prompt_tokens": len(encoded[i]),
                "new_tokens": n,
                "finish": "eos" if bool(gen.finished[j]) else "length",
            }
            if requests[i].get("meta"):
                row["meta"] = requests[i]["meta"]
            rows.append(row)
        return rows
