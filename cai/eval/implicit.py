"""DPO's implicit reward model, β·log(π/π_ref), measured on the held-out pairs of a SoftDPOTrainer (cai.rl.dpo):
what the policy stage writes to eval.json as `held_out_before` and `held_out`.

The held-out pairs are split by prompt, and several of them may share one (`feedback.max_pairs_per_prompt`,
several responses per prompt): such pairs are not independent, so the interval is clustered by prompt
(cai.stats.clustered_ci, as the PM's held-out evaluation has it), which is Wilson's with one pair per prompt."""

from __future__ import annotations

from cai.stats import clustered_ci


def implicit_accuracy(trainer) -> dict:
    """The implicit reward model's agreement with the labels on the trainer's eval pairs: the share where
    β·log(π/π_ref) ranks the preferred side higher (a tie counts half; pairs labelled 0.5 are left out), its 95%
    interval clustered by prompt, n (pairs), `clusters` (their distinct prompts, named as in the PM's held_out
    block) and the mean margin (the policy's forwards under autocast, as the reference's)."""
    import torch

    from cai.rl.dpo import PROMPT

    if trainer.eval_dataset is None or len(trainer.eval_dataset) == 0:
        return {"n": 0}
    model = trainer.model
    was = model.training
    model.eval()
    credits, prompts, margins = [], [], []
    gather = trainer.accelerator.gather_for_metrics
    with torch.no_grad():
        for inputs in trainer.get_eval_dataloader():
            inputs = trainer._prepare_inputs(inputs)
            with trainer.accelerator.autocast():
                (pc, pr), (rc, rr) = trainer.pair_logps(model, inputs)
            # every process's share of the eval pairs (accelerate shards them), the last batch's padding dropped
            margin = gather((trainer.beta * ((pc - rc) - (pr - rr))).float())
            keep = gather(inputs["p"].to(margin.device).float()) != 0.5
            prompt = gather(inputs[PROMPT].to(margin.device))
            credits += ((margin > 0).float() + 0.5 * (margin == 0).float())[keep].tolist()
            prompts += prompt[keep].tolist()
            margins += margin[keep].tolist()
    model.train(was)
    n = len(credits)
    if not n:
        return {"n": 0}
    return {
        "n": n,
        "clusters": len(set(prompts)),
        "accuracy": sum(credits) / n,
        # pairs of one prompt are not independent: the interval is clustered by prompt (Wilson's when none share)
        "ci95": list(clustered_ci(credits, prompts)),
        "mean_margin": sum(margins) / n,
    }
