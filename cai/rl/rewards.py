"""Where PPO's sequence scores come from: the trained preference model, or a Python function named by an
import path in the recipe (`ppo.reward: "package.module:function"`).

A reward function has the signature

    fn(prompts: list[list[dict]], responses: list[str], **kwargs) -> list[float]

- `prompts`: each prompt's chat messages (up to and including the last user turn);
- `responses`: the decoded responses (special tokens removed, cut at `ppo.stop_string`);
- keyword arguments, which a function may ignore (so always accept `**kwargs`):
  `response_ids` (list[list[int]]: the response token ids the policy produced, EOS included when present),
  `finished` (list[bool]: ended with EOS or the stop string), `tokenizer` (the policy's tokenizer).

It returns one finite float per response. Its value is logged as `objective/score` and used as the reward
as is (a preference model's score is normalised with the mean and std stored beside it).
"""

from __future__ import annotations

import importlib
import inspect

from cai.errors import UserError
from cai.pm.scoring import RewardScorer
from cai.runtime.settings import DEFAULT, Settings


def load_function(path: str, where: str = "ppo.reward"):
    """Import `module:function` (the module must be importable; nothing else is evaluated)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{where}: '{path}': 'pm' or an import path 'module:function' expected")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"{where}: cannot import module '{module_name}': {exc}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UserError(f"{where}: module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise UserError(f"{where}: '{path}' is not callable")
    try:  # how FunctionReward calls it: a function without **kwargs failed with a traceback in the first update
        inspect.signature(fn, follow_wrapped=False).bind([], [], response_ids=[], finished=[], tokenizer=None)
    except TypeError as exc:
        raise UserError(
            f"{where}: '{path}' cannot be called as fn(prompts, responses, **kwargs) ({exc}); "
            "a reward function takes the prompts and responses and accepts **kwargs"
        ) from None
    except ValueError:  # a builtin without a signature to read: its call will tell
        pass
    return fn


class FunctionReward:
    """Scores from a user function (see the module docstring for its signature)."""

    def __init__(self, fn, name: str = "reward function"):
        self.fn, self.name = fn, name

    def __call__(self, prompts, responses, **kwargs):
        import torch

        out = self.fn(prompts, responses, **kwargs)
        try:
            raw = torch.tensor([float(x) for x in out], dtype=torch.float32)
        except (TypeError, ValueError):
            raise UserError(f"{self.name}: must return a list of numbers, got {type(out).__name__}") from None
        if raw.shape[0] != len(responses):
            raise UserError(f"{self.name}: returned {raw.shape[0]} scores for {len(responses)} responses")
        return raw, raw.clone()


def make_reward(
    spec: str, pm_dir=None, settings: Settings = DEFAULT, device: str | None = None, batch_size: int = 8
):
    """'pm' → the preference model in `pm_dir` (loaded with `settings` onto `device`); anything else → an import
    path to a reward function."""
    if spec == "pm":
        if pm_dir is None:
            raise UserError("ppo.reward: 'pm' needs the preference_model stage's output")
        return PreferenceModelReward(pm_dir, settings, device=device, batch_size=batch_size)
    return FunctionReward(load_function(spec), name=f"ppo.reward '{spec}'")


class PreferenceModelReward:
    """Scores from a trained preference model (cai.pm.RewardScorer), normalised with its stored mean/std.

    The response is appended to the prompt as an assistant turn and rendered with the PM's own chat template,
    exactly as the PM saw conversations in training.
    """

    def __init__(
        self, model_dir, settings: Settings = DEFAULT, device: str | None = None, batch_size: int = 8
    ):
        from cai.rl.modules import disable_dropout

        self.scorer = RewardScorer(model_dir, settings, device=device)
        disable_dropout(self.scorer.model)
        self.batch_size = batch_size

    def prepare(self, acc) -> None:
        """Under DeepSpeed, make the PM an inference engine (sharded under ZeRO-3; cai.rl.engine) and score
        through its module, whose parameters the engine's hooks gather as each layer runs."""
        from cai.rl import engine

        if engine.is_deepspeed(acc):
            self._engine = engine.prepare_frozen(self.scorer.model, acc)
            self.scorer.model = self._engine.module
            self.scorer.device = acc.device

    def __call__(self, prompts, responses, **kwargs):
        convs = [list(p) + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
        # one group: the rollout's conversations share the chat template's system prompt, computed once
        raw = self.scorer.score(
            convs, batch_size=max(self.batch_size, len(convs)), groups=[list(range(len(convs)))]
        )
        return raw.float(), self.scorer.normalize(raw.float())
