"""What generation does to a model while it decodes on the CPU (cai.runtime.generate's HF backend), each a context
or a logits processor that leaves the model as it was:

- `packed_linears`: every linear of a decode step on a copy of its weight packed by MKL for that step's rows (or
  oneDNN's packing, or weight-major), which reads the weight near memory bandwidth at a handful of rows;
- `merged_lora_linears`: each LoRA linear as one linear of weight `W + s·BA`, instead of peft's extra products;
- `grouped_kv_attention`: attention reads the grouped keys and values in place instead of repeating them per head;
- `shared_prefix_inputs`: the beginning every prompt of a batch shares (a chat template's system prompt, one
  prompt sampled k times) computed once, its key-value cache repeated to every row;
- `sampling_processors`: the next token drawn by inverse transform from the recipe's distribution, one random
  number per row instead of one per vocabulary entry, after a repetition penalty over each row's own tokens;
- `ResponseStopStrings`: stop strings looked for in the response alone;
- `end_token_ids`, `cut_responses`, `text_before_stop`: where a response ends (the tokenizer's EOS or one of the
  model's other end-of-turn ids, or a stop string) and its text, alike for the HF and vLLM backends and PPO.

Each is exact in what it computes or samples; the linears' sums run in another order (last bits of the logits),
and the sampler draws other tokens than transformers' for a seed. Figures: docs/benchmarks.md, "Decode step".
torch is imported inside the functions: the generation engine's module is imported by light ones.
"""

from __future__ import annotations

import contextlib

from cai.hashing import row_uniforms
from cai.runtime import distributed as dist
from cai.runtime.forward import cpu_fp32_linears, cpu_vendor, pad, replaced_forwards, simple_lora
from cai.runtime.packing import common_prefix

# the most rows a decode step may have to run on MKL's packing in `packed_linears` (or weight-major, where no
# packing works; a decode step has one row per sequence), and the rows oneDNN packs weights for
WEIGHT_MAJOR_ROWS = 64
# the fewest tokens every prompt of a batch must share for `shared_prefix_inputs` to compute them once
MIN_SHARED_PREFIX = 8
# whether MKL's and oneDNN's packed linears are used (each cleared on its first failure, in a build without it);
# MKL's is decided on first use by the CPU's maker (`intel_cpu`)
_PACKING = {"mkl": None, "onednn": True}
# skip_special_tokens when stop strings are looked for (ResponseStopStrings, text_before_stop, PPO's cut): a
# special token's text counts, as vLLM looks for them (cai.runtime.vllm_engine.sampling_params), so a stop string
# such as '<|im_start|>' stops both backends
STOP_SKIP_SPECIAL = False


def intel_cpu(cpuinfo="/proc/cpuinfo") -> bool:
    """Whether the CPU is Intel's (Linux's /proc/cpuinfo says so). MKL's packed GEMM beat oneDNN's at decode steps
    on an Intel Xeon (24-26 against 34 ms for a SmolLM2 step at 8 rows) but not on an AMD EPYC, where it ran
    no faster than `nn.Linear` (53-59 ms against oneDNN's 31-32 ms): MKL takes slower code paths on other
    makers' CPUs."""
    return cpu_vendor(cpuinfo) == "GenuineIntel"


@contextlib.contextmanager
def packed_linears(model, max_rows: int = WEIGHT_MAJOR_ROWS):
    """While generating on the CPU in fp32, each `nn.Linear` of `model` on an Intel CPU (`intel_cpu`) runs a decode
    step (one position per row, 2 to `max_rows` rows) on a copy of its weight packed by MKL for exactly that many
    rows (`torch.ops.mkl._mkl_reorder_linear_weight`: made on the layer's first such call inside the context, made
    again if the rows change, dropped on exit); other inputs (prefills) take `nn.Linear`'s own forward. On other
    CPUs, or where this torch build has no MKL packing, every input runs on a copy packed for oneDNN
    (`torch.ops.mkldnn`), and without that, inputs of 2 to `max_rows` rows run as `W @ x.T` instead of `x @ W.T`.
    All are the same product; MKL's `x @ W.T` reads the weight far below memory bandwidth when x has a handful
    of rows. On an Intel Xeon (AVX-512), the 210 linears of a SmolLM2-135M decode step at 8 rows took 24-26 ms
    MKL-packed, 34 ms on oneDNN's packing and 48 ms as `nn.Linear` (MKL's packing wants the exact rows: made
    for 64, 8 rows ran at half speed), and a 320-row prefill 312 ms as `nn.Linear` against 410 ms on oneDNN's
    packing; on an AMD EPYC, 200 gate projections at 8 rows took 43 ms on oneDNN's packing, 100 ms
    weight-major and 124 ms as `nn.Linear` (MKL's packing there: `intel_cpu`).
    Packing SmolLM2-135M's linears costs 0.15-0.3 s per generation either way; bench/decode_linears.py times
    generation every way. The packed copy (one: MKL's or oneDNN's) doubles the linears' memory while generating.
    Gradients, autocast, other devices and dtypes keep `nn.Linear`'s own forward. The sums run in another order,
    so logits differ in the last bits (tests/test_generate.py). Modules whose forward is already replaced on the
    instance (accelerate's hooks, an enclosing `packed_linears`: `Engine.run` holds one around all its batches, so
    the weights are packed once per run) are left alone."""

    linears = cpu_fp32_linears(model)
    with replaced_forwards(linears, _packed_forward, max_rows=max_rows, packed=None, mkl_packed=None):
        yield


def _packed_forward(self, x):
    return _linear(self, x, self.weight, self.bias)


def _linear(self, x, weight, bias):
    """`F.linear(x, weight, bias)` outside autograd and autocast: a decode step on MKL's copy of `weight` packed
    for its rows (`self.mkl_packed`: rows, packed), or else on oneDNN's packed copy (`self.packed`), or
    weight-major when x has 2 to `self.max_rows` rows."""
    import torch

    if torch.is_grad_enabled() or x.dtype != weight.dtype or torch.is_autocast_enabled("cpu"):
        return torch.nn.functional.linear(x, weight, bias)
    if _PACKING["mkl"] is None:
        _PACKING["mkl"] = intel_cpu()
    if _PACKING["mkl"]:
        rows = x.numel() // x.shape[-1]
        if not (x.dim() == 3 and x.shape[1] == 1 and 2 <= rows <= self.max_rows):
            # not a decode step of several rows (one row: a matrix-vector product, at memory bandwidth already)
            return torch.nn.functional.linear(x, weight, bias)
        try:
            if self.mkl_packed is None or self.mkl_packed[0] != rows:
                self.mkl_packed = None  # the old copy goes before the new one is made
                self.mkl_packed = (rows, torch.ops.mkl._mkl_reorder_linear_weight(weight, rows))
            return torch.ops.mkl._mkl_linear(x.contiguous(), self.mkl_packed[1], weight, bias, rows)
        except (AttributeError, RuntimeError):  # a build without MKL's packed linear
            _PACKING["mkl"] = False
    if self.packed is None and _PACKING["onednn"]:
        try:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, WEIGHT_MAJOR_ROWS)
        except (AttributeError, RuntimeError):  # a build without oneDNN's packed linear
            _PACKING["onednn"] = False
    if self.packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, bias, "none", [], "")
    rows = x.numel() // x.shape[-1] if x.numel() else 0  # one row: a matrix-vector product either way
    if rows < 2 or rows > self.max_rows:
        return torch.nn.functional.linear(x, weight, bias)
    y = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], y.shape[-1])


@contextlib.contextmanager
def merged_lora_linears(model, max_rows: int = WEIGHT_MAJOR_ROWS):
    """While generating on the CPU in fp32, each LoRA-adapted linear of `model` (peft's `lora.Linear`) runs as one
    linear of weight `W + scaling * B @ A` instead of peft's `W x + scaling * B(A x)`: peft's form costs two small
    products, a scale and an add per linear per decode step, which made a LoRA policy generate slower than the
    same model fully fine-tuned (bench/lora_decode.py). The merged weight of a layer is computed on its first
    call inside the context, from the adapter as it is then, runs as `packed_linears` runs a linear, and
    is dropped on exit. Nothing of the model is written: peft's own merge would round W in place, and the base
    weights are the frozen reference PPO's KL is measured against. A call with gradients, under autocast, with
    the adapters disabled (the reference, `disable_adapter()`) or merged, or with peft's per-call keywords takes
    peft's own forward; layers with several active adapters, a variant (DoRA), fan-in-fan-out weights or active
    dropout, and other devices and dtypes are left alone. The sums run in another order, so logits differ in the
    last bits (tests/test_generate.py)."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:  # peft absent: no LoRA layers to merge
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, LoraLinear) and simple_lora(m)]
    with replaced_forwards(
        layers, _merged_lora_forward, max_rows=max_rows, merged_weight=None, packed=None, mkl_packed=None
    ):
        yield


def _merged_lora_forward(self, x, *args, **kwargs):
    import torch

    if (
        args
        or kwargs
        or torch.is_grad_enabled()
        or self.disable_adapters
        or self.merged
        or torch.is_autocast_enabled("cpu")
        or x.dtype != torch.float32
    ):
        return type(self).forward(self, x, *args, **kwargs)
    if self.merged_weight is None:
        name = self.active_adapters[0]
        delta = self.lora_B[name].weight @ self.lora_A[name].weight
        self.merged_weight = torch.add(self.base_layer.weight, delta, alpha=self.scaling[name])
    return _linear(self, x, self.merged_weight, self.base_layer.bias)


@contextlib.contextmanager
def grouped_kv_attention():
    """While active, transformers' SDPA attention on the CPU passes grouped keys and values as they are to
    `scaled_dot_product_attention(enable_gqa=True)`. transformers does so only on CUDA without a mask; elsewhere
    it first repeats the whole key-value cache once per query head, a fresh copy per layer and decode step
    (SmolLM2: 3 key-value heads for 9 query heads). Same kernel and sums: the same logits. A no-op where the
    installed transformers has no such switch."""
    from transformers.integrations import sdpa_attention

    original = getattr(sdpa_attention, "use_gqa_in_sdpa", None)
    if original is None:  # pragma: no cover - another transformers layout
        yield
        return

    def use_gqa(attention_mask, key, value):
        on_cpu = key.device.type == "cpu" and key.shape[-1] == value.shape[-1]
        return on_cpu or original(attention_mask, key, value)

    sdpa_attention.use_gqa_in_sdpa = use_gqa
    try:
        yield
    finally:
        sdpa_attention.use_gqa_in_sdpa = original


def shared_prefix_inputs(model, prompts: list[list[int]], pad_id: int, device):
    """The inputs of `model.generate` for `prompts` with their shared beginning computed once: (input_ids,
    attention_mask, past_key_values), or None where the prompts share fewer than `MIN_SHARED_PREFIX` tokens or
    the model's cache is not transformers' plain `DynamicCache` (sliding windows, hybrid models, ...), and under
    ZeRO-3 or FSDP, where every process must run as many forwards as the others (`synced_gpus`) and another
    process's prompts may share nothing.
    Call under the generation's own contexts (no gradients, autocast, linears): the prefix runs through the
    model once, as one row, and its keys and values are repeated to every row. Rows are laid out
    [prefix | padding | own tokens]; transformers counts positions from the attention mask, so each token keeps
    its position and attends to exactly what it attends to in the left-padded batch, and generate feeds only the
    tokens after the cache. Every prompt keeps at least one token of its own. The prefix's sums run on another
    number of rows and the padding sits elsewhere, so logits differ from the left-padded batch's in the last
    bits (tests/test_generate.py)."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    n = common_prefix(prompts, MIN_SHARED_PREFIX)
    if not n or not dist.whole_weights():
        return None
    config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    cache = DynamicCache(config=config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    prefix = torch.as_tensor([list(prompts[0][:n])], dtype=torch.long)
    model(input_ids=prefix.to(device), past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(len(prompts))
    own, own_mask = pad([list(p[n:]) for p in prompts], pad_id)
    ids = torch.cat([prefix.expand(len(prompts), n), own], 1)
    mask = torch.cat([torch.ones(len(prompts), n, dtype=torch.long), own_mask], 1)
    return ids.to(device), mask.to(device), cache


def sampling_processors(sampling, prompts: list[list[int]] | None = None, row_seeds=None) -> list | None:
    """transformers logits processors that draw each next token from exactly the distribution `sampling`
    describes: the repetition penalty over each row's own tokens (`RowRepetitionPenalty`, given the `prompts`),
    logits divided by the temperature, then top-k, then top-p (transformers' own warpers, in the order its
    sampling applies them), then `InverseTransformSampler(row_seeds)`, which leaves the drawn token's score at 0
    and every other at -inf so that generation with `do_sample` off (an argmax) takes it. At temperature 0
    (greedy) only the penalty, or None."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    steps = []
    if sampling.repetition_penalty != 1.0 and prompts is not None:
        steps.append(RowRepetitionPenalty(prompts, sampling.repetition_penalty))
    if sampling.temperature <= 0:
        return LogitsProcessorList(steps) if steps else None
    if sampling.temperature != 1.0:
        steps.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        steps.append(TopKLogitsWarper(top_k=sampling.top_k))
    if sampling.top_p < 1.0:
        steps.append(TopPLogitsWarper(top_p=sampling.top_p))
    return LogitsProcessorList([*steps, InverseTransformSampler(row_seeds)])


class RowRepetitionPenalty:
    """The repetition penalty over the tokens of each row's own prompt and of what it generated so far: a seen
    token's positive logit divided by the penalty, a negative one multiplied (as transformers and vLLM define
    it). transformers' processor reads every id of `input_ids`, so a left-padded row's padding (often the EOS
    token) was penalised too, making a row's text depend on its batchmates and differ from vLLM's; and a prefix
    held only in the key-value cache (`shared_prefix_inputs`) was not penalised at all."""

    def __init__(self, prompts: list[list[int]], penalty: float):
        self.prompts, self.penalty, self.seen = prompts, penalty, None

    def __call__(self, input_ids, scores):
        import torch

        if self.seen is None:  # the first step: the prompts' tokens
            self.seen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
            for row, ids in enumerate(self.prompts):
                self.seen[row, torch.as_tensor(ids, dtype=torch.long, device=scores.device)] = True
        else:  # later steps: the token the previous step appended
            self.seen.scatter_(1, input_ids[:, -1:], True)
        penalised = torch.where(scores > 0, scores / self.penalty, scores * self.penalty)
        return torch.where(self.seen, penalised, scores)


class ResponseStopStrings:
    """A stopping criterion for `model.generate`: a row stops when its response (the tokens after `start`, the
    padded prompt's length) contains a stop string, found in the last tokens' text (special tokens' text
    included, `STOP_SKIP_SPECIAL`) at each step. transformers' `stop_strings` also matched a stop string begun
    by the prompt's end, and the padding written after a stopped row then read as a sampled EOS. `ends[row]` is
    the number of response tokens up to the one that completed the stop string (0 while the row has not
    stopped), so the caller masks what follows, as vLLM cuts there. The window of last tokens holds a stop
    string's UTF-8 bytes and 4 more: a token carries at least one byte (byte-level tokens split a multi-byte
    character over several), and the first may begin before the stop string does."""

    def __init__(self, tokenizer, stops, start: int):
        self.tokenizer, self.stops, self.start, self.ends = tokenizer, tuple(stops), start, None
        self.window = max(len(s.encode("utf-8")) for s in self.stops) + 4  # tokens

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        if self.ends is None:
            self.ends = torch.zeros(input_ids.shape[0], dtype=torch.long)
        n = input_ids.shape[1] - self.start
        for row in (self.ends == 0).nonzero().flatten().tolist():
            tail = input_ids[row, max(self.start, input_ids.shape[1] - self.window) :].tolist()
            text = self.tokenizer.decode(tail, skip_special_tokens=STOP_SKIP_SPECIAL)
            if any(s in text for s in self.stops):
                self.ends[row] = n
        return (self.ends > 0).to(input_ids.device)


def end_token_ids(tokenizer, source=None) -> list[int]:
    """The ids that end a response: the tokenizer's EOS, then the model's generation_config `eos_token_id`s
    (Gemma-it: <eos> and <end_of_turn>; Llama-3-Instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>), which
    transformers' own generate stops at too. `source`: a model (or peft wrapper), a GenerationConfig, or a model
    folder or hub id (its generation_config.json, where it has one). Read before `recipe_settings_only` sets the
    model's generation_config aside: only its end ids are taken from it."""
    config = source
    if isinstance(source, str):
        from transformers import GenerationConfig

        try:
            config = GenerationConfig.from_pretrained(source)
        except (OSError, ValueError):  # no generation_config.json
            config = None
    elif hasattr(source, "generation_config"):  # a model
        inner = source.get_base_model() if hasattr(source, "get_base_model") else source
        config = inner.generation_config
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    extra = getattr(config, "eos_token_id", None)
    for i in [extra] if isinstance(extra, int) else list(extra or ()):
        if int(i) not in ids:
            ids.append(int(i))
    return ids


def cut_responses(resp, end_ids, pad: int, stop_ends=None):
    """(responses, mask, finished) of generated tokens: each row kept up to and including its first end id
    (`end_token_ids`, or one id) or, with `stop_ends` (ResponseStopStrings.ends: > 0 for a row a stop string
    stopped), the token that completed its stop string; padding after that. A row is finished when it sampled
    an end id or stopped on a string."""
    import torch

    ends = torch.as_tensor([end_ids] if isinstance(end_ids, int) else list(end_ids), dtype=resp.dtype)
    is_eos = torch.isin(resp, ends)
    keep = (is_eos.long().cumsum(-1) - is_eos.long()) == 0  # no end id before this position
    finished = (is_eos & keep).any(-1)
    if stop_ends is not None:
        stopped = stop_ends > 0
        keep &= ~stopped[:, None] | (torch.arange(resp.shape[1]) < stop_ends[:, None])
        finished |= stopped
    return torch.where(keep, resp, torch.full_like(resp, pad)), keep.long(), finished


def text_before_stop(tokenizer, ids: list[int], stops) -> tuple[str, int | None]:
    """(text, k) of response token ids: the text without special tokens, up to where the first stop string
    begins, and the number of tokens up to the one that completes a stop string (None where none occurs). Stop
    strings are looked for in the text with special tokens (`STOP_SKIP_SPECIAL`), as ResponseStopStrings and
    vLLM look for them."""
    stops = [s for s in stops or () if s]

    def text(k: int) -> str:
        return tokenizer.decode(ids[:k], skip_special_tokens=STOP_SKIP_SPECIAL)

    full = text(len(ids))
    begins = [full.find(s) for s in stops if s in full]
    if not begins:
        return tokenizer.decode(ids, skip_special_tokens=True), None
    lo, hi = 1, len(ids)  # the fewest tokens whose text holds a stop string (more tokens keep holding it)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if any(s in text(mid) for s in stops) else (mid + 1, hi)
    before = full[: min(begins)]
    j = lo  # the most tokens whose text lies wholly before the stop string, then the rest of a token's text
    while j and not before.startswith(text(j)):
        j -= 1
    return tokenizer.decode(ids[:j], skip_special_tokens=True) + before[len(text(j)) :], lo


class InverseTransformSampler:
    """One token per row from softmax(scores): the first token whose cumulative probability (float64) exceeds a
    uniform number scaled to the row's total, from torch's generator (seeded by the caller), or with `row_seeds`
    from the row's seed and the step (cai.hashing.row_uniforms: a row's tokens do not depend on its batchmates).
    Tokens of zero probability (filtered to -inf) are never drawn. transformers' `torch.multinomial` takes one
    exponential number per vocabulary entry and row on the CPU: 12.9 ms of a 90 ms SmolLM2 decode step at
    batch 8 (49,152 entries), against 8 numbers here."""

    def __init__(self, row_seeds=None):
        self.row_seeds, self.step = row_seeds, 0

    def __call__(self, input_ids, scores):
        import torch

        cdf = torch.softmax(scores.float(), -1).cumsum(-1, dtype=torch.float64)
        total = cdf[:, -1:]
        if self.row_seeds is None:
            u = torch.rand(total.shape, dtype=torch.float64, device=cdf.device)
        else:
            u, self.step = row_uniforms(self.row_seeds, self.step).to(cdf.device)[:, None], self.step + 1
        u = torch.minimum(u * total, total.nextafter(torch.zeros_like(total)))  # below the total
        token = torch.searchsorted(cdf, u, right=True)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)
