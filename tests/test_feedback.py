"""The feedback stage on the tiny recipe: responses, pairs with p_a in (0, 1), the labeller check, resume."""

from __future__ import annotations

import gzip
import json

from cai.config.layout import stage_view
from cai.runtime.rundir import append_jsonl, read_jsonl, write_json


def upstream(run, tiny_dir, n=4):
    """RUN/critique_revise/prompts.jsonl and RUN/sft/model as the earlier stages leave them."""
    import shutil

    cr = run / "critique_revise"
    cr.mkdir(parents=True)
    texts = [
        "How do I pick a lock?",
        "Tell me a joke.",
        "How can I hurt my neighbour?",
        "What is 2+2?",
        "Insult me.",
    ]
    append_jsonl(
        cr / "prompts.jsonl",
        [
            {
                "id": f"p{i}",
                "messages": [{"role": "user", "content": t}],
                "category": "x",
                "source": "test",
                "kind": "red_team" if i % 2 == 0 else "helpful",
            }
            for i, t in enumerate(texts[:n])
        ],
    )
    write_json(
        cr / "manifest.json",
        {"stage": "critique_revise", "status": "complete", "fingerprint": "f", "output": "o1"},
    )
    shutil.copytree(tiny_dir, run / "sft" / "model")
    write_json(
        run / "sft" / "manifest.json",
        {"stage": "sft", "status": "complete", "fingerprint": "f", "output": "o2"},
    )


def hh_file(path):
    rows = [
        {
            "chosen": f"\n\nHuman: q{i}?\n\nAssistant: No.",
            "rejected": f"\n\nHuman: q{i}?\n\nAssistant: Yes, do it.",
        }
        for i in range(6)
    ]
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_feedback_stage_end_to_end_and_resume(tiny_recipe, tiny_dir, tmp_path, capsys):
    from cai import pipeline

    recipe = tiny_recipe(
        "stages=[critique_revise,sft,feedback]",
        "feedback.responses_per_prompt=3",
        "feedback.max_pairs_per_prompt=2",
        "feedback.num_principles=2",
        f"feedback.check_set={{path: {hh_file(tmp_path / 'hh.jsonl.gz')}, limit: 4}}",
        f"feedback.human_mix={{path: {tmp_path / 'hh.jsonl.gz'}, ratio: 0.25}}",
        "generation.max_new_tokens=8",
    )
    run = tmp_path / "run"
    upstream(run, tiny_dir)
    pipeline.run(recipe, only=["feedback"])
    out = run / "feedback"
    responses = read_jsonl(out / "responses.jsonl")
    assert len(responses) == 4 * 3 and all(r["meta"]["policy"] == "sft" for r in responses)
    rows = read_jsonl(out / "pairs.jsonl")
    ai = [r for r in rows if r["source"] == "ai"]
    human = [r for r in rows if r["source"] == "human"]
    assert len(ai) == 8 and len(human) == 2 and all(h["p_a"] == 1.0 for h in human)
    for r in ai:
        assert 0.0 < r["p_a"] < 1.0
        assert set(r["p_a_orders"]) == {"ab", "ba"} and r["order_gap"] >= 0
        assert len(r["principle_ids"]) == 2 and r["response_a"] != r["response_b"]
        assert r["messages"][-1]["role"] == "user"
    check = json.loads((out / "check.json").read_text())
    assert check["n"] == 4 and 0 <= check["ci95"][0] <= check["agreement"] <= check["ci95"][1] <= 1
    assert "mean_order_gap" in check
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "labeller_agreement" in manifest["summary"]
    if not check["above_chance"]:
        assert "no harmlessness signal" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    assert stats["pairs"] == 8 and stats["human_pairs"] == 2 and 0 < stats["mean_p_a"] < 1

    # resume: a kill that lost the last labelled pairs only relabels those, and sampling is not redone
    from cai.runtime.rundir import StageContext
    from cai.stages import feedback

    kept = rows[:5]
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"id": "trunc')
    before = (out / "responses.jsonl").read_text()
    ctx = StageContext(
        config=stage_view(recipe, "feedback"),
        stage="feedback",
        out_dir=out,
        inputs={"critique_revise": run / "critique_revise", "sft": run / "sft"},
    )
    feedback.run(ctx)
    again = read_jsonl(out / "pairs.jsonl")
    assert (out / "responses.jsonl").read_text() == before
    assert [r["id"] for r in again[:5]] == [r["id"] for r in kept]
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in rows)
    by_id = {r["id"]: r for r in rows}
    for r in again[5:]:
        if r["source"] == "ai":
            assert abs(r["p_a"] - by_id[r["id"]]["p_a"]) < 1e-5  # the same principles, the same label


def test_base_policy_and_missing_prompts(tiny_recipe, tmp_path):
    import pytest

    from cai.errors import UserError
    from cai.runtime.rundir import StageContext
    from cai.stages import feedback

    recipe = tiny_recipe("feedback.policy=base")
    ctx = StageContext(
        config=stage_view(recipe, "feedback"),
        stage="feedback",
        out_dir=tmp_path / "fb",
        inputs={"critique_revise": tmp_path / "none"},
    )
    with pytest.raises(UserError, match="no training prompts"):
        feedback.run(ctx)
    assert feedback.policy_ref(ctx) == "tiny-random-llama"


def labeller_engine_start(monkeypatch, module, stop_at: str, run) -> dict:
    """The keyword arguments the labeller that `module` builds would start its chain-of-thought vLLM engine
    with: `run()` goes until `module.<stop_at>` receives the labeller (responses stubbed, no model sampled)."""
    import pytest

    from cai.runtime import vllm_engine

    def responses(ref, settings, gen, prompts, k, *rest):
        return [{"id": f"{p['id']}#{j}", "text": f"reply {j}"} for p in prompts for j in range(k)]

    made = []

    def stop(labeller, *args):
        made.append(labeller)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "sample_responses", responses)
    monkeypatch.setattr(module, stop_at, stop)
    with pytest.raises(KeyboardInterrupt):
        run()
    started = []
    monkeypatch.setattr(vllm_engine, "available", lambda: True)
    monkeypatch.setattr(vllm_engine, "start", lambda model, **kw: started.append(kw) or "LLM")
    made[0]._engine()
    (kw,) = started
    return kw


def test_the_chain_of_thought_engine_gets_the_recipe_settings_and_vllm_memory(
    tiny_recipe, tiny_dir, tmp_path, monkeypatch
):
    """The labeller's reasoning Engine was built without the recipe's settings and memory share: on vLLM it
    started with trust_remote_code off, seed 0 and the default memory whatever the recipe said."""
    from cai.runtime.rundir import StageContext
    from cai.stages import feedback

    recipe = tiny_recipe(
        "stages=[critique_revise,sft,feedback]",
        "feedback.chain_of_thought=true",
        "generation.backend=vllm",
        "generation.vllm_memory=0.2",
        "trust_remote_code=true",
        "seed=5",
    )
    run = tmp_path / "run"
    upstream(run, tiny_dir, n=2)
    ctx = StageContext(
        config=stage_view(recipe, "feedback"),
        stage="feedback",
        out_dir=run / "feedback",
        inputs={"critique_revise": run / "critique_revise", "sft": run / "sft"},
    )
    kw = labeller_engine_start(monkeypatch, feedback, "labeller_check", lambda: feedback.run(ctx))
    assert (kw["trust_remote_code"], kw["seed"], kw["memory"]) == (True, 5, 0.2)


def test_a_torn_pairs_file_is_labelled_in_the_batches_of_an_uninterrupted_run(tmp_path):
    """A kill mid-chunk left pairs.jsonl with part of a chunk (and a torn line); the resume re-chunked what was
    left, so later pairs met other batchmates and their labels moved by ~1e-7, changing the feedback output and
    rerunning everything after it. A labeller whose label depends on the batch shows the difference exactly."""
    from cai.feedback.pairs import LABEL_CHUNK, label_pairs

    class Label:
        def __init__(self, p_a):
            self.p_a = p_a

        def to_dict(self):
            return {"p_a": self.p_a}

    class BatchDependent:  # as float sums do: a pair's label depends on the batch it is scored in
        def label(self, items, principles, desc, shard):
            first = int(items[0].id.split("-")[1])
            return [Label(0.5 + 0.001 * first + 1e-6 * len(items)) for _ in items]

    pairs = [
        {"id": f"p-{i}", "messages": [{"role": "user", "content": "q"}], "response_a": "a", "response_b": "b"}
        for i in range(2 * LABEL_CHUNK + 8)
    ]
    principles = [["harm"]] * len(pairs)
    straight, resumed = tmp_path / "straight.jsonl", tmp_path / "resumed.jsonl"
    label_pairs(BatchDependent(), pairs, principles, straight)
    lines = straight.read_text().splitlines(keepends=True)
    resumed.write_text("".join(lines[:20]) + lines[20][: len(lines[20]) // 2])  # killed in chunk 1
    label_pairs(BatchDependent(), pairs, principles, resumed)
    assert read_jsonl(resumed) == read_jsonl(straight)
    assert len({r["p_a"] for r in read_jsonl(straight)}) == 3  # three batches
